"""Smoke test of benchmarks/throughput.py on a tiny ViT (eager only, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import vitprune
from vitprune.load import default_input_size, parse_model_args

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
MODEL_ARGS = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=64", "num_heads=2"]
VARIANT = "token-drop:keep_rate=0.5,at_inference=True"


def load_script():
    spec = importlib.util.spec_from_file_location("vitprune_bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_variant():
    bench = load_script()
    assert bench.parse_variant(VARIANT) == ("token-drop", {"keep_rate": 0.5, "at_inference": True})
    assert bench.parse_variant("m:sizes=(1, 2),mode=fast") == ("m", {"sizes": (1, 2), "mode": "fast"})
    assert bench.parse_variant("token-drop") == ("token-drop", {})


def test_throughput_smoke(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "tiny.json"
    argv = ["--model", "vit_small_patch16_224", *[a for m in MODEL_ARGS for a in ("--model-arg", m)],
            "--batch", "4", "--variant", VARIANT, "--backend", "eager", "--repeats", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    assert "| original | eager |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("| eager |") == 2

    # the input follows the model, not a hard-coded 224
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224", model_args=parse_model_args(MODEL_ARGS))
    size = default_input_size(model)
    assert result["config"]["input_shape"] == [4, *size] and size[1:] == (32, 32)
    assert result["machine"]["threads"] >= 1 and result["machine"]["torch"] == torch.__version__

    rows = {(r["model"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {("original", "eager"), (VARIANT, "eager")}
    for r in rows.values():
        assert r["error"] is None
        assert len(r["images_per_s"]) == 2
        for key in ("images_per_s_median", "images_per_s_min", "images_per_s_max"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["images_per_s_min"] <= r["images_per_s_median"] <= r["images_per_s_max"]
    orig, var = rows[("original", "eager")], rows[(VARIANT, "eager")]
    assert orig["speedup"] == 1.0 and orig["flops_ratio"] == 1.0 and orig["token_op_share"] is None

    _, report = vitprune.rewrite(model, "token-drop", example_input=torch.randn(2, *size), keep_rate=0.5,
                                 at_inference=True)
    assert var["flops_ratio"] == pytest.approx(report.flops_ratio, rel=1e-6)
    assert var["ideal_speedup"] == pytest.approx(1 / report.flops_ratio, rel=1e-6)
    assert var["efficiency"] == pytest.approx(var["speedup"] / var["ideal_speedup"], rel=1e-6)
    assert 0.0 <= var["token_op_share"] < 1.0
