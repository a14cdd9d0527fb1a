"""Verification that cannot be vacuous, FLOPs that do not depend on the installed torch, and every
reader of the token stream accounted for (issue 9)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import vitprune
from vitprune.errors import PassError, VerificationError
from vitprune.graph.flops import count_flops, flop_counter
from vitprune.ops.modules import TokenModule
from vitprune.passes.base import PASSES, VitPass, insert_on_stream, node_named, register_pass
from vitprune.verify import compare_nodes

# ---------------------------------------------------------------------------------------------
# FLOPs


def test_one_sdpa_call_on_cpu_counts_the_analytic_flops():
    q, k, v = torch.randn(2, 6, 197, 64), torch.randn(2, 6, 150, 64), torch.randn(2, 6, 150, 32)
    counter = flop_counter()
    with torch.no_grad(), counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    analytic = 2 * 2 * 6 * 197 * 150 * 64 + 2 * 2 * 6 * 197 * 150 * 32  # q·kᵀ + attn·v
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.01)


def test_torchvision_mha_block_in_eval_counts_the_analytic_flops():
    from torchvision.models.vision_transformer import EncoderBlock

    b, n, c, heads, mlp = 2, 50, 96, 4, 384
    block = EncoderBlock(heads, c, mlp, dropout=0.0, attention_dropout=0.0).eval()
    x = torch.randn(b, n, c)
    analytic = (2 * b * n * c * 3 * c + 4 * b * n * n * c + 2 * b * n * c * c  # in-proj, attention, out-proj
                + 2 * b * n * c * mlp * 2)  # MLP
    eval_flops = count_flops(block, x)
    assert eval_flops == pytest.approx(analytic, rel=0.01)  # the fused fast path (was 0 for the attention)
    assert count_flops(block.train(), x) == pytest.approx(analytic, rel=0.01)  # the unfused path agrees


def _vit_s16_analytic_flops(batch: int) -> int:
    c, n, patches, hidden = 384, 197, 196, 1536
    per_token = 2 * (c * 3 * c + c * c + 2 * c * hidden)
    blocks = 12 * (per_token * n + 4 * n * n * c)
    return batch * (2 * patches * 3 * 16 * 16 * c + blocks + 2 * c * 1000)


def test_importance_mask_flops_target_as_counted_at_224():
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224")
    _, report = vitprune.rewrite(model, "importance-mask", flops=0.6)
    assert report.flops_before == pytest.approx(_vit_s16_analytic_flops(2), rel=1e-3)  # ≈ 18.4 G, attention in
    assert 0.58 <= report.flops_ratio <= 0.62


def test_flops_target_as_counted_at_518():
    # DINOv2 at 518 px: 1,370 tokens, attention ~30% of the FLOPs; 4 blocks keep the test fast
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch14_dinov2", model_args={"img_size": 518, "depth": 4})
    x = torch.randn(1, 3, 518, 518)
    _, report = vitprune.rewrite(model, "importance-mask", flops=0.6, first_block=1, example_input=x)
    assert abs(report.flops_ratio - 0.6) <= 0.02


# ---------------------------------------------------------------------------------------------
# node-for-node keep-all


class _SwapTwoPatches(TokenModule):
    """A deliberately wrong token op: with every token kept it still swaps patches 0 and 1 (not registered
    as a leaf: nothing outside this test may save or load it)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens, self.num_patches, self._force_keep_all = num_prefix_tokens, 0, False

    def config(self):
        return {"num_prefix_tokens": self.num_prefix_tokens}

    def forward(self, x):
        p = self.num_prefix_tokens
        index = torch.arange(x.shape[1])
        index[p], index[p + 1] = p + 1, p
        return x.index_select(1, index)


if "test-wrong-swap" not in PASSES:
    @register_pass
    class _WrongPass(VitPass):
        name = "test-wrong-swap"

        def call(self, gm):
            vit = self.analysis
            insert_on_stream(gm, node_named(gm, vit.blocks[1].input_node), "swap", _SwapTwoPatches(vit.num_prefix_tokens))
            gm.recompile()
            from torch.fx.passes.infra.pass_base import PassResult
            return PassResult(gm, True)


def _layerscale_vit() -> nn.Module:
    torch.manual_seed(0)
    return vitprune.load("timm:vit_small_patch16_224", model_args=dict(
        img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, init_values=1e-5))


def test_a_wrong_rewrite_of_a_layerscale_model_at_random_init_is_caught_at_its_node():
    model = _layerscale_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    # the output alone cannot tell: LayerScale 1e-5 makes block 1 onwards nearly invisible in it
    gm = vitprune.capture(model)
    swapped = fx.GraphModule(gm, gm.graph)
    vit = vitprune.analyse(swapped, x)
    insert_on_stream(swapped, node_named(swapped, vit.blocks[1].input_node), "swap", _SwapTwoPatches(1))
    swapped.recompile()
    with torch.no_grad():
        assert (swapped(x) - model(x)).abs().max() < 1e-5
    with pytest.raises(VerificationError, match=r"node '(\w+)' differs from the original") as info:
        vitprune.rewrite(model, "test-wrong-swap", example_input=x)
    first = info.value.args[0].split("'")[1]  # the first node block 1 computes from the swapped stream
    swap = node_named(swapped, "swap")
    assert first in {u.name for u in swap.users} and first != "output"



