"""token-drop on every supported family: keep-all exact, FLOPs fall with the kept tokens, modes."""

import pytest
import torch

import vitprune
from conftest import FAMILIES, small_model
from vitprune.errors import PassError
from vitprune.ops.modules import TokenDrop


def example(size):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


SIZES = {"vit_cls": 32, "deit_distilled": 32, "registers": 56, "gap": 32, "dinov2": 56}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("selection", ["random", "magnitude", "distinct"])
def test_rewrite_each_family(family, selection):
    model = small_model(family)
    x = example(SIZES[family])
    rewritten, report = vitprune.rewrite(model, "token-drop", keep_rate=0.5, selection=selection,
                                         at_inference=True, example_input=x)
    assert report.keep_all_max_abs_diff <= 1e-5
    assert report.outputs_finite
    vit = vitprune.inspect_model(model, example_input=x)
    assert report.decisions["keep_count"] == vit.num_patches // 2
    # every block of the rewritten graph attends over prefix + kept tokens, in eval mode too
    after = vitprune.inspect_model(rewritten, example_input=x)
    assert [b.tokens for b in after.blocks] == [vit.num_prefix_tokens + vit.num_patches // 2] * vit.num_blocks
    assert after.token_ops and after.token_ops[0]["before_block"] == 0
    assert 0.3 < report.flops_ratio < 0.75
    rewritten.eval()
    with torch.no_grad():
        out = rewritten(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()


def test_vit_small_224_flops_halved():
    model = vitprune.load("timm:vit_small_patch16_224")
    _, report = vitprune.rewrite(model, "token-drop", keep_rate=0.5, at_inference=True)
    assert report.decisions["keep_count"] == 98 and report.decisions["tokens_per_block"] == 99
    assert 0.45 <= report.flops_ratio <= 0.55
    assert report.keep_all_max_abs_diff <= 1e-5


def test_training_only_by_default():
    model = small_model("vit_cls")
    x = example(32)
    rewritten, report = vitprune.rewrite(model, "token-drop", keep_rate=0.25, example_input=x)
    assert report.flops_after == report.flops_before  # eval mode sees every token
    assert report.flops_after_train < 0.5 * report.flops_before
    rewritten.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(rewritten(x), model(x))


def test_prefix_tokens_kept_and_order_preserved_inside_the_graph():
    model = small_model("registers")
    x = example(56)
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.5, at_inference=True, example_input=x)
    drop = next(m for m in rewritten.modules() if isinstance(m, TokenDrop))
    seen = {}
    drop.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0], out=out))
    rewritten.eval()
    with torch.no_grad():
        rewritten(x)
    inp, out = seen["inp"], seen["out"]
    assert torch.equal(out[:, :5], inp[:, :5])  # CLS + 4 registers untouched, first
    for b in range(2):  # each kept token is a patch token of the same image, in original order
        positions = [int((inp[b, 5:] == tok).all(-1).nonzero()[0]) for tok in out[b, 5:]]
        assert positions == sorted(positions) and len(set(positions)) == len(positions) == 8


def test_original_model_is_untouched():
    model = small_model("vit_cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.5, example_input=example(32))
    with torch.no_grad():
        next(rewritten.parameters()).add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refusals_name_the_reason_and_the_passes_before():
    model = small_model("vit_cls")
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.5, example_input=example(32))
    with pytest.raises(PassError, match=r"'token-merge' \(after capture -> analyse\) refused: .*already drops tokens"):
        vitprune.rewrite(rewritten, "token-merge", r=1, example_input=example(32))
    with pytest.raises(PassError, match="already drops tokens"):
        vitprune.rewrite(rewritten, "token-drop", keep_rate=0.5, example_input=example(32))
    for bad in (0.0, 1.01, -1):
        with pytest.raises(PassError, match="keep rate"):
            vitprune.rewrite(model, "token-drop", keep_rate=bad, example_input=example(32))
    with pytest.raises(PassError, match="unknown method"):
        vitprune.rewrite(model, "token-shuffle", example_input=example(32))


def test_keep_all_on_natural_photographs_at_224():
    """vit_small_patch16_224 at 224x224 on real photographs from scikit-image: keep-all is exact."""
    from skimage import data, transform

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    x = torch.stack([torch.tensor(transform.resize(p, (224, 224), anti_aliasing=True), dtype=torch.float32)
                     .permute(2, 0, 1) for p in photos])
    x = (x - 0.5) / 0.5
    model = vitprune.load("timm:vit_small_patch16_224")
    rewritten, report = vitprune.rewrite(model, "token-drop", keep_rate=0.5, selection="magnitude",
                                         at_inference=True, example_input=x)
    assert report.keep_all_max_abs_diff <= 1e-5
    assert 0.45 <= report.flops_ratio <= 0.55
