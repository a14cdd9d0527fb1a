"""benchmarks/fidelity_digits64.py's helpers on synthetic inputs (no training, no ToMe): seconds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fd64():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling ``common``
    try:
        spec = importlib.util.spec_from_file_location("fidelity_digits64", BENCH / "fidelity_digits64.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_tome_r_for_takes_the_closest_ratio(fd64):
    ratio = lambda r: 1.0 - 0.013 * r  # noqa: E731  (non-increasing, like FLOPs in ToMe's r)
    for target in (0.7, 0.6, 0.5, 1.0):
        r = fd64.tome_r_for(ratio, target, max_r=128)
        assert abs(ratio(r) - target) == min(abs(ratio(k) - target) for k in range(129))


def test_fidelity_of_the_reference_itself(fd64):
    logits = torch.randn(20, 10)
    y = logits.argmax(-1)
    assert fd64.fidelity(logits, logits, y) == pytest.approx({"accuracy": 1.0, "agreement": 1.0, "logit_cosine": 1.0})


def test_comparison_is_computed_from_the_rows(fd64):
    def row(method, agreement, eager, compiled, target=0.6, flops=0.6):
        return {"method": method, "setting": "s", "target": target, "flops_ratio": flops, "accuracy": agreement,
                "agreement": agreement, "logit_cosine": 1.0, "tokens_per_block": [5, 3],
                "images_per_s": {"eager_b16": eager, "eager_b1": 1.0, "compiled_b16": compiled}}
    rows = [row("original", 1.0, 10, 10, target=1.0, flops=1.0), row("token-drop", 0.5, 100, 100),
            row("importance-mask", 0.9, 30, 60), row("importance-mask", 0.99, 30, 60, target=0.5, flops=0.5),
            row("ToMe (stock)", 0.8, 20, 40),
            {"method": "lifespan-gather", "setting": "s", "target": 0.6, "error": "x"}]
    text = fd64.comparison(rows)
    assert "importance-mask" in text and "agreement 0.9000" in text and "+0.1000" in text
    assert "eager batch 16 1.50x ToMe's" in text and "compiled batch 16 1.50x ToMe's" in text
    assert "refused: x" in fd64.table(rows)
    assert "no ToMe row" in fd64.comparison(rows[:3])


def test_throughput_times_every_setting_and_records_failures(fd64):
    def broken(x):
        raise RuntimeError("no compiler")
    ok = torch.nn.Identity()
    speeds, errors = fd64.throughput({"a": {"eager_b16": ok, "eager_b1": ok, "compiled_b16": broken}},
                                     torch.zeros(16, 1), rounds=2)
    assert set(speeds["a"]) == {"eager_b16", "eager_b1"} and all(v > 0 for v in speeds["a"].values())
    assert errors == {"a": {"compiled_b16": "RuntimeError: no compiler"}}
