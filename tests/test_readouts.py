"""Readouts beyond a CLS index and a mean: attention pooling (SigLIP's MAP head), max and avg+max pools, CLS
concatenated with the patch mean (DINOv2's linear probe). Each pools whatever tokens are kept, so every method
rewrites them; with every token kept the rewrite is exact node for node."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitprune
from vitprune.errors import PassError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2)


class LinearProbe(nn.Module):
    """DINOv2's linear-probe readout: ``cat([CLS, mean of the patch tokens])`` into one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = vitprune.load("timm:vit_small_patch14_dinov2", model_args=dict(img_size=56, depth=3, num_classes=0,
                                                                                  global_pool=""))
        self.head = nn.Linear(2 * 384, 10)

    def forward(self, x):
        t = self.vit.forward_features(x)
        return self.head(torch.cat([t[:, 0], t[:, self.vit.num_prefix_tokens:].mean(dim=1)], dim=1))


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "linear-probe":
        return LinearProbe().eval(), torch.randn(2, 3, 56, 56)
    if name.startswith("siglip-map"):  # timm's SigLIP: no class token, a MAP head (AttentionPoolLatent)
        import timm.layers

        timm.layers.set_fused_attn(name == "siglip-map")  # read when the model is built
        try:
            model = vitprune.load("timm:vit_base_patch16_siglip_224", model_args=TINY)
        finally:
            timm.layers.set_fused_attn(True)
        return model.eval(), torch.randn(2, 3, 32, 32)
    args = {"max": dict(TINY, global_pool="max"),
            "avgmax": dict(TINY, global_pool="avgmax", class_token=False)}[name]
    return vitprune.load("timm:vit_small_patch16_224", model_args=args).eval(), torch.randn(2, 3, 32, 32)


READOUTS = {
    "siglip-map": ("attention-pool", "attention pooling over all tokens"),
    "siglip-map-unfused": ("attention-pool", "attention pooling over all tokens"),  # softmax(q·kᵀ)·v, no SDPA
    "max": ("mean", "max over patch tokens"),
    "avgmax": ("mean", "max and mean over all tokens"),
    "linear-probe": ("token+mean", "token x[:, 0] and the mean over patch tokens"),
}
METHODS = {
    "token-drop": dict(keep_rate=0.5, at_inference=True),
    "importance-mask": dict(keep={1: 0.5}),
    "importance-mask-static": dict(keep={1: 0.5}, mode="static"),
    "lifespan-gather": dict(flops=0.8, after_block=1),
    "token-merge": dict(r=4),
}


@pytest.mark.parametrize("name", sorted(READOUTS))
def test_the_readout_is_found_from_the_graph(name):
    model, x = _model(name)
    vit = vitprune.inspect_model(model, example_input=x)
    kind, description = READOUTS[name]
    assert vit.readout.kind == kind and vit.readout.describe(vit.num_prefix_tokens).startswith(description)
    assert not vit.stream_readers


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(READOUTS))
def test_every_method_rewrites_each_readout_exactly_with_every_token_kept(name, method):
    model, x = _model(name)
    params = dict(METHODS[method])
    if method == "importance-mask-static":
        method, params["calibration"] = "importance-mask", torch.randn(4, *x.shape[1:])
    if name.endswith("unfused") and method in ("lifespan-gather", "token-merge"):
        with pytest.raises(PassError, match="uses matmul-softmax: its .*keys"):  # both read the blocks' keys
            vitprune.rewrite(model, method, example_input=x, **params)
        return
    rewritten, report = vitprune.rewrite(model, method, example_input=x, **params)
    assert report.keep_all_nodes_compared > 50 and report.keep_all_worst_node_diff <= 1e-6
    assert "token_restore" not in report.decisions  # the readout pools the kept tokens: nothing to put back
    assert report.flops_ratio < 0.95
    with torch.no_grad():
        assert torch.isfinite(rewritten(x)).all()


def test_an_attention_pool_pools_exactly_the_kept_tokens():
    """SigLIP's MAP head on the kept tokens: the rewritten model equals running the pool head on the final
    tokens the blocks computed for the kept tokens (token-drop by magnitude: deterministic)."""
    model, x = _model("siglip-map")
    with torch.no_grad():
        for param in model.attn_pool.parameters():
            param.normal_(0.0, 0.5)  # a pool that weighs tokens unevenly (random init is near uniform)
    rewritten, _ = vitprune.rewrite(model, "token-drop", example_input=x, keep_rate=0.5, at_inference=True,
                                    selection="magnitude")
    drop = next(m for m in rewritten.modules() if hasattr(m, "record_kept"))
    drop.record_kept = True
    with torch.no_grad():
        out = rewritten(x)
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        t = torch.stack([t[b][drop.last_kept[b]] for b in range(2)])
        expected = model.forward_head(model.norm(model.blocks(t)))
        assert torch.allclose(out, expected, atol=1e-5)
        assert not torch.allclose(out, model(x), atol=1e-3)
