"""token-merge (ToMe, arXiv 2210.09461): merge semantics, a hand-made reference with the model's own blocks,
keep-all exactness with LayerScale, FLOPs target, prefix tokens, compile, ONNX, save/load, refusals."""

import pytest
import torch

import vitprune
from conftest import FAMILIES, small_model
from vitprune.ops import token_ops
from vitprune.ops.modules import ProportionalAttentionMask, TokenMerge, token_modules

# LayerScale (init_values) on: the blocks keep it, unlike ToMe's timm patch
LS = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, init_values=1e-5)


def _layerscale_model(**extra):
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224", model_args={**LS, **extra})
    with torch.no_grad():  # at init LayerScale is 1e-5: the blocks would barely matter
        for blk in model.blocks:
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def merged():
    """(original, rewritten, report): the LayerScale model, 8 tokens merged in each of its 4 blocks."""
    model = _layerscale_model()
    rewritten, report = vitprune.rewrite(model, "token-merge", r=8)
    return model, rewritten.eval(), report


def test_merge_is_tomes_size_weighted_bipartite_merge():
    torch.manual_seed(0)
    b, prefix, patches, c, r = 2, 1, 9, 5, 3
    metric, x = torch.randn(b, prefix + patches, 4), torch.randn(b, prefix + patches, c)
    size = torch.randint(1, 4, (b, prefix + patches, 1)).float()
    kept, src, dst = token_ops.bipartite_soft_matching(metric, prefix, r)
    out, out_size = token_ops.merge_tokens(x, size, kept, src, dst)
    for i in range(b):  # merge.py by hand: A = even patches, B = odd ones; the r best-matched A tokens merge
        m = torch.nn.functional.normalize(metric[i, prefix:], dim=-1)
        sim = m[0::2] @ m[1::2].T
        best, match = sim.max(dim=1)
        gone = best.argsort(descending=True)[:r]
        expect_x, expect_s = x[i] * size[i], size[i].clone()
        for a in gone.tolist():
            d = prefix + 2 * int(match[a]) + 1
            expect_x[d] += x[i, prefix + 2 * a] * size[i, prefix + 2 * a]
            expect_s[d] += size[i, prefix + 2 * a]
        stay = [t for t in range(prefix + patches) if t not in {prefix + 2 * a for a in gone.tolist()}]
        assert kept[i].tolist() == stay  # original order kept, prefix first
        torch.testing.assert_close(out[i], (expect_x / expect_s)[stay])
        torch.testing.assert_close(out_size[i], expect_s[stay])
    torch.testing.assert_close(out[:, :prefix], x[:, :prefix])  # prefix tokens: never merged, nothing merges in
    assert torch.equal(out_size[:, :prefix], size[:, :prefix])
    kept, src, dst = token_ops.bipartite_soft_matching(metric, prefix, 0)
    same, ones = token_ops.merge_tokens(x, torch.ones_like(size), kept, src, dst)
    assert torch.equal(same, x) and torch.equal(ones, torch.ones_like(size))  # r = 0: bit for bit


def test_keep_all_is_exact_and_layerscale_stays(merged):
    model, rewritten, report = merged
    assert report.keep_all_nodes_compared > 0 and report.keep_all_worst_node_diff <= 1e-5
    assert report.keep_all_max_abs_diff <= 1e-5
    d = report.decisions
    assert d["merges"] == {"0": 8, "1": 8, "2": 8, "3": 8}
    assert d["tokens_per_block"] == [65, 57, 49, 41] and d["tokens_after_merge"] == [57, 49, 41, 33]
    assert abs(report.flops_ratio - d["predicted_flops_ratio"]) < 1e-3  # the FLOPs model is the counter's
    gammas = {n.target for n in rewritten.graph.nodes if n.op == "get_attr" and n.target.endswith("gamma")}
    assert len(gammas) == 2 * len(model.blocks)  # every LayerScale of the original is still in the graph
    mods = token_modules(rewritten)
    assert [type(m) for m in mods] == [TokenMerge] * 4 and [m.r for m in mods] == [8] * 4
    assert len([m for m in rewritten.modules() if isinstance(m, ProportionalAttentionMask)]) == 3
    assert vitprune.inspect_model(rewritten).blocks[3].tokens == 41  # the rewritten graph still analyses


