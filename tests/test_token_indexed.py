"""Tensors indexed by token position follow the kept tokens: RoPE tables (EVA-02, timm's RoPE ViT) and
relative-position biases (BEiT, vit_relpos) are gathered per image, found from the graph."""

from __future__ import annotations

import pytest
import torch

import vitprune
from vitprune.ops.modules import TokenIndexedGather, TokenModule

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {
    "eva02": ("timm:eva02_small_patch14_224", dict(img_size=56, depth=3), 56),
    "rope": ("timm:vit_base_patch16_rope_224", dict(img_size=64, depth=3, embed_dim=64, num_heads=2), 64),
    "beit": ("timm:beit_base_patch16_224", dict(img_size=64, depth=3, embed_dim=64, num_heads=2), 64),
    "relpos": ("timm:vit_relpos_small_patch16_224", dict(img_size=64, depth=3), 64),
}
METHODS = {
    "token-drop": dict(keep_rate=0.5, at_inference=True, selection="magnitude"),
    "importance-mask": dict(keep={1: 0.5}),
    "lifespan-gather": dict(flops=0.8, after_block=1),
}


def _model(family: str):
    source, args, size = FAMILIES[family]
    torch.manual_seed(0)
    return vitprune.load(source, model_args=args).eval(), torch.randn(2, 3, size, size)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_indexed_families_rewrite_and_are_exact_with_every_token_kept(family, method):
    model, x = _model(family)
    vit = vitprune.inspect_model(model, example_input=x)
    assert vit.token_indexed and all(t["token_axes"] for t in vit.token_indexed)
    rewritten, report = vitprune.rewrite(model, method, example_input=x, **METHODS[method])
    assert report.keep_all_nodes_compared > 50 and report.keep_all_worst_node_diff <= 1e-6
    gathered = report.decisions["token_indexed"]["gathered"]
    # every use after the first pruning point is gathered, and only those
    first = 0 if method == "token-drop" else 1
    after = {t["used_by"] for t in vit.token_indexed
             if any(t["used_by"] in _block_nodes(model, x, b) for b in range(first, vit.num_blocks))}
    assert {user for _, user in gathered} == after
    assert len([m for m in rewritten.modules() if isinstance(m, TokenIndexedGather)]) == len(gathered)
    with torch.no_grad():
        out = rewritten(x)
    assert torch.isfinite(out).all() and report.flops_ratio < 0.95


def _block_nodes(model, x, block: int) -> set[str]:
    """Names of the nodes inside attention block ``block`` (between its input and its last residual add)."""
    from vitprune.frontends.capture import capture

    gm = capture(model, x)
    vit = vitprune.inspect_model(model, example_input=x)
    names = [n.name for n in gm.graph.nodes]
    b = vit.blocks[block]
    return set(names[names.index(b.input_node) + 1:names.index(b.residual_adds[-1]) + 1])


def _kept_per_block(rewritten, x) -> dict[int, list[torch.Tensor]]:
    """Each token module's kept indices ``[B, K]`` on ``x``, by the block it sits in front of."""
    blocks = {}
    for op in vitprune.inspect_model(rewritten, example_input=x).token_ops:
        blocks[op["node"]] = op["before_block"]
    mods = {name: rewritten.get_submodule(name) for name in blocks}
    for m in mods.values():
        m.record_kept = True
    with torch.no_grad():
        rewritten(x)
    out: dict[int, list[torch.Tensor]] = {}
    for name, m in mods.items():
        assert isinstance(m, TokenModule)
        out.setdefault(blocks[name], []).append(m.last_kept)
    return out


def moving_model(family: str):
    """``(model, x [3, 3, H, W])`` with weights that move the output: a zero-initialised bias table or a tiny
    head would hide a bug."""
    model, _ = _model(family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name or name.startswith("head."):
                param.normal_(0.0, 1.0)
    size = FAMILIES[family][2]
    return model, torch.randn(3, 3, size, size)


def embed(model, x):
    """``(tokens, RoPE table or None)`` entering the first block of an EVA-02 or BEiT model."""
    t = model.patch_embed(x)
    if hasattr(model, "_pos_embed"):  # EVA: (tokens, RoPE table)
        t, rope = model._pos_embed(t)
        return model.norm_pre(t), rope
    return torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], dim=1), None  # BEiT: no absolute embedding


