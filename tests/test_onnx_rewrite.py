"""The ONNX frontend: analyse and rewrite ONNX files other exporters wrote, verified in ONNX Runtime.

The strongest probe here: the ONNX rewrite of an exported model computes what vitprune's fx rewrite of
the PyTorch model computes (same kept tokens, same blocks), to float precision, while both differ from
the original model. A lowering that gathered the wrong tokens, kept a stale token count or skipped a
block's input would not match.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import vitprune
from onnx_fixtures import cached_onnx, make_dense_model, make_model
from vitprune.errors import AnalysisError, PassError, VitpruneError
from vitprune.frontends.onnx import OnnxModel
from vitprune.rewrite_onnx import inspect_onnx, rewrite_onnx

METHODS = {
    "token-drop": dict(keep_rate=0.5, selection="magnitude"),
    "importance-mask": dict(flops=0.6, first_block=1),
    "importance-mask-static": dict(flops=0.6, first_block=1, mode="static"),
    "lifespan-gather": dict(flops=0.6, after_block=1),
}


def _method(name: str) -> tuple[str, dict]:
    return ("importance-mask" if name == "importance-mask-static" else name), dict(METHODS[name])


def _calibration(params: dict) -> dict:
    if params.get("mode") == "static":  # the same calibration images for the fx and the ONNX rewrite
        params["calibration"] = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))]
    return params


_FX_CACHE: dict = {}


def _fx_rewrite(family: str, name: str):
    """vitprune's fx rewrite of the PyTorch model (cached: several ONNX kinds compare against it)."""
    if (family, name) not in _FX_CACHE:
        model, _ = make_model(family)
        method, params = _method(name)
        if method == "token-drop":
            params["at_inference"] = True  # an ONNX graph is for inference: the drop is always active there
        gm, report = vitprune.rewrite(model, method, input_size=(3, 32, 32), **_calibration(params))
        _FX_CACHE[family, name] = (model, gm.eval(), report)
    return _FX_CACHE[family, name]


@pytest.mark.parametrize("kind", ["ts14", "ts17", "dynamo18", "dynamo23"])
def test_onnx_analysis_finds_what_the_fx_analysis_finds(onnx_dir, kind):
    model, x = make_model("timm-cls")
    fx_vit = vitprune.inspect_model(model, example_input=x)
    vit = inspect_onnx(cached_onnx("timm-cls", kind, onnx_dir))
    assert (vit.num_patches, vit.num_prefix_tokens, vit.grid, vit.patch_size, vit.embed_dim) == \
        (fx_vit.num_patches, fx_vit.num_prefix_tokens, fx_vit.grid, fx_vit.patch_size, fx_vit.embed_dim)
    assert vit.readout.kind == fx_vit.readout.kind and vit.readout.token_indices == fx_vit.readout.token_indices
    assert vit.pos_embed == fx_vit.pos_embed
    assert [b.linear_flops_per_token for b in vit.blocks] == [b.linear_flops_per_token for b in fx_vit.blocks]
    assert [(b.heads, b.dim, b.tokens) for b in vit.blocks] == [(b.heads, b.dim, b.tokens) for b in fx_vit.blocks]
    assert not vit.stream_readers and not vit.token_indexed


@pytest.mark.parametrize("family", ["timm-reg", "timm-gap", "hf-vit"])
def test_onnx_analysis_of_each_family(onnx_dir, family):
    model, x = make_model(family)
    fx_vit = vitprune.inspect_model(model, example_input=x)
    vit = inspect_onnx(cached_onnx(family, "ts17", onnx_dir))
    assert (vit.num_prefix_tokens, vit.prefix_tokens, vit.readout.kind, vit.readout.mean_start, vit.num_blocks) == \
        (fx_vit.num_prefix_tokens, fx_vit.prefix_tokens, fx_vit.readout.kind, fx_vit.readout.mean_start,
         fx_vit.num_blocks)


@pytest.mark.parametrize("kind,name", [
    ("ts17", "token-drop"), ("ts17", "importance-mask"), ("ts17", "importance-mask-static"), ("ts17", "lifespan-gather"),
    ("dynamo18", "token-drop"), ("dynamo18", "importance-mask"), ("dynamo18", "lifespan-gather"),
    ("dynamo23", "importance-mask"), ("dynamo23", "lifespan-gather"), ("ts14", "importance-mask"),
    ("ort-fused", "token-drop"), ("ort-fused", "importance-mask"), ("ort-fused", "lifespan-gather"),
])
def test_onnx_rewrite_computes_the_fx_rewrite(onnx_dir, kind, name):
    model, gm, fx_report = _fx_rewrite("timm-cls", name)
    method, params = _method(name)
    new, report = rewrite_onnx(cached_onnx("timm-cls", kind, onnx_dir), method, **_calibration(params))
    # keep-all: every original tensor and output unchanged; FLOPs counted the same way as fx counts them
    assert report.keep_all_worst_node_diff <= 1e-5 and report.keep_all_max_abs_diff <= 1e-5
    assert report.keep_all_nodes_compared > 100
    assert report.flops_before == fx_report.flops_before
    target = params.get("flops", 0.5)
    assert abs(report.flops_ratio - target) < 0.03, report.flops_ratio
    assert report.decisions["tokens_per_block"] == fx_report.decisions["tokens_per_block"]
    # the rewrite: batch dynamic, and the same function as the fx rewrite, which differs from the original
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = torch.from_numpy(_run(new, x))
    with torch.no_grad():
        want, original = gm(x), model(x)
    assert (want - original).abs().max() > 1e-2  # the probe: a rewrite that changed nothing would fail below
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    onnx.checker.check_model(new, full_check=True)


