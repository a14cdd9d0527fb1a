"""Patch Sampling Schedule keep rates (arXiv 2208.09520): shapes of the schedules, rounding, clipping, cool-down."""

import math

import pytest

from vitprune.errors import VitpruneError
from vitprune.train.keep_rate_schedule import KeepSchedule, keep_count, round_rate


def schedule(name, start=0.8, end=0.0, epochs=4, spe=10, cooldown=0, bucket=0.2):
    return KeepSchedule(name, start, end, epochs, spe, cooldown, bucket)


def test_constant():
    assert set(schedule("constant", start=0.5, bucket=0.0).rates()) == {0.5}
    assert set(schedule("constant", start=0.5).rates()) == {0.6}  # 0.5 rounds half up to the 0.2 grid


def test_linear_runs_from_start_to_end():
    s = schedule("linear", start=0.2, end=1.0, bucket=0.0)
    raw = [s.raw_rate(i) for i in range(s.total_steps)]
    assert raw[0] == pytest.approx(0.2) and raw[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(raw, raw[1:]))


def test_cosine_endpoints_and_midpoint():
    s = schedule("cosine", start=1.0, end=0.2, epochs=1, spe=101, bucket=0.0)
    assert s.raw_rate(0) == pytest.approx(1.0)
    assert s.raw_rate(50) == pytest.approx(0.6)
    assert s.raw_rate(100) == pytest.approx(0.2)


def test_cyclic_is_a_triangle_within_each_epoch():
    s = schedule("cyclic", start=0.8, end=0.0, epochs=3, spe=10, bucket=0.0)
    for epoch in range(3):
        raw = [s.raw_rate(epoch * 10 + i) for i in range(10)]
        assert raw[0] == pytest.approx(0.8) and raw[5] == pytest.approx(0.0)  # down to keep_end mid-epoch
        assert raw[1:5] == pytest.approx(raw[9:5:-1])  # and back up, symmetric
        assert all(b < a for a, b in zip(raw[:6], raw[1:6]))
    assert s.rate(5) == 1e-6  # 0.0 clipped into (0, 1]: keep_count then keeps 1 token
    assert schedule("cyclic", start=0.8, end=0.0).rate(5) == 0.2  # with buckets: the smallest bucket


def test_cyclic_matches_pss_drop_ratio_schedule():
    """PSS's code schedules a *drop* ratio 0.8 -> -0.1 per epoch; in keep terms that is 0.2 -> 1.1."""
    spe, start_drop, end_drop = 12, 0.8, -0.1
    s = schedule("cyclic", start=1 - start_drop, end=1 - end_drop, epochs=2, spe=spe, bucket=0.0)
    for step in range(2 * spe):
        i = step % spe
        pct = i / (spe / 2) if i <= spe // 2 else (spe - i) / (spe / 2)
        drop = (1 - pct) * start_drop + pct * end_drop
        assert s.raw_rate(step) == pytest.approx(1 - drop)
        assert s.rate(step) == min(1.0, max(1e-6, round(1 - drop, 9)))


def test_bucket_rounding_gives_few_shapes():
    s = schedule("cosine", start=1.0, end=0.1, epochs=5, spe=37)
    rates = set(s.rates())
    assert rates <= {0.2, 0.4, 0.6, 0.8, 1.0} and len(rates) >= 4
    assert all(abs(r / 0.2 - round(r / 0.2)) < 1e-9 for r in rates)
    assert round_rate(0.7, 0.2) == 0.8 and round_rate(0.69, 0.2) == 0.6 and round_rate(-0.3, 0.2) == 0.2
    assert round_rate(1.3, 0.2) == 1.0 and round_rate(0.0, 0.0) == 1e-6


def test_cooldown_epochs_keep_every_token():
    s = schedule("cyclic", epochs=5, spe=8, cooldown=2)
    rates = s.rates()
    assert all(r == 1.0 for r in rates[3 * 8:])
    assert min(rates[: 3 * 8]) < 1.0
    assert s.scheduled_steps == 24


def test_linear_spans_only_the_scheduled_epochs():
    s = schedule("linear", start=0.2, end=0.6, epochs=4, spe=5, cooldown=1, bucket=0.0)
    assert s.raw_rate(14) == pytest.approx(0.6) and s.raw_rate(15) == 1.0


def test_keep_count():
    assert keep_count(196, 1.0) == 196
    assert keep_count(196, 0.5) == 98
    assert keep_count(196, 0.7) == 137  # int(196 * 0.7) = 137 even though 196 * 0.7 = 137.19999...
    assert keep_count(10, 0.7) == 7  # 10 * 0.7 = 6.999999999999999 in floating point
    assert keep_count(16, 1e-6) == 1  # never zero tokens
    for bad in (0.0, -0.2, 1.2, math.nan):
        with pytest.raises(VitpruneError):
            keep_count(16, bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="triangle"), "unknown keep schedule"),
    (dict(cooldown=5), "cooldown"),
    (dict(bucket=1.5), "bucket"),
    (dict(start=math.inf), "finite"),
    (dict(epochs=0), "at least 1 epoch"),
])
def test_bad_parameters(kwargs, message):
    args = dict(name="linear", start=0.8, end=0.0, epochs=4, spe=10, cooldown=0, bucket=0.2)
    args.update(kwargs)
    with pytest.raises(VitpruneError, match=message):
        schedule(**args)


def test_step_outside_schedule():
    with pytest.raises(VitpruneError, match="outside"):
        schedule("linear").rate(40)