def _drop_by_hand(model, x, kept, run_block, gather: bool = True):
    """The model's own blocks, one image at a time, on the tokens the rewritten model kept; ``run_block(blk, t,
    positions)`` runs a block with its token-indexed tensor for the grid ``positions`` (or, ``gather=False``, the
    first ``len(positions)`` rows: what a rewrite that forgot to gather would compute)."""
    p = model.num_prefix_tokens
    outs = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            t, rope = embed(model, x[b:b + 1])
            pos = torch.arange(t.shape[1] - p)
            for i, blk in enumerate(model.blocks):
                for k in kept.get(i, []):
                    t = torch.cat([t[:, :p], t[:, p:][:, k[b]]], dim=1)
                    pos = pos[k[b]]
                t = run_block(blk, t, pos if gather else torch.arange(len(pos)), rope)
            outs.append(model.forward_head(model.norm(t)))
    return torch.cat(outs)


def _eva_block(blk, t, pos, rope):
    return blk(t, rope=rope[pos])  # timm's own RoPE path, with the table's rows for the kept tokens


def _beit_block(blk, t, pos, _):
    attn = blk.attn
    full = type(attn)._get_rel_pos_bias(attn)  # [1, H, N, N] of every token
    index = torch.cat([torch.arange(1), 1 + pos])
    attn._get_rel_pos_bias = lambda: full[:, :, index][:, :, :, index]  # the model's own bias, kept rows and columns
    try:
        return blk(t)
    finally:
        del attn._get_rel_pos_bias


@pytest.mark.parametrize("family,run_block", [("eva02", _eva_block), ("beit", _beit_block)])
@pytest.mark.parametrize("method", ["token-drop", "importance-mask"])
def test_a_rope_and_a_relative_bias_model_match_dropping_tokens_by_hand(family, run_block, method):
    """The rewritten model equals the model's own blocks run on the kept tokens with the RoPE rows / bias rows and
    columns of those tokens; forgetting to gather (the first K rows) gives another output."""
    model, x = moving_model(family)
    rewritten, _ = vitprune.rewrite(model, method, example_input=x, **METHODS[method])
    kept = _kept_per_block(rewritten, x)
    with torch.no_grad():
        out = rewritten(x)
    by_hand = _drop_by_hand(model, x, kept, run_block)
    assert torch.allclose(out, by_hand, atol=1e-5), (out - by_hand).abs().max()
    assert not torch.allclose(out, _drop_by_hand(model, x, kept, run_block, gather=False), atol=1e-4)


def test_the_per_image_gather_of_a_bias_keeps_prefix_rows_and_columns():
    from vitprune.ops.token_ops import gather_token_axes

    bias = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)  # 1 prefix token + 4 patches
    positions = torch.tensor([[3, 0], [1, 2]])
    out = gather_token_axes(bias, positions, 1, 4, [(2, True), (3, True)])
    assert out.shape == (2, 2, 3, 3)
    for b in range(2):
        index = [0] + [1 + int(i) for i in positions[b]]
        assert torch.equal(out[b], bias[0][:, index][:, :, index])
    table = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)  # a RoPE table [P, d]
    out = gather_token_axes(table, positions, 1, 4, [(2, False)])
    assert out.shape == (2, 1, 2, 3) and torch.equal(out[1, 0], table[[1, 2]])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "softmax"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_flops_target_is_met_with_the_gathers_in_place(family, fused):
    """At 64 patch tokens, importance-mask ``flops=0.6`` lands on target as counted (the gathers add no FLOPs).

    EVA-02 at 112 px has 64 patches and 64 channels per head: its RoPE tables are square, shaped like a bias,
    and must still be gathered on the token axis only (found by where they flow: not into the softmax)."""
    import timm.layers

    source, args, _ = FAMILIES[family]
    size = {"eva02": 112}.get(family, 128)
    torch.manual_seed(0)
    timm.layers.set_fused_attn(fused)  # read when a model is built
    try:
        model = vitprune.load(source, model_args=dict(args, img_size=size, depth=4)).eval()
    finally:
        timm.layers.set_fused_attn(True)
    x = torch.randn(2, 3, size, size)
    _, report = vitprune.rewrite(model, "importance-mask", example_input=x, flops=0.6, first_block=1)
    assert report.keep_all_worst_node_diff <= 1e-6
    assert report.decisions["token_indexed"]["gathered"]
    assert abs(report.flops_ratio - 0.6) <= 0.01
    assert abs(report.flops_ratio - report.decisions["predicted_flops_ratio"]) <= 2e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_rewritten_model_saves_and_loads_with_the_same_outputs(family, tmp_path):
    """RoPE, the rotation's stack and neg, relative-position MLPs: every op is on the save allowlist."""
    model, x = _model(family)
    rewritten, _ = vitprune.rewrite(model, "importance-mask", example_input=x, keep={1: 0.5})
    vitprune.save(rewritten, tmp_path / "out")
    loaded = vitprune.load(tmp_path / "out")
    assert any(isinstance(m, TokenIndexedGather) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), rewritten(x))
