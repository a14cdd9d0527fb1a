"""importance-mask (Patch Slimming): schedules, dynamic top-k by attention, static calibration, nesting."""

import pytest
import torch

import vitprune
from conftest import FAMILIES_224, rewrite_family
from vitprune.errors import PassError, VitpruneError
from vitprune.ops.modules import AttentionTopK, StaticTokenSelect, token_modules
from vitprune.graph.keep_counts import counts_from_rates, parse_keep
from vitprune.ship.show import kept_patches



def photos(size=224):
    from skimage import data, transform

    imgs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    x = torch.stack([torch.tensor(transform.resize(p, (size, size), anti_aliasing=True), dtype=torch.float32)
                     .permute(2, 0, 1) for p in imgs])
    return (x - 0.5) / 0.5


def test_keep_schedule_is_nested_ints():
    assert parse_keep("3:0.7,6:0.7,9:0.7") == {3: 0.7, 6: 0.7, 9: 0.7}
    assert counts_from_rates(196, 12, {3: 0.7, 6: 0.7, 9: 0.7}) == {3: 137, 6: 95, 9: 66}
    for bad in ("3", "a:0.5", "3:1.5", "3:0"):
        with pytest.raises(VitpruneError):
            parse_keep(bad)
    with pytest.raises(VitpruneError, match="blocks 0..11"):
        counts_from_rates(196, 12, {12: 0.5})


@pytest.mark.parametrize("family", sorted(FAMILIES_224))
def test_flops_target_on_each_family(family):
    rewritten, report = rewrite_family(family, "importance-mask", flops=0.6)
    assert 0.57 <= report.flops_ratio <= 0.63, report.flops_ratio
    assert abs(report.flops_ratio - report.decisions["predicted_flops_ratio"]) < 0.01  # the model predicts the counter
    assert report.keep_all_max_abs_diff <= 1e-5
    assert report.decisions["score"] == "distinct"  # the default: chosen by measured fidelity (passes/base.py)
    tokens = report.decisions["tokens_per_block"]
    assert tokens[:3] == [tokens[0]] * 3 and all(a >= b for a, b in zip(tokens, tokens[1:]))  # first 3 intact, nested
    after = vitprune.inspect_model(rewritten)
    assert [b.tokens for b in after.blocks] == tokens  # the graph really runs those counts


def test_dynamic_keeps_top_cls_attention_patches():
    torch.manual_seed(0)
    b, h, n, d, prefix = 2, 3, 11, 4, 1
    q, k, x = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, n, 8)
    mod = AttentionTopK(num_prefix_tokens=prefix, num_patches=n - prefix, keep_count=4, scale=d ** -0.5)
    mod.record_kept = True
    out = mod(x, q, k)
    attn = torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1).mean(1)[:, 0, prefix:]  # full map, CLS row
    expected = attn.topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(mod.last_kept, expected)
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(out[:, 1:], torch.stack([x[i, prefix + expected[i]] for i in range(b)]))


@pytest.mark.parametrize("score", ["mean-query", "attention-received", "l1", "l2", "cls-norm", "distinct"])
def test_each_score_keeps_the_patches_it_rates_highest(score):
    torch.manual_seed(1)
    b, h, n, d, prefix = 2, 3, 11, 4, 1
    q, k, x = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, n, 8)
    attn = torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1)  # the full map, [B, H, N, N]
    norms = x[:, prefix:].norm(dim=-1)
    expected_scores = {
        "mean-query": torch.softmax(q.mean(2, keepdim=True) @ k.transpose(-2, -1) * d ** -0.5, -1).mean(1)[:, 0, prefix:],
        "attention-received": attn.mean(dim=(1, 2))[:, prefix:],
        "l1": x[:, prefix:].abs().sum(-1),
        "l2": norms,
        "cls-norm": attn.mean(1)[:, 0, prefix:] * norms,
        # by hand: 1 - the highest cosine similarity to another patch token
        "distinct": torch.stack([torch.stack([
            torch.round((1 - max(torch.cosine_similarity(x[i, prefix + a], x[i, prefix + c], dim=0)
                                 for c in range(n - prefix) if c != a)) * 1024) * (n - prefix) + (n - prefix - 1 - a)
            for a in range(n - prefix)]) for i in range(b)]),
    }[score]
    mod = AttentionTopK(num_prefix_tokens=prefix, num_patches=n - prefix, keep_count=4, scale=d ** -0.5, score=score)
    mod.record_kept = True
    out = mod(x, q, k)
    expected = expected_scores.topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(mod.last_kept, expected)
    assert torch.equal(out[:, 1:], torch.stack([x[i, prefix + expected[i]] for i in range(b)]))
    if score not in ("mean-query", "distinct"):  # the same score from an explicit attention map (source="attn")
        from_map = AttentionTopK(prefix, n - prefix, 4, score=score, source="attn")
        from_map.record_kept = True
        from_map(x, attn)
        assert torch.equal(from_map.last_kept, expected)