def _hand_made_tome(model, x, r, prefix=1):
    """ToMe by hand with the model's own sub-modules: each block's attention (proportional attention through
    its attn_mask), then the merge on its keys (read off k_norm), then its MLP; LayerScale kept."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = torch.ones(h.shape[0], h.shape[1], 1)
    for i, blk in enumerate(model.blocks):
        keys = []
        hook = blk.attn.k_norm.register_forward_hook(lambda m, inp, out: keys.append(out))
        mask = size.log().transpose(1, 2).unsqueeze(1) if i else None
        h = h + blk.ls1(blk.attn(blk.norm1(h), attn_mask=mask))
        hook.remove()
        kept, src, dst = token_ops.bipartite_soft_matching(keys[0].mean(dim=1), prefix, r)
        h, size = token_ops.merge_tokens(h, size, kept, src, dst)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.forward_head(model.norm(h))


def test_matches_a_hand_made_reference(merged):
    model, rewritten, _ = merged
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, got, original = _hand_made_tome(model, x, 8), rewritten(x), model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - original).abs().max() > 1e-3  # and merging changed the output: the check is not vacuous


def test_r0_is_identity_and_kept_patches_show_the_merges(merged):
    model = _layerscale_model()
    same, report = vitprune.rewrite(model, "token-merge", r=0)
    assert report.decisions["merges"] == {} and not token_modules(same)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same.eval()(x), model(x))
    from vitprune.ship.show import kept_patches

    stages = kept_patches(merged[1], x[:1])
    assert [len(s["kept"]) for s in stages] == [56, 48, 40, 32]  # surviving patch tokens after each merge


def test_flops_target_at_224():
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224")
    _, report = vitprune.rewrite(model, "token-merge", flops=0.6)
    assert abs(report.flops_ratio - 0.6) <= 0.01, report.flops_ratio  # constant r = 13 alone lands at 0.617
    assert abs(report.flops_ratio - report.decisions["predicted_flops_ratio"]) < 0.005
    # ToMe's r = 13, then one token fewer in the later blocks: the finest integer step per block
    assert report.decisions["r"] == 13 and set(report.decisions["merges"].values()) <= {12, 13, 14}


def test_prefix_tokens_are_never_merged():
    model = small_model("registers")  # 4 registers and CLS in front of 16 patches
    rewritten, report = vitprune.rewrite(model, "token-merge", r=4)
    assert report.decisions["num_prefix_tokens"] == 5 and report.keep_all_worst_node_diff <= 1e-5
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out[0])))
             for m in token_modules(rewritten)]
    with torch.no_grad():
        rewritten.eval()(torch.randn(2, 3, 56, 56))
    for h in hooks:
        h.remove()
    assert [tuple(o.shape[1:2]) for _, o in seen] == [(17,), (13,)]
    for x, out in seen:
        assert torch.equal(out[:, :5], x[:, :5])


def test_mean_pool_readout_merges_and_stays_exact():
    rewritten, report = vitprune.rewrite(small_model("gap"), "token-merge", r=6)
    assert report.keep_all_worst_node_diff <= 1e-5 and report.decisions["tokens_per_block"] == [64, 58]


def _other_frontends():
    """Models the other passes accept through torch.export: Hugging Face ViT / DINOv2 / CLIP, torchvision."""
    from test_frontends import _hf, _torchvision  # the same small models the other passes are tested on

    return {"hf_vit": lambda: _hf("vit"), "hf_dinov2_classifier": lambda: _hf("dinov2_classifier"),
            "hf_clip_vision": lambda: _hf("clip_vision"), "torchvision": _torchvision}


@pytest.mark.parametrize("family", sorted(FAMILIES) + ["hf_vit", "hf_dinov2_classifier", "hf_clip_vision", "torchvision"])
def test_every_family_the_other_passes_accept_is_exact_with_every_token_kept(family):
    model = small_model(family).eval() if family in FAMILIES else _other_frontends()[family]()
    size = 56 if family in ("registers", "dinov2") else 32
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    rewritten, report = vitprune.rewrite(model, "token-merge", r=4, example_input=x)
    assert report.keep_all_nodes_compared > 50 and report.keep_all_worst_node_diff <= 1e-5, report.keep_all_worst_node
    assert abs(report.flops_ratio - report.decisions["predicted_flops_ratio"]) < 2e-3  # predicted as counted
    assert report.flops_ratio < 0.97 and min(report.decisions["merges"].values()) == 4
    with torch.no_grad():
        out, ref = rewritten.eval()(x), model(x)
    out, ref = (o if torch.is_tensor(o) else o[0] for o in (out, ref))
    assert torch.isfinite(out).all() and out.shape == ref.shape


def test_compile_serves_every_batch_size_with_one_graph(merged):
    from torch._dynamo.utils import counters

    rewritten = merged[1]
    torch._dynamo.reset()
    counters.clear()
    fast = vitprune.compile(rewritten, backend="eager")  # recompiles are dynamo's guards, whatever the backend
    with torch.no_grad():
        for b in (2, 3, 5):
            x = torch.randn(b, 3, 32, 32)
            torch.testing.assert_close(fast(x), rewritten(x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
    assert not counters["recompiles"]


def test_onnx_export_parity_without_scatter(tmp_path):
    import onnx

    rewritten, _ = vitprune.rewrite(_layerscale_model(depth=3), "token-merge", r=[8, 0, 4])
    report = vitprune.export_onnx(rewritten, tmp_path / "m.onnx")
    assert all(d <= 1e-4 for d in report.parity.values()), report.parity
    assert not {"ScatterElements", "ScatterND", "GatherElements"} & set(report.op_types)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    tokens = {d.dim_value for v in proto.graph.value_info for d in v.type.tensor_type.shape.dim[1:2]}
    assert {57, 53} <= tokens  # static per-block token counts (block 2 attends with block 0's sizes)


def test_save_load_round_trip(merged, tmp_path):
    rewritten = merged[1]
    vitprune.save(rewritten, tmp_path / "tm")
    again = vitprune.load(tmp_path / "tm").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), rewritten(x))
    assert [m.config() for m in token_modules(again)] == [m.config() for m in token_modules(rewritten)]


def test_refusals():
    import timm.layers

    model = _layerscale_model()  # 64 patch tokens, 4 blocks
    with pytest.raises(vitprune.PassError, match="more than half of its 64 patch tokens"):
        vitprune.rewrite(model, "token-merge", r=33)
    with pytest.raises(vitprune.PassError, match="r=13 in block 2 merges more than half of its 24 patch tokens"):
        vitprune.rewrite(model, "token-merge", r=[24, 16, 13, 0])
    with pytest.raises(vitprune.PassError, match="r=64 in block 0 leaves fewer than 2 tokens"):
        vitprune.rewrite(model, "token-merge", r=[64, 0, 0, 0])
    with pytest.raises(vitprune.PassError, match="one count per block"):
        vitprune.rewrite(model, "token-merge", r=[4, 4])
    with pytest.raises(vitprune.PassError, match="exactly one of"):
        vitprune.rewrite(model, "token-merge", r=4, flops=0.5)
    with pytest.raises(vitprune.PassError, match="below"):
        vitprune.rewrite(model, "token-merge", flops=0.05)
    with pytest.raises(vitprune.PassError, match="negative"):
        vitprune.rewrite(model, "token-merge", r=-1)
    from vitprune.passes import PASSES

    assert set(PASSES["token-merge"].needs) == {"readers_restorable", "token_indexed_gatherable", "no_token_ops"}
    timm.layers.set_fused_attn(False)
    try:
        torch.manual_seed(0)
        explicit = vitprune.load("timm:vit_small_patch16_224", model_args=FAMILIES["vit_cls"][1])
    finally:
        timm.layers.set_fused_attn(True)
    with pytest.raises(vitprune.PassError, match="block 0 uses matmul-softmax"):
        vitprune.rewrite(explicit, "token-merge", r=2)


def test_an_attention_mask_of_its_own_is_kept_under_proportional_attention():
    """An SDPA that already has a mask keeps it: log(size) is added to a float mask (BEiT's bias: end to end in
    test_token_merge_families), and a boolean mask still blocks what it blocked."""
    from vitprune.passes import make_pass, run_passes

    size = torch.tensor([[[1.0], [2.0], [3.0]]])  # [B=1, N=3, 1]
    bias = torch.randn(1, 2, 3, 3)
    prop = ProportionalAttentionMask()
    torch.testing.assert_close(prop(size, bias), bias + size.log().reshape(1, 1, 1, 3))
    allowed = torch.tensor([[True, False, True]]).reshape(1, 1, 1, 3)
    out = prop(size, allowed)
    assert out[..., 1].eq(float("-inf")).all() and torch.equal(out[..., [0, 2]], size.log().reshape(1, 1, 1, 3)[..., [0, 2]])

    gm = vitprune.capture(_layerscale_model())
    sdpa = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)][1]
    with gm.graph.inserting_before(sdpa):  # a float mask that shifts every score alike: softmax does not move
        own = gm.graph.call_function(torch.full, ((1, 1), 0.25))
    sdpa.update_kwarg("attn_mask", own)
    gm.recompile()
    x = torch.randn(2, 3, 32, 32)
    with_mask, _ = run_passes(gm, [make_pass("token-merge", r=2)], x)
    mask = next(n for n in with_mask.graph.nodes if n.name == sdpa.name).kwargs["attn_mask"]
    assert isinstance(with_mask.get_submodule(mask.target), ProportionalAttentionMask) and own in mask.args
    plain, _ = run_passes(vitprune.capture(_layerscale_model()), [make_pass("token-merge", r=2)], x)
    with torch.no_grad():
        torch.testing.assert_close(with_mask(x), plain(x))
    gm2, _ = run_passes(vitprune.capture(_layerscale_model()),
                        [make_pass("token-merge", r=2, proportional_attention=False)], x)
    assert not [m for m in gm2.modules() if isinstance(m, ProportionalAttentionMask)]


def test_cli(cli_inprocess, tmp_path):
    import json

    small = [a for k, v in FAMILIES["vit_cls"][1].items() for a in ("--model-arg", f"{k}={v}")]
    code, out, err = cli_inprocess("rewrite", "timm:vit_small_patch16_224", *small, "--method", "token-merge",
                                   "--r", "8,4", "--no-proportional-attention", "-o", tmp_path / "tm", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["decisions"]["merges"] == {"0": 8, "1": 4} and not doc["decisions"]["proportional_attention"]
    code, _, err = cli_inprocess("rewrite", "timm:vit_small_patch16_224", *small, "--method", "token-merge",
                                 "-o", tmp_path / "none")
    assert code == 1 and "exactly one of" in err
    code, out, err = cli_inprocess("rewrite", "timm:vit_small_patch16_224", *small, "--method", "token-merge",
                                   "--r", "4", "-o", tmp_path / "text")
    assert code == 0, err  # the text summary names the merges per block
    assert "token-merge (tokens merged: block 0: 4, block 1: 4): tokens per block 65, 61" in out
    assert "G per image, eval" in out  # FLOPs per image, not per example batch
