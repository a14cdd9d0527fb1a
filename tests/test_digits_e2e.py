"""The README's main job, end to end on real images (scikit-learn's digits), with a short training.

One run of ``examples/digits.py`` in a subprocess (as a user runs it): train (or reuse), rewrite at FLOPs 0.6
three ways, search, save, reload, fine-tune label-free, bench against the original, export, show."""

import json
import math
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"
SHORT = ["--epochs", "5", "--batch", "32", "--finetune-epochs", "1", "--finetune-images", "400",
         "--search-budget", "4", "--calibration", "32", "--bench-rounds", "7"]


def test_digits_main_job(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE), *SHORT, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prefix tokens    1 (cls)" in done.stdout  # what `vitprune inspect` prints
    assert "train epoch 5/5  loss " in done.stderr  # training progress, one line an epoch
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["original_accuracy"] > 0.2  # 10 classes: above chance after 5 epochs
    rows = results["rows"]
    assert set(rows) == {"token-merge", "importance-mask", "token-drop"}
    for name, row in rows.items():
        values = [row["flops_ratio"], row["speedup"], row["top1"], row["top1_ft"]]
        assert all(math.isfinite(v) for v in values), (name, row)
        assert row["keep_all_max_abs_diff"] <= 1e-5  # verified: keep-all reproduces the original
        assert row["flops_ratio"] <= 0.6 + 0.005, (name, row["flops_ratio"])
        # one label-free epoch on 400 images: top-1 up on torch 2.14; on torch 2.11 token-merge's 0.229 became
        # 0.224 (2 of 450 test digits): a fine-tune may not lose more than that noise
        assert row["top1_ft"] >= row["top1"] - 0.01, (name, row["top1"], row["top1_ft"])
        assert row["speedup"] > 1.0, (name, row["speedup"])  # measured against the original, same rounds
        assert (Path(row["ft_path"]) / "graph.json").is_file()
    best = rows[results["best"]]
    assert best.get("onnx_parity") is None or best["onnx_parity"] <= 1e-4
    assert Path(results["onnx"]).is_file() and Path(results["picture"]).is_file()
    assert done.stdout.count("\nwrote ") == 1 and str(results["onnx"]) in done.stdout

    # the next run reuses the trained model (same training config and code), a changed config trains again
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import digits
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    data = digits.digits_split()
    _, acc, how = digits.trained_model(tmp_path, *data, epochs=5, batch=32, lr=1e-3)
    assert how.startswith("reused") and acc == results["original_accuracy"]
    assert digits.training_key(5, 32, 1e-3) != digits.training_key(6, 32, 1e-3)
