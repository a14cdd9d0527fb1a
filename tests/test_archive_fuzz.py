"""Fuzz the two loaders of issue 25 that read files anyone can write: ``.pt2`` archives and the ``vitprune.*``
metadata of ONNX files (as tests/test_loader_fuzz.py does for ``graph.json``).

Every variant is either loaded (and, for a ``.pt2``, run once) or refused with one :class:`VitpruneError`
line; nothing else may escape, no warning may be printed, and no marker file may appear: variants that
plant a pickle whose ``__reduce__`` creates the marker in every member must be refused before torch reads
them.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

import vitprune
from onnx_fixtures import cached_onnx
from vitprune.errors import VitpruneError
from test_untrusted_files import _Marker, _Tiny, _members, _pickled, archive  # noqa: F401  (archive: fixture)


def _pt2_variants(members: dict[str, bytes], marker: Path):
    """(label, {member: bytes | None (left out)}) for each damaged archive."""
    names = list(members)

    def one(name: str, data: bytes | None) -> dict[str, bytes | None]:
        return members | {name: data}

    for name, data in members.items():
        for pos in sorted({0, 1, len(data) // 3, len(data) // 2, len(data) - 1}):
            if 0 <= pos < len(data):
                flipped = bytearray(data)
                flipped[pos] ^= 0xFF
                yield f"flip {name}@{pos}", one(name, bytes(flipped))
        yield f"truncate {name}", one(name, data[: len(data) // 2])
        yield f"empty {name}", one(name, b"")
        yield f"drop {name}", one(name, None)
        yield f"torch.save pickle as {name}", one(name, _pickled(marker))
        yield f"raw pickle as {name}", one(name, pickle.dumps(_Marker(marker), protocol=4))
    for a, b in zip(names, names[1:] + names[:1]):
        yield f"swap {a}, {b}", members | {a: members[b], b: members[a]}
    graph = next(n for n, d in members.items() if b'"graph_module"' in d)
    text = members[graph]
    for cut in range(0, len(text), max(1, len(text) // 8)):
        yield f"graph cut at {cut}", one(graph, text[:cut])
    edits = [(b'"as_int": 48', v) for v in (b'"as_int": -1', b'"as_int": 4611686018427387904', b'"as_int": "x"')]
    edits += [(b'"dtype": 7', b'"dtype": 99'), (b'"major": ', b'"major": 99'), (b'"graph_module"', b'"graph_modul"'),
              (b'"as_tensor"', b'"as_none"'), (b'"inputs": [', b'"inputs": [' + b"[" * 100_000 + b"]" * 100_000 + b",")]
    edits += [(b'"torch.ops.aten.linear.default"', t) for t in (b'"torch.ops.aten.view.default"', b'"builtins.eval"',
                                                                 b'"os.system"')]
    for old, new in edits:
        for name in [n for n, d in members.items() if old in d]:
            yield f"{name}: {old.decode()[:24]} -> {new.decode()[:24]}", one(name, members[name].replace(old, new, 1))


def _write(path: Path, infos: list[zipfile.ZipInfo], members: dict[str, bytes | None]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for info in infos:
            if members[info.filename] is not None:
                z.writestr(info, members[info.filename])
    return path


def _outcome(load, run, label: str) -> str:
    """Load and (when it loads) run once; "refused" for one VitpruneError line, "loaded" / "failed at run"."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        try:
            model = load()
        except VitpruneError as exc:
            assert "\n" not in str(exc), (label, str(exc))
            assert not shown, (label, [str(w.message)[:100] for w in shown])  # a refusal is one line: no warning
            return "refused"
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"{label}: {type(exc).__name__}: {exc}") from exc
    try:
        run(model)
    except Exception:  # noqa: BLE001 - a damaged weight's shape may fail in a kernel; loading was clean
        return "failed at run"
    return "loaded"


