import pytest
import torch

from vitprune.ops import token_ops
from vitprune.ops.modules import TokenDrop, force_keep_all


def test_gather_tokens_matches_advanced_indexing():
    x = torch.randn(3, 11, 5)
    idx = torch.stack([torch.randperm(11)[:4] for _ in range(3)])
    expected = torch.stack([x[b, idx[b]] for b in range(3)])
    assert torch.equal(token_ops.gather_tokens(x, idx), expected)


def test_random_selection_keeps_prefix_and_order_and_differs_per_image():
    torch.manual_seed(0)
    batch, tokens = 16, 9
    x = torch.arange(tokens, dtype=torch.float32).reshape(1, tokens, 1).repeat(batch, 1, 4)  # value = token id
    out, kept = token_ops.drop_patch_tokens(x, num_prefix_tokens=1, keep_count=4, selection="random")
    assert torch.equal(kept + 1, out[:, 1:, 0].long())  # kept indices point at the patch tokens returned
    assert out.shape == (batch, 5, 4)
    assert torch.equal(out[:, 0], x[:, 0])  # the prefix token is kept, first
    ids = out[:, 1:, 0]
    assert ((ids >= 1) & (ids < tokens)).all()  # only patch tokens fill the kept slots
    assert (ids[:, 1:] > ids[:, :-1]).all()  # original order, no repeats
    assert len({tuple(r) for r in ids.tolist()}) > 1  # a subset per image, not one for the batch


def test_magnitude_selection_keeps_largest_l1_tokens():
    patches = torch.zeros(1, 6, 3)
    norms = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 4.0])
    patches[0, :, 0] = -norms  # sign must not matter: L1 norm
    idx = token_ops.select_patch_indices(patches, 3, "magnitude")
    assert idx.tolist() == [[1, 3, 5]]


def test_keep_count_is_static_int_and_validated():
    assert token_ops.keep_count_for_rate(196, 0.5) == 98
    assert token_ops.keep_count_for_rate(10, 0.7) == 7  # not 6 from 0.7 * 10 = 6.999...
    assert token_ops.keep_count_for_rate(196, 0.001) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            token_ops.keep_count_for_rate(196, bad)


def test_token_drop_module_modes():
    mod = TokenDrop(num_prefix_tokens=2, num_patches=8, keep_count=3)
    x = torch.randn(4, 10, 6)
    mod.train()
    assert mod(x).shape == (4, 5, 6)
    mod.eval()
    assert mod(x) is x  # training-only by default
    mod.at_inference = True
    assert mod(x).shape == (4, 5, 6)
    with force_keep_all(mod):
        assert torch.equal(mod(x), x)  # gather of every token in order is exact
    with pytest.raises(ValueError):
        TokenDrop(num_prefix_tokens=1, num_patches=8, keep_count=9)
