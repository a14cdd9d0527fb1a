"""torch.export capture (issue 11): Hugging Face, torchvision's MHA blocks, .pt2 files, token-count
literals re-specialised, every method node-for-node exact on the aten graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vitprune
from vitprune.errors import PassError
from vitprune.frontends.export import is_exported

transformers = pytest.importorskip("transformers", reason="the hf extra (installed by the test extra)")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SMALL = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
             intermediate_size=128)
HF = {
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=10)),
    "deit_with_teacher": lambda: transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**SMALL, num_labels=10)),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**SMALL)),
    "dinov2_classifier": lambda: transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(**SMALL, num_labels=10)),
    "clip_vision": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)),
    "dinov3": lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**SMALL, num_register_tokens=4)),
}
PREFIX = {"vit": ["cls"], "deit_with_teacher": ["cls", "distillation"], "dinov2": ["cls"],
          "dinov2_classifier": ["cls"], "clip_vision": ["cls"],
          "dinov3": ["cls"] + ["register"] * 4}
METHODS = {
    "token-drop": dict(keep_rate=0.5, at_inference=True),
    "importance-mask": dict(keep={2: 0.5}),
    "importance-mask-static": dict(keep={2: 0.5}, mode="static", calibration=[X]),
    "lifespan-gather": dict(flops=0.7, after_block=2),
}


def _hf(name: str) -> nn.Module:
    from vitprune.io.hf import wrap

    torch.manual_seed(0)
    return wrap(HF[name]())


def _method(method: str) -> tuple[str, dict]:
    """(pass name, parameters) of a METHODS entry."""
    return method.removesuffix("-static"), dict(METHODS[method])


def _check(model: nn.Module, method: str):
    name, params = _method(method)
    rewritten, report = vitprune.rewrite(model, name, example_input=X, **params)
    assert is_exported(rewritten)
    assert report.keep_all_nodes_compared > 100 and report.keep_all_worst_node_diff <= 1e-6
    with torch.no_grad():
        out = rewritten.eval()(torch.randn(5, 3, 32, 32))  # the batch stays dynamic
    assert out.shape[0] == 5 and torch.isfinite(out).all()
    return report


# every family once, the methods spread over them (each method's lowering is the same code whatever
# the family: the family decides what the analysis and the literal re-specialisation meet)
HF_CASES = [("vit", "token-drop"), ("vit", "importance-mask-static"), ("deit_with_teacher", "importance-mask"),
            ("dinov2", "lifespan-gather"), ("dinov2_classifier", "importance-mask"), ("clip_vision", "token-drop"),
            ("clip_vision", "lifespan-gather")]


@pytest.mark.parametrize("name,method", HF_CASES)
def test_hugging_face_families(name, method):
    model = _hf(name)
    vit = vitprune.inspect_model(model, example_input=X)
    assert vit.prefix_tokens == PREFIX[name] and vit.num_blocks == 4 and vit.num_patches == 64
    report = _check(model, method)
    if method == "token-drop":
        assert 0.45 <= report.flops_ratio <= 0.5


def test_dinov2_classifier_reads_cls_and_the_patch_mean():
    vit = vitprune.inspect_model(_hf("dinov2_classifier"), example_input=X)
    assert vit.readout.kind == "token+mean" and vit.readout.token_indices == [0] and vit.readout.mean_start == 1


def _torchvision():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=2, hidden_dim=64, mlp_dim=128,
                             num_classes=10).eval()


@pytest.mark.parametrize("method", ["importance-mask", "importance-mask-static", "lifespan-gather"])
def test_torchvision_mha_blocks_show_q_and_k_through_export(method):
    # symbolic trace keeps nn.MultiheadAttention opaque; a pass that reads q·kᵀ makes rewrite export it
    assert vitprune.inspect_model(_torchvision(), example_input=X).blocks[0].attention == "multihead-module"
    report = _check(_torchvision(), method)
    assert report.analysis["blocks"][0]["attention"] == "sdpa"


def _timm():
    torch.manual_seed(0)
    return vitprune.load("timm:vit_small_patch16_224",
                         model_args=dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2))


@pytest.mark.parametrize("method", ["importance-mask", "lifespan-gather"])
def test_timm_through_export_matches_the_traced_rewrite(method):
    kind, params = _method(method)
    traced, r_fx = vitprune.rewrite(_timm(), kind, example_input=X, frontend="fx", **params)
    exported, r_ex = vitprune.rewrite(_timm(), kind, example_input=X, frontend="export", **params)
    assert r_ex.decisions == r_fx.decisions  # the same static counts from the same analysis
    assert r_ex.flops_after == r_fx.flops_after
    if method != "token-drop" or not params.get("at_inference"):
        with torch.no_grad():
            torch.testing.assert_close(exported.eval()(X), traced.eval()(X), atol=1e-5, rtol=1e-5)


def test_pt2_file_loads_and_rewrites(tmp_path):
    model = _timm().eval()
    program = torch.export.export(model, (X,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp_path / "vit.pt2")
    loaded = vitprune.load(tmp_path / "vit.pt2")
    assert is_exported(loaded)
    rewritten, report = vitprune.rewrite(loaded, "importance-mask", keep={2: 0.5})
    assert report.keep_all_max_abs_diff == 0.0 and 0.7 <= report.flops_ratio <= 0.8


class _FlatView(nn.Module):
    """A block whose tokens are flattened away and viewed back with a literal count beside a -1."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = _timm()

    def forward(self, x):
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        for i, blk in enumerate(v.blocks):
            x = blk(x)
            if i == 2:
                x = x + x.flatten(1).view(x.shape[0], 65, -1) * 0.0
        return v.head(v.norm(x)[:, 0])


def test_a_literal_it_cannot_place_is_refused_by_name():
    with pytest.raises(PassError, match=r"node '\w+' \(view to \[.*65, -1\]\) holds the token count 65"):
        vitprune.rewrite(_FlatView().eval(), "token-drop", keep_rate=0.5, example_input=X, frontend="export")


def test_aten_allowlist_is_what_export_produces():
    """The aten half of vitprune.io.allowlist, re-derived: every op the export families produce (captured,
    and rewritten by a pass that re-specialises literals) is listed, and nothing listed is unused."""
    from vitprune.io import allowlist
    from vitprune.passes import make_pass, run_passes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import dinov2_dense  # a dense HF DINOv2: bicubic position-embedding resample, ConvTranspose decoder

    found = set()
    for make, x in [*((lambda n=n: _hf(n), X) for n in HF), (_torchvision, X), (_timm, X),
                    (dinov2_dense.build_model, torch.randn(2, 3, 64, 64))]:
        gm = vitprune.capture(make(), x, "export")
        found |= {f"{n.target._overloadpacket.__name__}.{n.target._overloadname}" for n in gm.graph.nodes
                  if isinstance(n.target, torch._ops.OpOverload)}
        rewritten, _ = run_passes(gm, [make_pass("importance-mask", keep={2: 0.5})], x)
        assert all(allowlist.function_names().get(n.target) for n in rewritten.graph.nodes if n.op == "call_function")
    assert found == set(allowlist.ATEN_OPS)