@pytest.mark.parametrize("method,kind,score", [
    ("importance-mask", "ts17", "l2"), ("importance-mask", "ts17", "cls-norm"),
    ("importance-mask", "ts17", "attention-received"), ("importance-mask", "ort-fused", "cls-norm"),
    ("importance-mask", "ts17", "distinct"), ("lifespan-gather", "dynamo23", "distinct"),
    ("token-drop", "ts17", "distinct"),
    ("lifespan-gather", "ts17", "l1"), ("lifespan-gather", "ort-fused", "attention-received")])
def test_every_patch_score_lowers_to_onnx(onnx_dir, method, kind, score):
    family = "hf-vit" if kind == "ort-fused" else "timm-cls"
    model, _ = make_model(family)
    params = dict(flops=0.6, score=score, **({"first_block": 1} if method == "importance-mask" else {"after_block": 1}))
    if method == "token-drop":
        params = dict(keep_rate=0.5, selection=score, at_inference=True)
    gm, fx_report = vitprune.rewrite(model, method, input_size=(3, 32, 32), **params)
    new, report = rewrite_onnx(cached_onnx(family, kind, onnx_dir), method, **params)
    assert report.keep_all_worst_node_diff <= 1e-5 and report.decisions.get("score", score) == score
    assert report.decisions["tokens_per_block"] == fx_report.decisions["tokens_per_block"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = gm.eval()(x)
    assert (want - model(x)).abs().max() > 1e-2
    assert torch.allclose(torch.from_numpy(_run(new, x)), want, atol=1e-4)


def _run(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("family,kind", [("timm-reg", "ts17"), ("timm-gap", "ts17"), ("hf-vit", "ts17"),
                                         ("hf-vit", "dynamo23")])
def test_onnx_rewrite_of_each_family_computes_the_fx_rewrite(onnx_dir, family, kind):
    """timm-gap has width 64 = 64 patches: a token count found by its value alone would rewrite the width too.
    The dynamo export of a Hugging Face ViT feeds every Attention an all-true [B, 1, N, N] mask (dropped)."""
    model, gm, fx_report = _fx_rewrite(family, "importance-mask")
    new, report = rewrite_onnx(cached_onnx(family, kind, onnx_dir), "importance-mask", flops=0.6, first_block=1)
    assert report.keep_all_worst_node_diff <= 1e-5
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = gm(x)
    assert torch.allclose(torch.from_numpy(_run(new, x)), want, atol=1e-4)


@pytest.mark.parametrize("name", ["importance-mask", "importance-mask-static", "lifespan-gather"])
def test_fused_attention_of_onnx_runtime_is_rewritten(onnx_dir, name):
    """ONNX Runtime's transformer optimizer fuses a Hugging Face ViT's attention into com.microsoft Attention
    (q and k inside the op) and the residual adds into SkipLayerNormalization: the rewrite splits what it
    must (the attention into projection + MultiHeadAttention, a cut SkipLayerNormalization into Add +
    LayerNormalization) and still computes the fx rewrite of the PyTorch model."""
    model, gm, fx_report = _fx_rewrite("hf-vit", name)
    method, params = _method(name)
    source = cached_onnx("hf-vit", "ort-fused", onnx_dir)
    assert any(n.op_type == "Attention" and n.domain == "com.microsoft" for n in onnx.load(source).graph.node)
    new, report = rewrite_onnx(source, method, **_calibration(params))
    assert report.keep_all_worst_node_diff <= 1e-5
    assert abs(report.flops_ratio - 0.6) < 0.02, report.flops_ratio
    assert report.decisions["tokens_per_block"] == fx_report.decisions["tokens_per_block"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = gm(x)
    assert torch.allclose(torch.from_numpy(_run(new, x)), want, atol=1e-4)


def test_random_token_drop_keeps_the_prefix_and_varies(onnx_dir):
    path = cached_onnx("timm-reg", "ts17", onnx_dir)
    new, report = rewrite_onnx(path, "token-drop", keep_rate=0.25)
    assert report.decisions["tokens_per_block"] == 5 + 16  # CLS + 4 registers always kept
    import onnxruntime as ort

    session = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    x = {session.get_inputs()[0].name: torch.randn(2, 3, 32, 32).numpy()}
    assert not np.allclose(session.run(None, x)[0], session.run(None, x)[0])  # RandomUniformLike: a new subset per run


def test_a_dense_head_gets_its_tokens_back_in_the_onnx_rewrite(onnx_dir):
    """The TorchScript-exported dense model (grid reshape of the patch tokens): token restore is lowered (a canvas
    of ScatterElements without reduction) and the result computes the fx rewrite."""
    import onnxruntime as ort

    model, _ = make_dense_model()
    params = dict(flops=0.6, first_block=1)
    new, report = rewrite_onnx(cached_onnx("dense", "ts17", onnx_dir), "importance-mask", **params)
    gm, fx_report = vitprune.rewrite(model, "importance-mask", input_size=(3, 32, 32), **params)
    assert report.decisions["tokens_per_block"] == fx_report.decisions["tokens_per_block"]
    assert report.decisions["score"] == "distinct"  # the dense default
    scatters = [n for n in new.graph.node if n.op_type == "ScatterElements"]
    assert scatters and all(a.s in (b"", b"none") for n in scatters for a in n.attribute if a.name == "reduction")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = gm.eval()(x)
        assert (want - model(x)).abs().max() > 1e-3
    assert np.abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - want.numpy()).max() <= 1e-4


def test_not_onnx_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a protobuf")
    with pytest.raises(VitpruneError, match="not an ONNX model") as info:
        vitprune.load(bad)
    assert "weights_only" not in str(info.value) and "pickle" not in str(info.value)


def test_loader_returns_the_onnx_graph(onnx_dir):
    model = vitprune.load(cached_onnx("timm-cls", "ts17", onnx_dir))
    assert isinstance(model, OnnxModel) and model.input_size == (3, 32, 32)


def test_onnx_cli_inspect_rewrite_bench(onnx_dir, tmp_path, cli_inprocess):
    source = cached_onnx("timm-gap", "ts17", onnx_dir)
    code, out, err = cli_inprocess("inspect", source)
    assert code == 0 and "mean over all tokens" in out, err
    target = tmp_path / "fast.onnx"
    code, out, err = cli_inprocess("rewrite", source, "--method", "importance-mask", "--flops", "0.6",
                                   "--first-block", "1", "-o", target)
    assert code == 0, err
    assert "tokens per block" in out and target.is_file()
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # a new file's usual mode, not mkstemp's
    before = source.read_bytes()
    code, _, err = cli_inprocess("rewrite", source, "--method", "token-drop", "-o", source, "--overwrite")
    assert code != 0 and "input" in err and source.read_bytes() == before  # never over the input
    code, _, err = cli_inprocess("rewrite", source, "--method", "token-drop", "-o", tmp_path / "out")
    assert code == 2 and ".onnx" in err
    code, _, err = cli_inprocess("export", source, "-o", tmp_path / "x.onnx")
    assert code == 1 and "ONNX graph" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli_inprocess("bench", source, target, "--backend", "onnxruntime", "--batch", "4",
                                   "--repeats", "1", "--iters", "1", "--json", "--quiet")
    assert code == 0, err
    import json

    rows = json.loads(out)["rows"] if isinstance(json.loads(out), dict) else json.loads(out)
    assert rows[1]["flops_ratio"] == pytest.approx(0.6, abs=0.03) and rows[1]["images_per_s"] > 0


def test_refusals_name_the_reason(onnx_dir):
    path = cached_onnx("timm-cls", "ts17", onnx_dir)
    with pytest.raises(PassError, match="after-block"):
        rewrite_onnx(path, "lifespan-gather", flops=0.6, after_block=9)
    with pytest.raises(PassError, match="below"):
        rewrite_onnx(path, "importance-mask", flops=0.05, first_block=3)


def test_external_data_round_trip(onnx_dir, tmp_path):
    """Weights in ONNX external data (what a model over 2 GB needs) are written beside the graph, read back by
    the loader, and the file rewrites again."""
    new, _ = rewrite_onnx(cached_onnx("timm-cls", "ts17", onnx_dir), "token-drop", keep_rate=0.5, selection="magnitude")
    path = tmp_path / "big.onnx"
    vitprune.save_onnx(new, path, external_data=True)
    assert (tmp_path / "big.onnx.data").stat().st_size > path.stat().st_size  # the weights live in the data file
    again = vitprune.load(path)
    assert isinstance(again, OnnxModel)
    x = torch.randn(2, 3, 32, 32)
    assert np.allclose(_run(again.proto, x), _run(new, x), atol=1e-6)
    from vitprune.rewrite_onnx import recipe_of

    assert recipe_of(again.proto)[0]["decisions"]["keep_count"] == 32  # what was done travels with the file
    with pytest.raises(AnalysisError, match="already rewritten by vitprune"):
        inspect_onnx(path)
