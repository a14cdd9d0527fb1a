"""The remaining cases of issue 25: hostile ONNX graphs, Hugging Face folders that are not vision models or
carry bad configs, and ONNX files vitprune itself rewrote.

Every refusal is one line ``vitprune: error: ...`` with a non-zero exit (the CLI runs in-process: an
escaping exception fails the test as a traceback would), and the workspace is hashed before and after:
nothing appears, disappears or changes. Each case has a control that loads (the fixture is valid, so the
refusal is the case's own).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from PIL import Image

from onnx_fixtures import cached_onnx
from test_bad_input import _check_one_line, _snapshot

# ----- ONNX graphs no runtime can load --------------------------------------------------------------------


def _edited(base: onnx.ModelProto, change) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    change(model)
    return model


def _unknown_domain(m: onnx.ModelProto, imported: bool) -> None:
    node = next(n for n in m.graph.node if n.op_type == "Slice")
    node.domain = "evil.domain"
    if imported:
        m.opset_import.append(helper.make_opsetid("evil.domain", 1))


def _cycle(m: onnx.ModelProto) -> None:
    """An early Add reads the output of a later one: Add -> ... -> Add -> (back)."""
    adds = [i for i, n in enumerate(m.graph.node) if n.op_type == "Add" and n.input[0]]
    early, late = adds[len(adds) // 4], adds[len(adds) // 2]
    m.graph.node[early].input[0] = m.graph.node[late].output[0]


def _opset(m: onnx.ModelProto, version: int) -> None:
    next(i for i in m.opset_import if i.domain in ("", "ai.onnx")).version = version


def _input_shape(m: onnx.ModelProto, shape: list[int]) -> None:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.Clear()
        d.dim_value = v


ONNX_CASES = {
    "unknown domain": (lambda m: _unknown_domain(m, True), "'evil.domain', which neither ONNX nor ONNX Runtime"),
    "domain not imported": (lambda m: _unknown_domain(m, False), "which the file does not import"),
    "unknown operator": (lambda m: setattr(next(n for n in m.graph.node if n.op_type == "Softmax"), "op_type",
                                            "Softmaxx"), "(Softmaxx) is not an operator"),
    "cycle": (_cycle, "has a cycle through"),
    "opset 99": (lambda m: _opset(m, 99), "imports opset 99"),
    "input of 2^40 elements": (lambda m: _input_shape(m, [1024] * 4), "[1024, 1024, 1024, 1024] needs 12 TiB"),
    "input of 2^40 pixels": (lambda m: _input_shape(m, [1, 3, 2 ** 20, 2 ** 20]), "needs 36 TiB"),
}


@pytest.fixture(scope="module")
def hostile_onnx(onnx_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile_onnx")
    base = onnx.load(str(cached_onnx("timm-cls", "ts17", onnx_dir)))
    onnx.save(base, str(folder / "good.onnx"))
    for i, (change, _) in enumerate(ONNX_CASES.values()):
        onnx.save(_edited(base, change), str(folder / f"case{i}.onnx"))
    return folder


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_no_runtime_can_load_is_one_line(case, hostile_onnx, cli_inprocess):
    """A node of an unknown domain, a cycle, opset 99, an input of 2^40 elements: refused naming the node or
    the size needed (before allocating: numpy would need 12 TiB), by ``inspect`` and ``rewrite``."""
    path = hostile_onnx / f"case{list(ONNX_CASES).index(case)}.onnx"
    before = _snapshot(hostile_onnx)
    for argv in (["inspect", path], ["rewrite", path, "--keep-rate", "0.5", "-o", hostile_onnx / "out.onnx"]):
        code, _, err = cli_inprocess(*argv)
        _check_one_line(code, err, ONNX_CASES[case][1])
    assert _snapshot(hostile_onnx) == before


def test_onnx_control_loads(hostile_onnx, cli_inprocess):
    code, out, err = cli_inprocess("inspect", hostile_onnx / "good.onnx")
    assert code == 0 and "blocks" in out, err


# ----- Hugging Face folders -------------------------------------------------------------------------------


def _images(folder: Path, classes: str) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def _edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(doc | changes))


@pytest.fixture(scope="module")
def hf_ws(tmp_path_factory) -> Path:
    """Tiny ``save_pretrained`` folders (random init, 1 layer, width 32): a ViT classifier, BERT, the ViT with
    hostile ``architectures`` and with hostile ``preprocessor_config.json`` values; images of 2 classes."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.ViTForImageClassification(transformers.ViTConfig(image_size=32, patch_size=8, num_labels=2,
                                                                  **small)).save_pretrained(d / "vit")
    transformers.BertModel(transformers.BertConfig(vocab_size=50, max_position_embeddings=16, **small)
                           ).save_pretrained(d / "bert")
    shutil.copytree(d / "vit", d / "arch")
    _edit_json(d / "arch" / "config.json", architectures=["__class__", "os", 5])
    for name, mean, std in [("mean_evil", "evil", [0.5] * 3), ("std_zero", [0.5] * 3, [0.5, 0.0, 0.5]),
                            ("mean_nested", [[0.5]] * 3, [0.5] * 3), ("std_nan", [0.5] * 3, [float("nan")] * 3)]:
        shutil.copytree(d / "vit", d / name)
        (d / name / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    _images(d / "data", "ab")
    return d


HF_CASES = {
    "bert": "BertModel reads input_ids, not images",
    # transformers >= 5.25 loads the config and vitprune refuses the names; 5.17's config validation refuses
    # the field itself ("Validation error for field 'architectures': ...")
    "arch": "architectures",
    "mean_evil": "preprocessor_config.json: the normalisation mean is 'evil'",
    "std_zero": "the normalisation std is '[0.5, 0.0, 0.5]'",
    "mean_nested": "the normalisation mean is",
    "std_nan": "the normalisation std is",
}


def _every_reader(d: Path, model: Path) -> list[list]:
    """The commands that read a model's preprocessing (eval, finetune, show) and inspect / rewrite."""
    return [["inspect", model], ["rewrite", model, "-o", d / "out"], ["eval", model, "--data", d / "data"],
            ["finetune", model, "--data", d / "data", "--epochs", "1", "-o", d / "run"],
            ["show", model, d / "data" / "a" / "0.png", "-o", d / "kept.png"]]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_folder_that_cannot_serve_images_is_one_line(case, hf_ws, cli_inprocess):
    before = _snapshot(hf_ws)
    readers = _every_reader(hf_ws, hf_ws / case)
    for argv in readers if case == "mean_evil" else readers[:3:2]:  # every reader once; inspect and eval for all
        code, _, err = cli_inprocess(*argv)
        _check_one_line(code, err, HF_CASES[case])
    assert _snapshot(hf_ws) == before


def test_hf_control_evaluates(hf_ws, cli_inprocess):
    code, out, err = cli_inprocess("eval", hf_ws / "vit", "--data", hf_ws / "data", "--json")
    assert code == 0, err
    assert json.loads(out)["images"] == 4


def test_saved_model_with_hostile_preprocessing_metadata_is_one_line(hf_ws, tmp_path, cli_inprocess):
    """A vitprune folder whose ``graph.json`` records ``mean: "evil"``: refused where the normalisation is read."""
    out = tmp_path / "m"
    assert cli_inprocess("rewrite", hf_ws / "vit", "--keep-rate", "0.5", "-o", out)[0] == 0
    doc = json.loads((out / "graph.json").read_text())
    doc["metadata"]["preprocessing"] = {"mean": "evil", "std": [0.5, 0.5, 0.5], "source": "x"}
    (out / "graph.json").write_text(json.dumps(doc))
    before = _snapshot(tmp_path)
    code, _, err = cli_inprocess("eval", out, "--data", hf_ws / "data")
    _check_one_line(code, err, "the saved model's preprocessing metadata: the normalisation mean is 'evil'")
    assert _snapshot(tmp_path) == before


# ----- inspect describes an ONNX file vitprune rewrote; rewrite refuses it ------------------------------------


@pytest.fixture(scope="module")
def rewritten_onnx(onnx_dir, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """``{method: (rewritten file, its rewrite report's decisions)}``: token-drop and importance-mask."""
    import vitprune

    folder = tmp_path_factory.mktemp("rewritten_onnx")
    src = cached_onnx("timm-cls", "ts17", onnx_dir)
    out = {}
    for method, params in [("token-drop", dict(keep_rate=0.5)), ("importance-mask", dict(flops=0.85))]:
        proto, report = vitprune.rewrite_onnx(src, method, **params)
        vitprune.save_onnx(proto, folder / f"{method}.onnx")
        out[method] = folder / f"{method}.onnx", report.decisions
    return out


@pytest.mark.parametrize("method", ["token-drop", "importance-mask"])
def test_inspect_describes_a_rewritten_onnx_file(method, rewritten_onnx, cli_inprocess):
    """The recipe, the tokens per block it records and the tokens each attention op of the graph reads (one ORT
    run): for importance-mask 65, 65, 65, 23 (prunes before block 3), token-drop 33 in every block."""
    path, decisions = rewritten_onnx[method]
    expected = decisions["tokens_per_block"]
    expected = expected if isinstance(expected, list) else [expected] * 4
    code, out, err = cli_inprocess("inspect", path, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["rewritten_by_vitprune"] and doc["recipe"][0]["pass"] == method
    assert doc["tokens_per_block"] == expected
    assert [a["tokens"] for a in doc["attention_tokens"]] == expected  # the graph agrees with its recipe
    assert expected != [65] * 4 and doc["flops_per_image"] > 0
    code, out, err = cli_inprocess("inspect", path)
    assert code == 0 and f"recipe           {method}" in out and ", ".join(map(str, expected)) in out, err
    code, _, err = cli_inprocess("rewrite", path, "--keep-rate", "0.5", "-o", path.with_name("again.onnx"))
    _check_one_line(code, err, f"already rewritten by vitprune ({method})")
    assert not path.with_name("again.onnx").exists()


def test_inspect_of_a_rewritten_onnx_file_shows_only_counts_that_are_counts(rewritten_onnx, tmp_path, cli_inprocess):
    """Metadata anyone could write: a ``tokens_per_block`` that is no list of ints is left out; the graph's
    own counts are still read."""
    from vitprune.rewrite_onnx import RECIPE_KEY

    path, _ = rewritten_onnx["importance-mask"]
    model = onnx.load(str(path))
    prop = next(p for p in model.metadata_props if p.key == RECIPE_KEY)
    recipe = json.loads(prop.value)
    recipe[0]["decisions"]["tokens_per_block"] = ["x", 1.5]
    recipe[0]["params"] = "not a dict"
    prop.value = json.dumps(recipe)
    onnx.save(model, str(tmp_path / "m.onnx"))
    code, out, err = cli_inprocess("inspect", tmp_path / "m.onnx", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["tokens_per_block"] is None and [a["tokens"] for a in doc["attention_tokens"]] == [65, 65, 65, 23]
