"""Generality (issue 23, part A): one small random-init config of every family with prefix tokens, each
rewritten by every method. Every accepted rewrite is exact with every token kept (vitprune's node-for-node
verification), lands on its FLOPs target (measured by ``torch.utils.flop_counter``), and comes back from
``save`` / ``load`` computing the same outputs; every refusal names its reason. One capture per family,
shared by the methods (a captured GraphModule is rewritten as it is)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import vitprune
from vitprune.errors import VitpruneError
from vitprune.frontends.capture import capture

transformers = pytest.importorskip("transformers", reason="the hf extra (installed by the test extra)")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread does not wait on the other core

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HF_SMALL = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128)
TIMM_SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
TARGET = 0.7  # FLOPs of the whole model; blocks from 1 on are pruned (2 blocks: 0.7 is reachable)


def _hf(model_cls, config_cls, **extra):
    from vitprune.io.hf import wrap

    torch.manual_seed(0)
    return wrap(model_cls(config_cls(**{**HF_SMALL, **extra})))


def _timm(name, **extra):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**TIMM_SMALL, **extra}).eval()


class _LastHidden(torch.nn.Module):
    """A backbone that returns its last hidden state (VitDet has no pooled or classification output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).last_hidden_state


def _vitdet():
    torch.manual_seed(0)
    config = transformers.VitDetConfig(image_size=32, pretrain_image_size=32, patch_size=4, hidden_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, window_size=4,
                                       window_block_indices=[0])
    return _LastHidden(transformers.VitDetModel(config)).eval()


# family -> (builder, prefix tokens the analysis must find)
ACCEPTED = {
    "timm_vit": (lambda: _timm("vit_small_patch16_224"), ["cls"]),
    "deit_distilled": (lambda: _timm("deit_tiny_distilled_patch16_224"), ["cls", "distillation"]),
    "timm_reg4_dinov2": (lambda: _timm("vit_small_patch14_reg4_dinov2"), ["cls"] + ["register"] * 4),
    "hf_vit": (lambda: _hf(transformers.ViTForImageClassification, transformers.ViTConfig, num_labels=10), ["cls"]),
    "hf_dinov2": (lambda: _hf(transformers.Dinov2Model, transformers.Dinov2Config), ["cls"]),
    "hf_dinov2_registers": (lambda: _hf(transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig,
                                        num_register_tokens=4), ["cls"] + ["register"] * 4),
    "hf_dinov3": (lambda: _hf(transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig, num_register_tokens=4),
                  ["cls"] + ["register"] * 4),
}
REFUSED = {
    "hf_yolos": (lambda: _hf(transformers.YolosModel, transformers.YolosConfig, image_size=[32, 32],
                             num_detection_tokens=5), r"puts 5 token\(s\) after the patch tokens \(suffix"),
    "hf_vitdet": (_vitdet, "windowed attention"),
    "timm_cait": (lambda: _timm("cait_xxs24_224", depth_token_only=1), "is class attention"),
}
METHODS = {
    "token-drop": ("token-drop", dict(keep_rate=0.5, selection="magnitude", at_inference=True)),
    "importance-mask": ("importance-mask", dict(flops=TARGET, first_block=1)),
    "importance-mask-static": ("importance-mask", dict(flops=TARGET, first_block=1, mode="static", calibration=[X])),
    "lifespan-gather": ("lifespan-gather", dict(flops=TARGET, after_block=1)),
    "token-merge": ("token-merge", dict(flops=TARGET)),
}
_captured: dict[str, tuple] = {}


def _capture(family: str):
    """(model, its capture), once per family for the whole module."""
    if family not in _captured:
        model = ACCEPTED[family][0]()
        _captured[family] = model, capture(model, X)
    return _captured[family]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ACCEPTED)
def test_every_method_is_exact_on_target_and_reloads(family, method, tmp_path):
    model, gm = _capture(family)
    name, params = METHODS[method]
    rewritten, report = vitprune.rewrite(gm, name, example_input=X, **params)
    assert report.analysis["prefix_tokens"] == ACCEPTED[family][1]
    assert report.keep_all_nodes_compared > 50 and report.keep_all_worst_node_diff <= 1e-6
    assert report.keep_all_max_abs_diff <= 1e-5 and report.outputs_finite
    if name == "token-drop":  # keep 0.5 of the patches in every block: FLOPs at most (P/2 + prefix) / N of them
        assert 0.45 <= report.flops_ratio <= 0.56
    else:
        assert abs(report.flops_ratio - TARGET) <= 0.01, report.flops_ratio
    with torch.no_grad():
        expected = rewritten.eval()(X)
        vitprune.save(rewritten, tmp_path / "model")
        again = vitprune.load(tmp_path / "model").eval()
        torch.testing.assert_close(again(X), expected, rtol=0, atol=1e-6)
        assert again(torch.randn(3, 3, 32, 32)).shape[0] == 3  # the batch stays dynamic


@pytest.mark.parametrize("family", REFUSED)
def test_refusals_name_the_reason(family):
    build, reason = REFUSED[family]
    with pytest.raises(VitpruneError, match=reason):
        vitprune.inspect_model(build(), example_input=X)


@pytest.mark.parametrize("family", ["Dinov2WithRegisters", "DINOv3ViT"])
def test_cli_rewrites_a_hugging_face_folder(family, tmp_path, cli_inprocess):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**HF_SMALL, num_register_tokens=4)
    getattr(transformers, f"{family}Model")(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    code, stdout, err = cli_inprocess("rewrite", tmp_path / "hf", "--method", "token-drop", "--keep-rate", "0.5",
                                      "--at-inference", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["decisions"]["num_prefix_tokens"] == 5 and report["decisions"]["keep_count"] == 32
    assert report["keep_all_max_abs_diff"] <= 1e-5
    again = vitprune.load(out).eval()
    with torch.no_grad():
        assert again(X).shape == (2, 64)  # pooler_output of the 64-wide model


def test_a_width_equal_to_the_token_count_is_no_token_literal():
    """HF SigLIP without CLS at width 64 over 64 patches: layer_norm's normalized_shape [64] and the MAP head's
    unflatten(-1, [3, 64]) hold 64, and neither is on the token axis (data flow, not the size, says so)."""
    model = _hf(transformers.SiglipVisionModel, transformers.SiglipVisionConfig)
    rewritten, report = vitprune.rewrite(model, "token-drop", keep_rate=0.5, at_inference=True, example_input=X)
    assert report.analysis["num_tokens"] == 64 and report.keep_all_max_abs_diff <= 1e-5
    with torch.no_grad():
        assert rewritten.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 64)


def test_a_dense_readout_labels_the_re_spliced_cls_token():
    """Dinov2WithRegisters serving every token (nothing reads a prefix token by index): the CLS token is the
    first prefix operand, a token of its own (``x[:, :1]`` split off the first concat), the registers a block."""
    torch.manual_seed(0)
    model = _LastHidden(transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**HF_SMALL, num_register_tokens=4))).eval()
    vit = vitprune.inspect_model(model, example_input=X)
    assert vit.readout.kind == "tokens" and vit.prefix_tokens == ["cls"] + ["register"] * 4
