"""lifespan-gather (Life Regression): FLOPs target, sorted-prefix inference form, exact mode, training form."""

import pytest
import torch

import vitprune
from conftest import FAMILIES_224, rewrite_family
from vitprune.ops.modules import LifespanGather, PrefixSlice, SurvivalGate, auxiliary_losses, token_modules

SMALL = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2)


@pytest.mark.parametrize("family", sorted(FAMILIES_224))
def test_flops_target_on_each_family(family):
    rewritten, report = rewrite_family(family, "lifespan-gather", flops=0.5)
    assert abs(report.flops_ratio - 0.5) <= 0.03, report.flops_ratio
    assert report.keep_all_max_abs_diff <= 1e-5
    tokens = report.decisions["tokens_per_block"]
    assert tokens[:3] == [tokens[0]] * 3 and tokens[3] < tokens[0]  # blocks 0..2 intact, pruning from block 3
    after = vitprune.inspect_model(rewritten)
    assert [b.tokens for b in after.blocks] == tokens


def _small(**params):
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224", model_args=SMALL)
    return vitprune.rewrite(model, "lifespan-gather", **{"flops": 0.5, "after_block": 1, **params})


def test_blocks_keep_the_longest_lived_tokens():
    rewritten, report = _small()
    mods = token_modules(rewritten)
    assert isinstance(mods[0], LifespanGather) and all(isinstance(m, PrefixSlice) for m in mods[1:])
    for m in mods:
        m.record_kept = True
    x = torch.randn(3, 3, 64, 64)
    rewritten.eval()
    with torch.no_grad():
        rewritten(x)
    lg = mods[0]
    lives, order = lg.last_lives, lg.last_kept  # lives in token order; order sorts them, longest first
    sorted_lives = torch.gather(lives, 1, order)
    assert (sorted_lives[:, 1:] <= sorted_lives[:, :-1]).all()
    for ps in mods[1:]:  # each block keeps a prefix: the K longest-lived patches of each image
        k = ps.keep_count
        top = set(lives[0].topk(k).indices.tolist())
        assert set(order[0, :k].tolist()) == top
    first = report.decisions["keep_counts"]
    assert list(first.values()) == sorted(first.values(), reverse=True)


def test_exact_mode_keeps_tokens_alive_by_their_own_life(tmp_path):
    rewritten, _ = _small(exact=True)
    vitprune.save(rewritten, tmp_path / "exact")  # its reload check runs at batch 1
    rewritten = vitprune.load(tmp_path / "exact")
    rewritten.eval()
    counts = []
    ps = [m for m in token_modules(rewritten) if isinstance(m, PrefixSlice)]
    hook = ps[0].register_forward_hook(lambda m, inp, out: counts.append((out.shape[1], inp[1])))
    with torch.no_grad():
        for seed in range(3):
            rewritten(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
    hook.remove()
    for tokens, lives in counts:
        assert tokens == 1 + int((lives[0] > ps[0].block).sum())  # CLS + patches whose life exceeds the block
    with pytest.raises(ValueError, match="batch 1"):
        with torch.no_grad():
            rewritten(torch.randn(2, 3, 64, 64))


def test_soft_survival_gate():
    gate = SurvivalGate(num_prefix_tokens=1, block=3, tau_start=0.1, tau_end=0.1)
    update = torch.ones(1, 4, 2)
    lives = torch.tensor([[10.0, 3.0, -5.0]])
    gate.train()
    out = gate(update, lives)
    assert torch.allclose(out[0, :, 0], torch.tensor([1.0, 1.0, 0.5, 0.0]), atol=1e-4)  # prefix untouched
    gate.eval()
    assert gate(update, lives) is update  # inference uses hard slices instead


def test_budget_loss_trains_the_regressor_toward_the_target():
    rewritten, _ = _small()
    lg = token_modules(rewritten)[0]
    rewritten.train()
    x = torch.randn(4, 3, 64, 64)
    lg.target = 0.3  # ask for fewer FLOPs than the rewrite calibrated for
    opt = torch.optim.SGD(lg.parameters(), lr=1.0)
    losses = []
    for _ in range(15):
        rewritten(x)
        loss = auxiliary_losses(rewritten)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert lg.bias.grad is not None


def test_trained_lives_round_trip(tmp_path):
    rewritten, _ = _small()
    lg = token_modules(rewritten)[0]
    with torch.no_grad():
        for p in lg.mlp.parameters():
            p.add_(0.1 * torch.randn_like(p))  # as if trained
    vitprune.save(rewritten, tmp_path / "lg")
    again = vitprune.load(tmp_path / "lg")
    x = torch.randn(2, 3, 64, 64)
    for m in (rewritten, again):
        m.eval()
        token_modules(m)[0].record_kept = True
    with torch.no_grad():
        assert torch.equal(rewritten(x), again(x))
    assert torch.equal(token_modules(again)[0].last_lives, lg.last_lives)


def test_refusals():
    model = vitprune.load("timm:vit_small_patch16_224", model_args=SMALL)
    with pytest.raises(vitprune.PassError, match="after-block"):
        vitprune.rewrite(model, "lifespan-gather", flops=0.5, after_block=6)
    with pytest.raises(vitprune.PassError, match="below"):
        vitprune.rewrite(model, "lifespan-gather", flops=0.1, after_block=3)


def test_show_draws_predicted_lives(tmp_path):
    from vitprune.ship.show import kept_patches

    rewritten, report = _small()
    x = torch.randn(1, 3, 64, 64)
    stages = kept_patches(rewritten, x)
    lives = [s for s in stages if "lives" in s]
    assert len(lives) == 1 and lives[0]["lives"].shape == (64,)
    kept = [s for s in stages if "kept" in s]
    assert [len(s["kept"]) for s in kept] == list(report.decisions["keep_counts"].values())
    # the patches kept at the last stage are the longest-lived ones
    top = set(lives[0]["lives"].topk(len(kept[-1]["kept"])).indices.tolist())
    assert set(kept[-1]["kept"].tolist()) == top
