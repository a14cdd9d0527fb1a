"""Token axes by data flow, never by a size; ONNX files with a static batch.

Models whose width, head dim, MLP width or decoder channels equal the patch or token count (the sizes a
size-matching analysis takes for token axes) are analysed with no token-indexed tensor and rewritten exactly,
in PyTorch (fx / torch.export) and ONNX; a TorchScript export with a batch-1 example (a static batch, the
way most ONNX files are written) is analysed and rewritten at its own batch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import vitprune
from onnx_fixtures import GRID, IMG, NUM_PATCHES, PATCH, _distinct, export, export_static, make_dino_standin, make_model
from vitprune.errors import AnalysisError
from vitprune.rewrite_onnx import inspect_onnx, rewrite_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


def _batch_dim(proto: onnx.ModelProto) -> int | str:
    d = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else d.dim_param


def _run(proto_or_path, x: np.ndarray) -> np.ndarray:
    from vitprune.frontends.onnx import load_model, run_values

    proto = load_model(proto_or_path)
    return run_values(proto, x, [])[proto.graph.output[0].name]


@pytest.fixture(scope="module")
def standin():
    return make_dino_standin()


@pytest.fixture(scope="module")
def standin_onnx(standin, tmp_path_factory):
    model, x = standin
    return export_static(model, x[:1], tmp_path_factory.mktemp("standin") / "standin.b1.onnx")


def _coinciding_vit() -> torch.nn.Module:
    """timm ViT, 32x32 input, patch 4: 64 patches, 65 tokens; width 64 (= patches), one head of 64 channels
    (= patches), MLP width 65 (= tokens)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return _distinct(VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=NUM_PATCHES, depth=2, num_heads=1,
                                       mlp_ratio=(NUM_PATCHES + 1) / NUM_PATCHES, num_classes=NUM_PATCHES + 1)).eval()


def test_a_static_batch_1_timm_vit_is_inspected_and_rewritten_at_its_own_batch(tmp_path):
    model, x = make_model("timm-cls")
    path = export_static(model, x[:1], tmp_path / "timm.b1.onnx")
    assert _batch_dim(onnx.load(str(path))) == 1
    vit = inspect_onnx(path)
    assert vit.input_shape[0] == 1 and vit.num_tokens == NUM_PATCHES + 1 and vit.prefix_tokens == ["cls"]
    new, report = rewrite_onnx(path, "token-drop", keep_rate=0.5, selection="magnitude")
    assert report.input_shape[0] == 1 and report.keep_all_worst_node_diff <= TOL
    assert _batch_dim(new) == 1 and 0.4 < report.flops_ratio < 0.6  # a static batch stays the file's own
    one = x[:1].numpy()
    out = _run(new, one)
    assert out.shape == (1, 10) and np.isfinite(out).all() and not np.allclose(out, _run(path, one), atol=1e-3)


def test_an_onnx_runtime_error_is_reported_whole(tmp_path):
    from vitprune.frontends.onnx import run_values

    model, x = make_model("timm-cls")
    proto = onnx.load(str(export_static(model, x[:1], tmp_path / "timm.b1.onnx")))
    with pytest.raises(AnalysisError) as info:
        run_values(proto, x.numpy())  # batch 2 into a batch-1 graph
    text = str(info.value)
    assert "\n" not in text and "Got invalid dimensions" in text and "Expected: 1" in text


def test_the_dino_standin_onnx_file_is_dense_cls_and_indexes_no_weight_by_token(standin_onnx):
    vit = inspect_onnx(standin_onnx)
    # the decoder's ConvTranspose weight [64, 64, 2, 2] and bias [1, 64, 1, 1] have 64 = patches channels
    sizes = {tuple(i.dims) for i in onnx.load(str(standin_onnx)).graph.initializer}
    assert (NUM_PATCHES, NUM_PATCHES, 2, 2) in sizes and (1, NUM_PATCHES, 1, 1) in sizes
    assert vit.token_indexed == [] and vit.readout.kind == "tokens"
    assert vit.prefix_tokens == ["cls"] and vit.num_patches == NUM_PATCHES and vit.input_shape[0] == 1


@pytest.mark.parametrize("method, params", [
    ("token-drop", dict(keep_rate=0.5, selection="random")),
    ("importance-mask", dict(keep={1: 0.5})),
    ("lifespan-gather", dict(flops=0.8, after_block=1)),
])
def test_the_dino_standin_onnx_file_is_rewritten_exactly_at_its_static_batch(standin_onnx, method, params):
    new, report = rewrite_onnx(standin_onnx, method, **params)
    assert report.keep_all_worst_node_diff <= TOL and report.keep_all_nodes_compared > 100
    assert _batch_dim(new) == 1 and report.flops_ratio < 0.95
    x = np.random.default_rng(3).standard_normal((1, 3, IMG, IMG)).astype(np.float32)
    out = _run(new, x)
    assert out.shape == (1, 1, IMG, IMG) and np.isfinite(out).all()


