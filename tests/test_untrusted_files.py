"""Files that would run code or delete what vitprune did not write (issue 25): refused in one line.

A ``.pt2`` archive is a zip whose members ``torch.export.load`` may unpickle, dlopen or hand to
``sympy.sympify`` (an ``eval``); each attack below starts from a valid ``torch.export.save`` archive and
replaces one member, found by its content (a ``torch.save`` zip, the JSON graph), not by one torch
version's member names. Each must be refused without ``--trust-pickle`` and no marker file may appear;
with ``trust_pickle=True`` the same pickle attack does run (the test could fail).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import vitprune
from conftest import run_cli
from vitprune.errors import LoadError


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 5)

    def forward(self, x):
        return self.proj(x.flatten(1))


class _Marker:
    """Unpickling this creates ``path``: the proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A valid ``torch.export.save`` archive of a tiny model, batch axis dynamic (so its graph holds
    symbolic-shape expressions)."""
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.manual_seed(0)
    program = torch.export.export(_Tiny().eval(), (torch.randn(2, 3, 4, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _rewrite_archive(src: Path, dst: Path, change) -> Path:
    """Copy ``src`` to ``dst`` with ``change(name, data) -> data | None`` applied to every member."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = change(info.filename, zi.read(info))
            zo.writestr(info, data if data is not None else zi.read(info))
    return dst


def _first_torch_zip(members: dict[str, bytes]) -> str:
    """A member that is itself a ``torch.save`` zip (the sample inputs on every torch that writes .pt2)."""
    return next(n for n, d in members.items() if d.startswith(b"PK\x03\x04"))


def _graph_json(members: dict[str, bytes]) -> str:
    return next(n for n, d in members.items() if b'"expr_str"' in d)


