"""The README's main job, end to end on real images (scikit-learn's digits), with a short training."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def test_digits_main_job(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "6", "--batch", "16", "--lr", "1e-3",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prefix tokens    1 (cls)" in done.stdout  # `vitprune inspect` on the pickled model
    results = json.loads((tmp_path / "results.json").read_text())
    base = results["original_accuracy"]
    assert base > 0.3  # 10 classes: well above chance even after 6 epochs
    runs = results["rewrites"]
    # keep-all, loaded from weights + architecture: same accuracy, exact outputs
    assert runs["keep_all_at_inference"]["accuracy"] == base
    assert runs["keep_all_at_inference"]["keep_all_max_abs_diff"] <= 1e-5
    assert runs["keep_all_at_inference"]["flops_ratio"] == 1.0
    # token-drop for training only: inference sees every token, so accuracy is unchanged
    assert runs["keep_0.5_training_only"]["accuracy"] == base
    # dropping half the patches at inference: about half the FLOPs, a real (finite) accuracy
    half = runs["keep_0.5_at_inference"]
    assert half["keep_count"] == 32 and 0.45 <= half["flops_ratio"] <= 0.55
    assert 0.0 < half["accuracy"] <= 1.0
    for name in runs:
        assert (tmp_path / f"digits_{name}" / "graph.json").is_file()
    assert (tmp_path / "digits_vit.pt").is_file() and (tmp_path / "digits_vit.safetensors").is_file()
