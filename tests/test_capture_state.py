"""Capture never changes the user's model: a second capture gives the same graph, and state is untouched."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import vitprune
from vitprune.errors import VitpruneError
from vitprune.frontends.capture import capture


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _CachingAttention(nn.Module):
    """A block that caches a tensor derived from its parameters on first eval call (LeViT's pattern)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(dim))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2
            return self.proj(x) + self.cache["b"]
        return self.proj(x) + self.bias * 2


def test_second_capture_of_a_caching_module_gives_the_same_graph():
    model = _CachingAttention(8).eval()
    before = _state(model)
    first = capture(model)
    assert model.cache == {}  # the proxy the trace stored is gone
    second = capture(model)
    assert first.code == second.code
    _assert_same_state(before, model)
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(second(x), model(x), rtol=0, atol=0)


def test_levit_second_inspect_is_the_same_refusal_not_a_crash():
    model = timm.create_model("levit_128s", img_size=64, num_classes=5).eval()
    before = _state(model)
    messages = []
    for _ in range(2):
        with pytest.raises(VitpruneError) as refusal:
            vitprune.inspect_model(model)
        messages.append(str(refusal.value))
    assert messages[0] == messages[1]
    _assert_same_state(before, model)
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    assert caches and all(c == {} for c in caches)


def test_rewrite_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224",
                          model_args=dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)).eval()
    before = _state(model)
    attributes = {name: dict(vars(m)) for name, m in model.named_modules()}
    first = capture(model)
    vitprune.rewrite(model, "token-drop", keep_rate=0.5, at_inference=True)
    vitprune.inspect_model(model)
    assert capture(model).code == first.code
    _assert_same_state(before, model)
    assert {name: dict(vars(m)).keys() for name, m in model.named_modules()} == \
        {name: a.keys() for name, a in attributes.items()}
