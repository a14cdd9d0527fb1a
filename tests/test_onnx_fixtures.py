"""The ONNX fixtures are right: every (family, kind) file loads in onnxruntime, has the dynamic batch, and gives
the torch model's output at batch 2 and 3."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch

from onnx_fixtures import KINDS, TOLERANCE, cached_onnx, make_dense_model, make_model, run_onnx


# every kind of the CLS model, and each other family in the kinds the ONNX rewrite tests read (each dynamo
# export costs 5-9 s here; the other pairs were checked once by hand: all 25 match)
CHECKED = [("timm-cls", kind) for kind in KINDS] + [
    ("timm-reg", "ts17"), ("timm-gap", "ts17"), ("hf-vit", "ts17"), ("hf-vit", "dynamo23"), ("hf-vit", "ort-fused"),
    ("dense", "ts17"),
]


@pytest.mark.parametrize("family,kind", CHECKED)
def test_export_matches_torch(family, kind, onnx_dir):
    path = cached_onnx(family, kind, onnx_dir)  # conftest's session folder: the other ONNX tests reuse the file
    model, _ = make_dense_model() if family == "dense" else make_model(family)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch dimension
    for batch in (2, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(10 + batch))
        with torch.no_grad():
            expected = model(x)
        got = run_onnx(path, x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < TOLERANCE

    ops = collections.Counter((n.domain + "." if n.domain else "") + n.op_type for n in graph.node)
    if kind == "dynamo23":
        assert ops["Attention"] == 4
    if kind == "ort-fused":
        assert ops["com.microsoft.SkipLayerNormalization"] >= 7 and ops["com.microsoft.BiasGelu"] == 4
        # onnxruntime fuses attention only for the Hugging Face model (see onnx_fixtures._legacy_hf_attention)
        assert ops["com.microsoft.Attention"] == (4 if family == "hf-vit" else 0)
