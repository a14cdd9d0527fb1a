"""vitprune export --optimize/--dtype/--quantize (vitprune/ship/onnx_optimize.py): real computations on a small timm ViT."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

import vitprune
from conftest import small_model
from vitprune.errors import VitpruneError


def _ort_version() -> tuple[int, int]:
    import onnxruntime

    return tuple(int(v) for v in onnxruntime.__version__.split(".")[:2])


def test_float16_initializers_and_ort_fusion(tmp_path):
    model = small_model("vit_cls")
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.5, at_inference=True, selection="magnitude")
    if _ort_version() < (1, 32):
        # measured on ORT 1.30 (torch 2.11): its symbolic shape inference asserts in _infer_Range on the batch
        # arange (limit = Squeeze of a Shape slice), so --optimize ort is refused, nothing written
        with pytest.raises(VitpruneError, match="symbolic shape inference fails.*--optimize basic"):
            vitprune.export_onnx(rewritten, tmp_path / "m.onnx", optimize="ort", dtype="float16")
        assert not list(tmp_path.iterdir())
        pytest.skip("ONNX Runtime < 1.32 cannot infer the shapes of a token-drop export: --optimize ort refused")
    report = vitprune.export_onnx(rewritten, tmp_path / "m.onnx", optimize="ort", dtype="float16")
    assert report.relative_diff <= 1e-2 and report.fused_after["SkipLayerNormalization"] > 0
    assert report.fused_before["SkipLayerNormalization"] == 0
    floats = [i.data_type for i in onnx.load(tmp_path / "m.onnx").graph.initializer if i.data_type in
              (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(t == TensorProto.FLOAT16 for t in floats)


def test_bad_combination_writes_nothing(tmp_path):
    with pytest.raises(VitpruneError, match="do not combine"):
        vitprune.export_onnx(small_model("vit_cls"), tmp_path / "m.onnx", dtype="float16", quantize="dynamic")
    assert not list(tmp_path.iterdir())


def test_int8_weights_and_a_failed_check_writes_nothing(tmp_path):
    model = small_model("vit_cls")
    report = vitprune.export_onnx(model, tmp_path / "q.onnx", quantize="dynamic")
    assert any(i.data_type == TensorProto.INT8 for i in onnx.load(tmp_path / "q.onnx").graph.initializer)
    assert report.agreement_inputs == "random" and report.relative_diff <= report.tolerance
    with pytest.raises(VitpruneError, match="int8 export differs from PyTorch float32 by"):
        vitprune.export_onnx(model, tmp_path / "r.onnx", quantize="dynamic", int8_tolerance=1e-6)
    assert not (tmp_path / "r.onnx").exists()