def test_score_choice_is_checked_against_the_readout():
    _, report = rewrite_family("vit_small", "importance-mask", flops=0.7, score="l2")
    assert report.decisions["score"] == "l2" and report.keep_all_worst_node_diff <= 1e-5
    with pytest.raises(vitprune.PassError, match="reads no CLS token"):
        rewrite_family("gap", "importance-mask", flops=0.7, score="cls-norm")
    with pytest.raises(vitprune.PassError, match="unknown score"):
        rewrite_family("vit_small", "importance-mask", flops=0.7, score="entropy")


def test_dynamic_stages_are_nested_and_image_dependent():
    model = vitprune.load("timm:vit_small_patch16_224", model_args=dict(depth=6))
    rewritten, report = vitprune.rewrite(model, "importance-mask", keep="2:0.5,4:0.5")
    assert report.decisions["keep_counts"] == {"2": 98, "4": 49}
    assert [type(m) for m in token_modules(rewritten)] == [AttentionTopK, AttentionTopK]
    x = photos()
    stages = kept_patches(rewritten, x[:1])
    assert [len(s["kept"]) for s in stages] == [98, 49]
    assert set(stages[1]["kept"].tolist()) <= set(stages[0]["kept"].tolist())  # nested masks
    other = kept_patches(rewritten, x[2:3])
    assert set(other[1]["kept"].tolist()) != set(stages[1]["kept"].tolist())  # input-dependent


