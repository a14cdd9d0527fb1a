"""``benchmarks/gpu_speed.py --dry-run``: the GPU benchmark's every stage on the CPU with a tiny model, so the
script cannot rot where no GPU runs it (two methods: the stages are the same code for each)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"


def test_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "gpu_speed"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--methods", "token-drop,token-merge",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plan (estimated seconds" in proc.stdout
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["skipped"] == [] and [s["stage"].split()[0] for s in result["stages"]] == \
        ["build", "eager", "train", "compile", "compile"]
    models = ["original"] + [f"{m}@{t}" for t in (0.7, 0.5) for m in ("token-drop", "token-merge")]
    expected = {(m, "eager", b) for m, b in itertools.product(models, (1, 2))} | \
        {(m, "compile", 2) for m in models}
    rows = result["rows"]
    assert {(r["model"], r["backend"], r["batch"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert r["error"] is None and r["images_per_s"] > 0 and r["dtype"] == "bfloat16", r
        # against the original of the same backend and batch, compiled in the first group only
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        if r["model"] == "original":
            assert r["speedup"] == 1.0
    by = {(r["model"], r["backend"], r["batch"]): r for r in rows}
    for t in (0.7, 0.5):
        assert abs(by[(f"token-drop@{t}", "eager", 2)]["flops_ratio"] - t) < 0.06
        assert abs(by[(f"token-merge@{t}", "compile", 2)]["flops_ratio"] - t) < 0.06
    assert by[("original", "eager", 1)]["latency_ms_p50"] > 0
    keep = {t["keep_rate"]: t for t in result["train"]}
    assert set(keep) == {1.0, 0.5} and keep[0.5]["train_flops_ratio"] < 0.7 and keep[0.5]["speedup"] > 0
    md = out.with_suffix(".md").read_text()
    assert "### tiny" in md and "Training step" in md and "token-merge@0.5" in md