def test_every_output_is_compared():
    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x.sum(1), x.mean(1) * 2

    class TwoOutputsWrongSecond(nn.Module):
        def forward(self, x):
            return x.sum(1), x.mean(1) * 2 + 1e-3

    ref, bad = fx.symbolic_trace(TwoOutputs()), fx.symbolic_trace(TwoOutputsWrongSecond())
    with pytest.raises(VerificationError):
        compare_nodes(ref, bad, torch.randn(2, 5, 3))
    assert compare_nodes(ref, fx.symbolic_trace(TwoOutputs()), torch.randn(2, 5, 3)).nodes_compared == 5


@pytest.mark.parametrize("method,params", [
    ("token-drop", dict(keep_rate=0.5, at_inference=True)),
    ("importance-mask", dict(keep={1: 0.5})),
    ("lifespan-gather", dict(flops=0.7, after_block=1)),
])
def test_real_rewrites_are_exact_node_for_node(method, params):
    x = torch.randn(2, 3, 32, 32)
    _, report = vitprune.rewrite(_layerscale_vit(), method, example_input=x, **params)
    assert report.keep_all_nodes_compared > 100  # every node of the original graph
    assert report.keep_all_worst_node_diff <= 1e-6


# ---------------------------------------------------------------------------------------------
# every reader of the token stream


class _Readers(nn.Module):
    """A small timm ViT run block by block, with one extra reader of the token stream."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = vitprune.load("timm:vit_small_patch16_224",
                                 model_args=dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2))
        self.kind = kind

    def forward(self, x):
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        extra = None
        for i, blk in enumerate(v.blocks):
            x = blk(x)
            if i == 3 and self.kind == "grid":  # a dense head's grid from block 3's patch tokens
                extra = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, 8, 8)
            if i == 3 and self.kind == "static-grid":
                extra = x[:, 1:].transpose(1, 2).reshape(2, 64, 8, 8)
            if i == 4 and self.kind == "token-40":
                extra = x[:, 40]
        logits = v.head(v.norm(x)[:, 0])
        if self.kind == "token-40":
            return logits + extra.sum(-1, keepdim=True)
        return logits, extra


@pytest.mark.parametrize("kind", ["grid", "static-grid", "token-40"])
@pytest.mark.parametrize("method,params", [("token-drop", dict(keep_rate=0.5, at_inference=True)),
                                           ("importance-mask", dict(keep={2: 0.5})), ("token-merge", dict(r=8))])
def test_a_reader_outside_the_blocks_reads_every_token_back_in_place(kind, method, params):
    """A pass that drops or merges tokens restores them before the reader (tests/test_token_restore.py and
    tests/test_token_merge_families.py check the values)."""
    model = _Readers(kind).eval()
    x = torch.randn(2, 3, 32, 32)
    vit = vitprune.inspect_model(model, example_input=x)
    assert [r["after_block"] for r in vit.stream_readers] == [4 if kind == "token-40" else 3]
    rewritten, report = vitprune.rewrite(model, method, example_input=x, **params)
    assert report.decisions["token_restore"]["restored_before"] == [vit.stream_readers[0]["node"]]
    assert report.keep_all_worst_node_diff <= 1e-6
    with torch.no_grad():
        out, ref = rewritten(x), model(x)
    if kind != "token-40":
        assert out[1].shape == ref[1].shape  # the grid of every patch, as before


def test_a_reader_refusal_is_one_line_on_the_command_line(tmp_path, cli_inprocess):
    from test_token_restore import ReadsInsideTheStream

    path = tmp_path / "reads_inside.pt"
    torch.save(ReadsInsideTheStream().eval(), path)
    code, out, err = cli_inprocess("rewrite", path, "--trust-pickle", "--input-size", "3,32,32", "--method",
                                   "token-merge", "--r", "8", "-o", tmp_path / "out")
    assert code != 0 and err.count("\n") == 1 and "indexes the token axis by position inside block 2" in err
    assert not (tmp_path / "out").exists()


def test_a_rewritten_model_with_two_outputs_saves_from_the_command_line(tmp_path, cli_inprocess):
    """The save check compares every output (here the logits and block 3's grid), not only a single tensor."""
    path = tmp_path / "dense.pt"
    torch.save(_Readers("static-grid").eval(), path)
    code, out, err = cli_inprocess("rewrite", path, "--trust-pickle", "--input-size", "3,32,32", "--method",
                                   "token-merge", "--r", "8", "-o", tmp_path / "out")
    assert code == 0, err
    loaded = vitprune.load(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, grid = loaded(x)
    assert logits.shape == (2, 1000) and grid.shape == (2, 64, 8, 8)


def test_a_forward_that_draws_random_numbers_is_refused_as_such():
    """ViTMAE shuffles its patches by ``argsort(rand)`` even at ``mask_ratio=0``: verification must say that the
    model is random, not that the rewrite is wrong."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, mask_ratio=0.0)
    model = transformers.ViTMAEModel(cfg).eval()
    with pytest.raises(VerificationError, match=r"draws random numbers in eval mode \(node 'rand', aten::rand\)"):
        vitprune.rewrite(model, "token-drop", keep_rate=0.5, at_inference=True, example_input=torch.randn(2, 3, 32, 32))