def test_static_mode_from_a_calibration_folder(tmp_path):
    from PIL import Image

    x = photos()
    for i, img in enumerate(x):
        Image.fromarray(((img.permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    model = vitprune.load("timm:vit_small_patch16_224", model_args=dict(depth=6))
    rewritten, report = vitprune.rewrite(model, "importance-mask", mode="static", calibration=tmp_path, flops=0.6,
                                         first_block=2)
    assert 0.57 <= report.flops_ratio <= 0.63 and report.keep_all_max_abs_diff <= 1e-5
    mods = token_modules(rewritten)
    assert mods and all(isinstance(m, StaticTokenSelect) for m in mods)
    a, b = kept_patches(rewritten, x[:1]), kept_patches(rewritten, x[3:4])
    assert all(torch.equal(s["kept"], t["kept"]) for s, t in zip(a, b))  # image-independent
    for s, t in zip(a, a[1:]):
        assert set(t["kept"].tolist()) <= set(s["kept"].tolist())  # nested
    # no scoring at run time: the rewritten graph has exactly the original's softmax-free SDPA calls
    assert "topk" not in rewritten.code and "softmax" not in rewritten.code
    vitprune.save(rewritten, tmp_path / "saved")
    again = vitprune.load(tmp_path / "saved")
    again.eval()
    rewritten.eval()
    with torch.no_grad():
        assert torch.equal(again(x), rewritten(x))


def test_static_significance_follows_the_attention_product():
    from vitprune.passes.importance_mask import nested_static_sets, significance

    model = vitprune.load("timm:vit_small_patch16_224",
                          model_args=dict(img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2))
    vit = vitprune.inspect_model(model)
    n = vit.num_tokens  # 1 CLS + 16 patches
    eye = torch.eye(n)
    a2 = eye.clone()
    a2[0] = 0
    a2[0, 1 + 5] = 1.0  # in the last block the CLS token reads patch 5
    a1 = eye.clone()
    a1[1 + 5] = 0
    a1[1 + 5, 1 + 9] = 1.0  # in block 1, patch 5 reads patch 9
    sig = significance(vit, [eye, a1, a2])
    assert int(sig[2][1:].argmax()) == 5  # before the last block, patch 5 matters
    assert set(sig[1][1:].topk(2).indices.tolist()) == {5, 9}  # before block 1, through the product: 5 and 9
    sets = nested_static_sets(vit, {1: 4, 2: 2}, sig)
    assert 5 in sets[2] and {5, 9} <= set(sets[1]) and set(sets[2]) <= set(sets[1])


def test_refusals():
    model = vitprune.load("timm:vit_small_patch16_224", model_args=dict(depth=6))
    with pytest.raises(PassError, match="exactly one"):
        vitprune.rewrite(model, "importance-mask", keep="3:0.5", flops=0.5)
    with pytest.raises(PassError, match="calibration"):
        vitprune.rewrite(model, "importance-mask", mode="static", flops=0.6)
    with pytest.raises(PassError, match="below"):
        vitprune.rewrite(model, "importance-mask", flops=0.1)


def test_cli_flops_json(cli_inprocess, tmp_path):
    import json

    code, out, err = cli_inprocess("rewrite", "timm:vit_small_patch16_224", "--method", "importance-mask",
                                   "--flops", "0.6", "-o", tmp_path / "vs_im", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert 0.57 <= d["flops_after"] / d["flops_before"] <= 0.63 and d["keep_all_max_abs_diff"] <= 1e-5
    code, _, err = cli_inprocess("rewrite", "timm:vit_small_patch16_224", "--flops", "0.6", "-o", tmp_path / "x")
    assert code == 2 and "--flops does not apply to --method token-drop" in err


def test_cli_offers_every_score():
    from vitprune.cli.main import rewrite
    from vitprune.ops.token_ops import SCORES

    option = next(p for p in rewrite.params if p.name == "score")
    assert tuple(option.type.choices) == ("auto", *SCORES)  # the CLI's literal list (no torch import) is complete


def test_distinct_drops_near_duplicates_first():
    """Four copies of one background token and four different object tokens: keeping four keeps every object
    token (a norm or attention score has no reason to)."""
    torch.manual_seed(0)
    background = torch.randn(8)
    objects = torch.randn(4, 8)
    x = torch.cat([torch.zeros(1, 1, 8), torch.stack([background + 1e-3 * torch.randn(8) for _ in range(4)])[None],
                   objects[None]], dim=1)  # [1, 1 + 8, 8]: CLS, 4 near-duplicates, 4 distinct tokens
    mod = AttentionTopK(num_prefix_tokens=1, num_patches=8, keep_count=5, score="distinct")
    mod.record_kept = True
    mod(x)
    kept = mod.last_kept[0].tolist()
    assert kept[1:] == [4, 5, 6, 7] and kept[0] in range(4)  # the objects, and one background token


def test_a_distinct_flops_target_counts_the_similarity_matrix():
    """distinct's ``2·P²·C`` FLOPs per pruning point are in the solved counts: the counted ratio lands on target."""
    _, report = rewrite_family("gap", "importance-mask", flops=0.6, first_block=1, score="distinct")
    assert report.decisions["score"] == "distinct" and report.keep_all_worst_node_diff <= 1e-5
    assert abs(report.flops_ratio - 0.6) <= 0.01
    assert abs(report.flops_ratio - report.decisions["predicted_flops_ratio"]) <= 2e-3
    _, plain = rewrite_family("gap", "importance-mask", flops=0.6, first_block=1, score="l2")
    assert sum(report.decisions["tokens_per_block"]) < sum(plain.decisions["tokens_per_block"])  # it paid for it
