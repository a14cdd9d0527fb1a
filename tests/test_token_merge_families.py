"""token-merge on the families the other passes accept beyond plain ViTs: RoPE tables (EVA-02, timm's RoPE
ViT) and relative-position biases (BEiT, vit_relpos) follow the merged tokens (a merged token sits at its
destination's grid position), and dense readers get every token back unmerged (ToMe for Stable Diffusion,
arXiv 2303.17604). Checked against the models' own blocks run with the merge done by hand."""

from __future__ import annotations

import pytest
import torch

import vitprune
from test_token_indexed import FAMILIES as INDEXED
from test_token_indexed import _model, embed, moving_model
from test_token_restore import MODELS as DENSE
from test_token_restore import Features, Segmenter
from vitprune.ops import token_ops
from vitprune.ops.modules import TokenIndexedGather, TokenMerge, TokenRestore, TokenUnmerge

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", sorted(INDEXED) + sorted(DENSE))
def test_every_token_indexed_and_dense_family_is_exact_at_r0_and_with_every_token_kept(family):
    model, x = _model(family) if family in INDEXED else (DENSE[family]().eval(), torch.randn(2, 3, 32, 32))
    rewritten, report = vitprune.rewrite(model, "token-merge", example_input=x, r=4)
    assert report.keep_all_nodes_compared > 50 and report.keep_all_worst_node_diff <= 1e-6
    assert abs(report.flops_ratio - report.decisions["predicted_flops_ratio"]) < 2e-3
    # the merge works out who holds each patch (for the unmerge) only when a reader needs every token back
    merges = [m for m in rewritten.modules() if isinstance(m, TokenMerge)]
    assert merges and all(m.return_kept and m.return_sources == (family in DENSE) for m in merges)
    if family in INDEXED:
        assert report.decisions["token_indexed"]["gathered"]
        assert any(isinstance(m, TokenIndexedGather) for m in rewritten.modules())
    else:
        assert report.decisions["token_restore"]["restored_before"][-1] == "readout"
        assert any(isinstance(m, TokenUnmerge) for m in rewritten.modules())
        assert not any(isinstance(m, TokenRestore) for m in rewritten.modules())
    with torch.no_grad():
        out, ref = rewritten(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all() and report.flops_ratio < 0.9
    same, _ = vitprune.rewrite(model, "token-merge", example_input=x, r=0)  # r = 0 inserts nothing
    with torch.no_grad():
        assert torch.equal(same(x), ref)


def _record_matches(rewritten, x) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(kept, src, dst)`` of every merge of ``rewritten`` on ``x``, in graph order."""
    seen = []
    original = token_ops.bipartite_soft_matching

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    token_ops.bipartite_soft_matching = spy
    try:
        with torch.no_grad():
            out = rewritten(x)
    finally:
        token_ops.bipartite_soft_matching = original
    return out, seen


def _merge_by_hand(model, x, merges: dict[int, int], matches, run_attention, gather: bool = True):
    """The model's own attention and MLP, one image at a time, with the recorded matches merged in between
    (:func:`token_ops.merge_tokens`, tested against ToMe's merge.py) and ``log(size)`` on the keys after the
    first merge; ``run_attention(blk, t, positions, table, mask)`` gives a block's attention branch with the
    RoPE rows / bias rows and columns of the grid ``positions`` (``gather=False``: the first ``len(positions)``).
    Returns the logits."""
    p, outs = model.num_prefix_tokens, []
    with torch.no_grad():
        for b in range(x.shape[0]):
            t, table = embed(model, x[b:b + 1])
            pos, size, done = torch.arange(t.shape[1] - p), torch.ones(1, t.shape[1], 1), 0
            for i, blk in enumerate(model.blocks):
                mask = size.log().transpose(1, 2).unsqueeze(1) if done else None
                a = run_attention(blk, blk.norm1(t), pos if gather else torch.arange(len(pos)), table, mask)
                t = t + (blk.gamma_1 * a if blk.gamma_1 is not None else a)
                if i in merges:
                    kept, src, dst = (m[b:b + 1] for m in matches[done])
                    t, size = token_ops.merge_tokens(t, size, kept, src, dst)
                    pos, done = pos[kept[0, p:] - p], done + 1
                m = blk.mlp(blk.norm2(t))
                t = t + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
            outs.append(model.forward_head(model.norm(t)))
    return torch.cat(outs)


def _eva_attention(blk, t, pos, rope, mask):
    return blk.attn(t, rope=rope[pos], attn_mask=mask)  # timm's own RoPE path, the table's rows for those tokens


def _beit_attention(blk, t, pos, _, mask):
    attn = blk.attn
    full = type(attn)._get_rel_pos_bias(attn)  # [1, H, N, N] of every token
    index = torch.cat([torch.arange(1), 1 + pos])
    attn._get_rel_pos_bias = lambda: full[:, :, index][:, :, :, index]  # the model's own bias, those rows and columns
    try:
        return attn(t, shared_rel_pos_bias=mask)  # BEiT adds a shared bias to its own: log(size) here
    finally:
        del attn._get_rel_pos_bias


@pytest.mark.parametrize("family,run_attention", [("eva02", _eva_attention), ("beit", _beit_attention)])
def test_a_rope_and_a_relative_bias_model_match_merging_by_hand(family, run_attention):
    """The rewritten model equals the model's own blocks with the same matches merged by hand, RoPE rows and bias
    rows/columns at each merged token's destination position and proportional attention added to BEiT's bias;
    forgetting to gather (the first K rows) gives another output."""
    model, x = moving_model(family)
    rewritten, report = vitprune.rewrite(model, "token-merge", example_input=x, r=[4, 3, 0])
    merges = {int(b): r for b, r in report.decisions["merges"].items()}
    assert merges == {0: 4, 1: 3}
    out, matches = _record_matches(rewritten, x)
    assert len(matches) == 2
    by_hand = _merge_by_hand(model, x, merges, matches, run_attention)
    assert torch.allclose(out, by_hand, atol=1e-5), (out - by_hand).abs().max()
    assert not torch.allclose(out, _merge_by_hand(model, x, merges, matches, run_attention, gather=False), atol=1e-4)


def _holders_by_hand(matches, num_prefix_tokens: int, num_patches: int) -> list[list[int]]:
    """Per image, for each grid position, the index of the patch token holding it after every merge: followed
    one token at a time through the recorded ``(kept, src, dst)``."""
    p, out = num_prefix_tokens, []
    for b in range(matches[0][0].shape[0]):
        where = list(range(num_patches))  # grid position -> index among the current patch tokens
        for kept, src, dst in matches:
            kept, src, dst = kept[b].tolist(), src[b].tolist(), dst[b].tolist()
            place = {tok: i - p for i, tok in enumerate(kept)}
            into = dict(zip(src, dst))
            where = [place[into.get(p + w, p + w)] for w in where]
        out.append(where)
    return out


def test_a_dense_readout_gets_every_token_back_unmerged():
    """``forward_features`` of a merged model: each grid position carries the final features of the merged token
    that holds it, the CLS token its own; the segmentation head sees a full grid."""
    model, x = Features().eval(), torch.randn(2, 3, 32, 32)
    rewritten, report = vitprune.rewrite(model, "token-merge", example_input=x, r=[8, 8, 4, 0])
    out, matches = _record_matches(rewritten, x)
    assert out.shape == (2, 1 + 64, 64) and len(matches) == 3
    # the merged stream, taken before the unmerge, is what the grid positions copy
    unmerge = next(n for n in rewritten.graph.nodes if n.op == "call_module"
                   and isinstance(rewritten.get_submodule(n.target), TokenUnmerge))
    stream = {}
    hook = rewritten.get_submodule(unmerge.target).register_forward_hook(
        lambda _m, args, _o: stream.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            rewritten(x)
    finally:
        hook.remove()
    merged = stream["x"]
    assert merged.shape[1] == 1 + 64 - 20
    holders = _holders_by_hand(matches, 1, 64)
    for b in range(2):
        torch.testing.assert_close(out[b, 1:], model.vit.norm(merged[b:b + 1])[0, 1:][holders[b]])
        torch.testing.assert_close(out[b, 0], model.vit.norm(merged[b:b + 1])[0, 0])
        assert len(set(holders[b])) == 64 - 20  # every merged token holds at least one grid position
    seg, _ = vitprune.rewrite(Segmenter().eval(), "token-merge", example_input=x, r=[8, 8, 4, 0])
    with torch.no_grad():
        assert seg(x).shape == (2, 5, 32, 32)


def test_an_onnx_export_of_a_merged_dense_model_matches(tmp_path):
    rewritten, _ = vitprune.rewrite(Segmenter().eval(), "token-merge", example_input=torch.randn(2, 3, 32, 32),
                                    r=[8, 8, 4, 0])
    report = vitprune.export_onnx(rewritten, tmp_path / "m.onnx")
    assert all(d <= 1e-4 for d in report.parity.values()), report.parity


@pytest.mark.parametrize("family", ["beit", "segmenter"])
def test_a_merged_model_saves_and_loads_with_the_same_outputs(family, tmp_path):
    model, x = _model(family) if family in INDEXED else (DENSE[family]().eval(), torch.randn(2, 3, 32, 32))
    rewritten, _ = vitprune.rewrite(model, "token-merge", example_input=x, r=4)
    vitprune.save(rewritten, tmp_path / "out")
    loaded = vitprune.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(x), rewritten(x))
