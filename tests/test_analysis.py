"""The analysis finds each family's structure from the graph, and refuses what is not a plain ViT."""

import pytest
import torch

import vitprune
from conftest import small_model
from vitprune.errors import AnalysisError


def analyse(model, size):
    return vitprune.inspect_model(model, example_input=torch.randn(2, 3, size, size))


@pytest.mark.parametrize(
    "family,size,prefix,kinds,pos,readout",
    [
        ("vit_cls", 32, 1, ["cls"], "after_prefix_concat", ("token", [0])),
        ("deit_distilled", 32, 2, ["cls", "distillation"], "after_prefix_concat", ("token", [0, 1])),
        ("registers", 56, 5, ["cls"] + ["register"] * 4, "before_prefix_concat", ("token", [0])),
        ("gap", 32, 0, [], "patch_tokens_only", ("mean", [])),
        ("dinov2", 56, 1, ["cls"], "after_prefix_concat", ("token", [0])),
    ],
)
def test_families(family, size, prefix, kinds, pos, readout):
    model = small_model(family)
    vit = analyse(model, size)
    assert vit.num_prefix_tokens == prefix
    assert vit.prefix_tokens == kinds
    assert vit.pos_embed == pos
    assert (vit.readout.kind, vit.readout.token_indices) == readout
    assert vit.num_blocks == 2
    assert vit.num_patches == (size // vit.patch_size[0]) ** 2
    for block in vit.blocks:
        assert block.attention == "sdpa"
        assert block.heads * block.head_dim == block.dim == vit.embed_dim
        assert block.tokens == prefix + vit.num_patches
        assert len(block.residual_adds) == 2  # attention and MLP residuals
    assert vit.token_indexed == []
    d = vit.to_dict()
    assert {"num_blocks", "num_prefix_tokens", "num_patches", "readout", "blocks"} <= d.keys()


def test_full_size_vit_small():
    model = vitprune.load("timm:vit_small_patch16_224")
    vit = analyse(model, 224)
    assert (vit.num_blocks, vit.num_patches, vit.grid, vit.patch_size) == (12, 196, [14, 14], [16, 16])
    assert [(b.heads, b.dim) for b in vit.blocks] == [(6, 384)] * 12


def test_mean_readout_over_patch_tokens_with_cls():
    model = vitprune.load("timm:vit_small_patch16_224",
                          model_args=dict(img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2, global_pool="avg"))
    vit = analyse(model, 32)
    assert vit.readout.kind == "mean" and vit.readout.mean_start == 1
    assert vit.prefix_tokens == ["cls"]  # nothing reads it, yet it is concatenated first as a token of its own


def test_matmul_softmax_attention_is_found():
    import timm.layers

    timm.layers.set_fused_attn(False)
    try:
        model = small_model("vit_cls")
        vit = analyse(model, 32)
    finally:
        timm.layers.set_fused_attn(True)
    assert [b.attention for b in vit.blocks] == ["matmul-softmax"] * 2
    assert vit.blocks[0].heads == 2


def test_swin_is_refused_as_windowed():
    model = vitprune.load("timm:swin_tiny_patch4_window7_224", model_args=dict(depths=(1, 1, 1, 1)))
    with pytest.raises(AnalysisError, match="windowed attention"):
        analyse(model, 224)


def test_resnet_is_refused():
    model = vitprune.load("timm:resnet18")
    with pytest.raises(AnalysisError, match="no attention op"):
        analyse(model, 64)


def test_beit_relative_position_bias_is_token_indexed():
    model = vitprune.load("timm:beit_base_patch16_224", model_args=dict(img_size=32, depth=1))
    vit = analyse(model, 32)
    assert vit.token_indexed and vit.token_indexed[0]["shape"][-2:] == [5, 5]