def test_the_dino_standin_in_pytorch_indexes_no_weight_by_token_and_rewrites_exactly(standin):
    model, x = standin
    vit = vitprune.inspect_model(model, example_input=x)
    assert vit.token_indexed == [] and vit.readout.kind == "tokens" and vit.prefix_tokens == ["cls"]
    rewritten, report = vitprune.rewrite(model, "token-drop", example_input=x, keep_rate=0.5, at_inference=True)
    assert report.keep_all_worst_node_diff <= 1e-5 and report.flops_ratio < 0.8
    with torch.no_grad():
        out = rewritten(x)
    assert out.shape == (2, 1, IMG, IMG) and torch.isfinite(out).all()


@pytest.mark.parametrize("frontend", ["fx", "onnx"])
def test_width_head_dim_and_mlp_width_equal_to_the_token_counts_are_no_token_axes(frontend, tmp_path):
    model = _coinciding_vit()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    if frontend == "fx":
        vit = vitprune.inspect_model(model, example_input=x)
        _, report = vitprune.rewrite(model, "importance-mask", example_input=x, keep={1: 0.5})
        exact = 1e-5
    else:
        path = export(model, x, "ts14", tmp_path / "coinciding.onnx")
        vit = inspect_onnx(path)
        _, report = rewrite_onnx(path, "importance-mask", keep={1: 0.5})
        exact = TOL
    block = vit.blocks[0]
    head_dim = block.head_dim or block.dim // block.heads  # matmul attention in ONNX: the width over the heads
    assert (vit.embed_dim, head_dim, vit.num_tokens) == (NUM_PATCHES, NUM_PATCHES, NUM_PATCHES + 1)
    assert vit.token_indexed == [] and vit.prefix_tokens == ["cls"] and vit.grid == [GRID, GRID]
    assert report.keep_all_worst_node_diff <= exact and report.flops_ratio < 0.9


def test_a_flops_target_below_the_floor_is_refused_with_the_reachable_minimum_and_the_prunable_share(standin_onnx):
    import re

    from vitprune.errors import PassError

    reachable = {}
    for min_keep in (None, 1):
        with pytest.raises(PassError) as info:
            rewrite_onnx(standin_onnx, "importance-mask", flops=0.3, first_block=1, min_keep=min_keep)
        text = str(info.value)
        assert "\n" not in text and "hold" in text and "of the model's FLOPs" in text
        reachable[min_keep] = float(re.search(r"below ([0-9.]+)", text).group(1))
    assert reachable[1] < reachable[None] < 1.0  # the default floor (6 of 64 patches) costs FLOPs


@pytest.mark.parametrize("method, params", [
    ("importance-mask", dict(flops=0.45, first_block=1)),
    ("lifespan-gather", dict(flops=0.45, after_block=1)),
    ("token-merge", dict(flops=0.4)),
])
def test_no_solver_drives_a_block_below_the_floor(method, params):
    from vitprune.graph.keep_counts import default_min_keep

    model, x = make_model("timm-cls")  # 64 patches + CLS: floor 6 patches; the targets need the floor to bind
    fewest = {}
    for min_keep in (None, 1):
        _, report = vitprune.rewrite(model, method, example_input=x, min_keep=min_keep, **params)
        d = report.decisions
        fewest[min_keep] = min(d.get("tokens_after_merge") or d["tokens_per_block"]) - 1  # patches, CLS off
        assert 0.5 < d["prunable_flops_share"] < 1.0 and report.flops_ratio < 0.5
    assert fewest[None] == default_min_keep(NUM_PATCHES) == 6 and fewest[1] < 6


class _Features(torch.nn.Module):
    """A timm model's ``forward_features``: every token out (a dense readout)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@pytest.mark.parametrize("name, kinds", [
    ("vit_small_patch14_dinov2", ["cls"]),
    ("vit_small_patch14_reg4_dinov2", ["cls"] + ["register"] * 4),
])
def test_a_dense_readout_labels_dinov2s_cls_token_cls_and_its_registers_registers(name, kinds):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=28, depth=1, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 28, 28)
    dense = vitprune.inspect_model(_Features(model), example_input=x)
    assert dense.readout.kind == "tokens" and dense.prefix_tokens == kinds
    assert vitprune.inspect_model(model, example_input=x).prefix_tokens == kinds  # x[:, 0] read: the same