def test_damaged_pt2_archives_load_or_are_one_line(archive, tmp_path, capfd):  # noqa: F811
    marker = tmp_path / "marker"
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
    members = _members(archive)
    x = torch.randn(2, 3, 4, 4)
    outcomes: dict[str, int] = {}
    for i, (label, variant) in enumerate(_pt2_variants(members, marker)):
        path = _write(tmp_path / f"v{i}.pt2", infos, variant)
        outcome = _outcome(lambda: vitprune.load(path), lambda m: m(x), label)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert not marker.exists(), label
        path.unlink()
    raw = archive.read_bytes()
    for pos in (len(raw) // 2, len(raw) - 10, len(raw) - 30):  # the zip itself damaged (CRC, directory)
        flipped = bytearray(raw)
        flipped[pos] ^= 0xFF
        (tmp_path / "raw.pt2").write_bytes(bytes(flipped))
        _outcome(lambda: vitprune.load(tmp_path / "raw.pt2"), lambda m: m(x), f"raw flip {pos}")
    for cut in (0, 100, len(raw) // 2):
        (tmp_path / "raw.pt2").write_bytes(raw[:cut])
        assert _outcome(lambda: vitprune.load(tmp_path / "raw.pt2"), lambda m: m(x), f"cut {cut}") == "refused"
    assert capfd.readouterr().err == ""  # torch's logger printed nothing either
    with capfd.disabled():
        print(f"{sum(outcomes.values())} damaged archives: {outcomes}")
    assert outcomes["refused"] >= 100 and outcomes.get("loaded", 0) > 0  # the undamaged parts do load
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.pt2"]


def _metadata_variants(recipe: list[dict]):
    """(label, [(key, value)]) of hostile ``vitprune.*`` metadata, starting from a real recipe."""
    from vitprune.rewrite_onnx import RECIPE_KEY

    text = json.dumps(recipe)
    for cut in range(0, len(text), max(1, len(text) // 6)):
        yield f"recipe cut at {cut}", [(RECIPE_KEY, text[:cut])]
    for value in ["", "null", "[]", "{}", "1e999", '"text"', "[" * 100_000 + "]" * 100_000, "\x00", "[null]",
                  '[{"pass": 5}]', '[{"pass": "token-drop"}]', '[{"pass": "x", "params": [], "decisions": []}]']:
        yield f"recipe {value[:20]!r}", [(RECIPE_KEY, value)]
    step = recipe[0]
    # each ~0.2 s (inspect runs the graph once): every field with each wrong type, every key with three
    deep = json.loads("[" * 500 + "]" * 500)  # parses, then exhausted the recursion of inspect's printing
    wrong = [None, -1, 2 ** 70, 1.5, "x", [], {"a": 1}, [-3, "x"], [[[[1]]]], True, deep]
    for field in ("params", "decisions"):
        for v in wrong:
            yield f"{field}={v!r:.30}", [(RECIPE_KEY, json.dumps([step | {field: v}]))]
    for key in [*step["decisions"], *step["params"]]:
        for v in (None, "x", deep):
            inner = "decisions" if key in step["decisions"] else "params"
            yield f"{inner}.{key}={v!r:.30}", [(RECIPE_KEY, json.dumps([step | {inner: step[inner] | {key: v}}]))]
    yield "two recipes", [(RECIPE_KEY, text), (RECIPE_KEY, "{not json")]
    yield "other vitprune keys", [(RECIPE_KEY, text), ("vitprune.other", "[" * 100_000), ("vitprune.", "")]


def test_hostile_onnx_metadata_inspects_or_is_one_line(onnx_dir, tmp_path, cli_inprocess):
    """``inspect`` of a rewritten ONNX file whose metadata was edited: described or one line; ``rewrite`` of it
    always one line (a file with a recipe is never rewritten again), nothing written."""
    from vitprune.rewrite_onnx import RECIPE_KEY

    rewritten, _ = vitprune.rewrite_onnx(cached_onnx("timm-cls", "ts17", onnx_dir), "token-drop", keep_rate=0.5)
    recipe = json.loads(next(p.value for p in rewritten.metadata_props if p.key == RECIPE_KEY))
    outcomes: dict[str, int] = {}
    for label, props in _metadata_variants(recipe):
        model = onnx.ModelProto()
        model.CopyFrom(rewritten)
        del model.metadata_props[:]
        for key, value in props:
            model.metadata_props.add(key=key, value=value)
        path = tmp_path / "m.onnx"
        onnx.save(model, str(path))
        code, out, err = cli_inprocess("inspect", path)
        outcome = "described" if code == 0 else "refused"
        if code != 0:
            assert err.startswith("vitprune: error: ") and err.count("\n") == 1, (label, err)
        else:
            assert "attention reads  33, 33, 33, 33 tokens" in out or "blocks" in out, (label, out)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        code, _, err = cli_inprocess("rewrite", path, "--keep-rate", "0.5", "-o", tmp_path / "out.onnx")
        assert code != 0 and err.startswith("vitprune: error: ") and err.count("\n") == 1, (label, err)
    print(f"{sum(outcomes.values())} hostile metadata variants: {outcomes}")
    assert outcomes.get("described", 0) > 0 and outcomes.get("refused", 0) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