def _pickled(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": _Marker(marker)}, buf)
    return buf.getvalue()


def _attacks(archive: Path, folder: Path, marker: Path) -> dict[str, Path]:
    members = _members(archive)
    target, graph = _first_torch_zip(members), _graph_json(members)
    expr = f"__import__('builtins').open({str(marker)!r}, 'w')"
    raw = pickle.dumps(_Marker(marker), protocol=0)
    return {
        "torch.save member": _rewrite_archive(archive, folder / "a.pt2",
                                              lambda n, d: _pickled(marker) if n == target else None),
        "raw pickle member": _rewrite_archive(archive, folder / "b.pt2", lambda n, d: raw if n == target else None),
        "sympy expression": _rewrite_archive(
            archive, folder / "c.pt2",
            lambda n, d: d.replace(b'"expr_str": "', b'"expr_str": "' + expr.encode() + b'+', 1) if n == graph else None),
        "factorial spelling": _rewrite_archive(
            archive, folder / "d.pt2",
            lambda n, d: d.replace(b'"expr_str": "', b'"expr_str": "' + expr.encode() + b'!+', 1) if n == graph else None),
        "native library": _rewrite_archive(archive, folder / "e.pt2",
                                           lambda n, d: b"\x7fELF" + b"\0" * 60 if n == target else None),
    }


def test_pt2_attacks_are_refused_and_run_nothing(archive, tmp_path):
    marker = tmp_path / "marker"
    for attack, path in _attacks(archive, tmp_path, marker).items():
        with pytest.raises(LoadError, match="may run code when loaded.*--trust-pickle") as info:
            vitprune.load(path)
        assert "\n" not in str(info.value), attack
        assert not marker.exists(), attack
    vitprune.load(archive)  # the untouched archive loads


def test_pt2_pickle_runs_with_consent(archive, tmp_path):
    """The attack is real: with trust_pickle=True torch's loader unpickles the member and the marker appears."""
    marker = tmp_path / "marker"
    path = _attacks(archive, tmp_path, marker)["torch.save member"]
    with pytest.raises(Exception):
        vitprune.load(path, trust_pickle=True)  # the member is no longer sample inputs: torch fails after it
    assert marker.exists()


def test_pt2_duplicate_member_names_are_refused(archive, tmp_path):
    path = tmp_path / "dup.pt2"
    members = _members(archive)
    with zipfile.ZipFile(path, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(_first_torch_zip(members), _pickled(tmp_path / "marker"))
    with pytest.raises(LoadError, match="two members are named"):
        vitprune.load(path)


def test_malicious_pt2_in_a_fresh_process_exits_with_one_line(archive, tmp_path):
    """``vitprune inspect x.pt2`` as a user runs it: one line, exit 1, no marker, no torch log block."""
    marker = tmp_path / "marker"
    path = _attacks(archive, tmp_path, marker)["torch.save member"]
    result = run_cli("inspect", path, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("vitprune: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "--trust-pickle" in result.stderr and not marker.exists()


def test_pt2_load_failure_prints_no_torch_log_block(archive, tmp_path, capfd):
    """A graph torch's own verifier refuses (an operator outside aten): one error, no ``W... Traceback``."""
    graph = _graph_json(_members(archive))
    path = _rewrite_archive(archive, tmp_path / "op.pt2", lambda n, d: d.replace(
        b'"target": "torch.ops.aten.linear.default"', b'"target": "torch.os.getcwd"') if n == graph else None)
    with pytest.raises(LoadError, match="cannot read the torch.export file"):
        vitprune.load(path)
    assert capfd.readouterr().err == ""


# ----- --overwrite deletes only the files vitprune wrote -----

ARCH, TINY = "timm:vit_small_patch16_224", ["--model-arg", "img_size=32", "--model-arg", "patch_size=4",
                                             "--model-arg", "embed_dim=32", "--model-arg", "depth=1",
                                             "--model-arg", "num_heads=2"]


@pytest.mark.parametrize("swap", ["folder", "link"])
def test_overwrite_refuses_a_listed_name_that_is_not_a_regular_file(tmp_path, swap, cli_inprocess):
    """``rewrite -o o --overwrite`` where ``o``'s ``graph.json`` is the user's folder (or a link to their
    file): one line, exit 1, the user's file is still there."""
    out = tmp_path / "o"
    assert cli_inprocess("rewrite", ARCH, *TINY, "--keep-rate", "0.5", "-o", out)[0] == 0
    (out / "graph.json").unlink()
    if swap == "folder":
        (out / "graph.json").mkdir()
        thesis = out / "graph.json" / "thesis.txt"
    else:
        thesis = tmp_path / "thesis.txt"
        os.symlink(thesis, out / "graph.json")
    thesis.write_text("years of work")
    code, _, err = cli_inprocess("rewrite", ARCH, *TINY, "--keep-rate", "0.5", "-o", out, "--overwrite")
    assert code == 1 and err.count("\n") == 1 and "graph.json, which is a folder or a link" in err, err
    assert thesis.read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o"] + (["thesis.txt"] if swap == "link" else []))


def test_onnx_external_data_never_replaces_an_existing_file(onnx_dir, tmp_path):
    """``save_onnx`` with external data (a model over 2 GB): ``NAME.data`` is staged and linked into place,
    never over an existing file; a refused save leaves neither the graph nor a temporary behind."""
    import onnx

    from onnx_fixtures import cached_onnx

    model = onnx.load(str(cached_onnx("timm-cls", "ts17", onnx_dir)))
    vitprune.save_onnx(model, tmp_path / "a.onnx", external_data=True)
    assert (tmp_path / "a.onnx.data").stat().st_size > (tmp_path / "a.onnx").stat().st_size
    (tmp_path / "b.onnx.data").write_text("the user's file")
    with pytest.raises(vitprune.errors.VitpruneError, match="b.onnx.data exists"):
        vitprune.save_onnx(model, tmp_path / "b.onnx", external_data=True)
    assert (tmp_path / "b.onnx.data").read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.data", "b.onnx.data"]


def test_onnx_recipe_metadata_fuzz_is_one_line(onnx_dir, tmp_path, cli_inprocess):
    """Hostile ``vitprune.recipe`` metadata (not JSON, 10^5 deep, wrong shapes): ``inspect`` and ``rewrite``
    exit 1 with one line and write nothing."""
    import onnx

    from onnx_fixtures import cached_onnx
    from vitprune.rewrite_onnx import RECIPE_KEY

    base = onnx.load(str(cached_onnx("timm-cls", "ts17", onnx_dir)))
    for i, value in enumerate(["{not json", "[" * 100_000 + "]" * 100_000, '{"pass": "x"}', "[1, 2]",
                               '[{"pass": 5}]', '"text"']):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        onnx.helper.set_model_props(model, {RECIPE_KEY: value})
        path = tmp_path / f"m{i}.onnx"
        onnx.save(model, str(path))
        for argv in (["inspect", path], ["rewrite", path, "--keep-rate", "0.5", "-o", tmp_path / "out.onnx"]):
            code, _, err = cli_inprocess(*argv)
            assert code == 1 and err.startswith("vitprune: error: ") and err.count("\n") == 1, (value[:20], err)
            assert "is not a recipe vitprune wrote" in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, cli_inprocess):
    """A vitprune folder whose metadata says ``input_shape [2, 3, 2^20, 2^20]`` (26 TB) and
    ``bench --batch 10^9``: one line naming the memory needed, nothing written, no allocator error."""
    import json

    out = tmp_path / "m"
    assert cli_inprocess("rewrite", ARCH, *TINY, "--keep-rate", "0.5", "-o", out)[0] == 0
    code, _, err = cli_inprocess("bench", out, "--batch", "1000000000")
    assert code == 1 and err.count("\n") == 1 and "--batch 1000000000 of shape" in err and "TiB" in err, err
    doc = json.loads((out / "graph.json").read_text())
    doc["metadata"]["input_shape"] = [2, 3, 2 ** 20, 2 ** 20]
    (out / "graph.json").write_text(json.dumps(doc))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv in (["inspect", out], ["bench", out], ["rewrite", out, "--keep-rate", "0.5", "-o", tmp_path / "o2"]):
        code, _, err = cli_inprocess(*argv)
        assert code == 1 and err.startswith("vitprune: error: ") and err.count("\n") == 1, (argv[0], err)
        assert "needs" in err and "TiB" in err, (argv[0], err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
