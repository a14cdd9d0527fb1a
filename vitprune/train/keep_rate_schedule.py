"""Training keep-rate schedules for token-drop models: the Patch Sampling Schedule (PSS).

Follows the Patch Sampling Schedule (McDanel & Huynh, arXiv 2208.09520; code BradMcDanel/pss,
``patch_scheduler.py``): the fraction of patch tokens a ``TokenDrop`` keeps is varied per optimizer
step, so one model learns to work at many token counts; a model trained so can drop tokens at
inference (one checkpoint, many throughput/accuracy points).

Pure functions of the step index: no state, no torch. Rates are *keep* rates (PSS's code uses drop
ratios; its ``cyclic 0.8 -> -0.1`` drop schedule is ``keep_start=0.2, keep_end=1.1`` here).

- ``constant``: ``keep_start`` at every step.
- ``linear``:   from ``keep_start`` at the first step to ``keep_end`` at the last scheduled step.
- ``cosine``:   ``keep_end + (keep_start - keep_end) * (1 + cos(pi * p)) / 2``, ``p`` in ``[0, 1]``.
- ``cyclic``:   a triangle within each epoch (PSS): ``keep_start`` at the epoch's first step,
  ``keep_end`` half way through, back towards ``keep_start`` at its end.

Then the last ``cooldown_epochs`` epochs run at 1.0 (every token), and each rate is rounded to the
nearest multiple of ``bucket`` (PSS rounds to 0.2) so only a few token counts (tensor shapes)
occur, and clipped to ``[bucket, 1]`` (``(0, 1]`` when ``bucket`` is 0). The keep count of a module
with ``P`` patch tokens is ``max(1, int(P * rate))`` (:func:`keep_count`); rate 1.0 keeps them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vitprune.errors import VitpruneError
from vitprune.ops.token_ops import keep_count_for_rate

SCHEDULES = ("constant", "linear", "cosine", "cyclic")
_MIN_RATE = 1e-6  # the clip's lower end when bucket == 0: rate > 0, so at least one token


@dataclass(frozen=True)
class KeepSchedule:
    """Keep rate per optimizer step.

    Args:
        name: one of :data:`SCHEDULES`.
        keep_start, keep_end: keep rates (fractions of the patch tokens); any finite values, the
            result is clipped to ``(0, 1]`` after rounding (so ``keep_end=1.1`` spends part of each
            cycle at 1.0, as PSS's ``-0.1`` drop ratio does).
        epochs: training epochs, cool-down included (>= 1).
        steps_per_epoch: optimizer steps per epoch (>= 1).
        cooldown_epochs: final epochs at keep rate 1.0 (``0 <= cooldown_epochs <= epochs``).
        bucket: rates are rounded to multiples of this (``0 <= bucket <= 1``; 0: no rounding).

    Raises:
        VitpruneError: an unknown name or a value out of range.
    """

    name: str
    keep_start: float
    keep_end: float
    epochs: int
    steps_per_epoch: int
    cooldown_epochs: int = 0
    bucket: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise VitpruneError(f"unknown keep schedule {self.name!r}; expected one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.keep_start) and math.isfinite(self.keep_end)):
            raise VitpruneError(f"--keep-start and --keep-end must be finite, got {self.keep_start}, {self.keep_end}")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise VitpruneError(f"a keep schedule needs at least 1 epoch and 1 step per epoch, got "
                                f"{self.epochs} and {self.steps_per_epoch}")
        if not 0 <= self.cooldown_epochs <= self.epochs:
            raise VitpruneError(f"--cooldown-epochs must be in [0, {self.epochs}] (the epochs), got {self.cooldown_epochs}")
        if not 0.0 <= self.bucket <= 1.0:
            raise VitpruneError(f"--bucket must be in [0, 1], got {self.bucket}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def scheduled_steps(self) -> int:
        """Steps before the cool-down."""
        return (self.epochs - self.cooldown_epochs) * self.steps_per_epoch

    def raw_rate(self, step: int) -> float:
        """The schedule's value at ``step`` (0-based), before rounding and clipping; 1.0 in the cool-down."""
        if not 0 <= step < self.total_steps:
            raise VitpruneError(f"step {step} is outside the schedule's {self.total_steps} steps")
        if step >= self.scheduled_steps:
            return 1.0
        start, end = self.keep_start, self.keep_end
        if self.name == "constant":
            return start
        if self.name == "cyclic":
            p = (step % self.steps_per_epoch) / self.steps_per_epoch  # position in the epoch, [0, 1)
            return start + (end - start) * (1.0 - abs(2.0 * p - 1.0))
        p = step / max(1, self.scheduled_steps - 1)  # [0, 1] over the scheduled steps
        if self.name == "linear":
            return start + (end - start) * p
        return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0  # cosine

    def rate(self, step: int) -> float:
        """The keep rate used at ``step``: :meth:`raw_rate` rounded to ``bucket``, clipped to ``(0, 1]``."""
        return round_rate(self.raw_rate(step), self.bucket)

    def rates(self) -> list[float]:
        """:meth:`rate` for every step, in order."""
        return [self.rate(s) for s in range(self.total_steps)]


def round_rate(rate: float, bucket: float) -> float:
    """Round ``rate`` to the nearest multiple of ``bucket`` (halves up) and clip to ``[bucket, 1]``
    (``[1e-6, 1]`` when ``bucket`` is 0). The result is exact to 1e-9 (``0.6``, not ``0.6000000000000001``)."""
    if bucket > 0:
        rate = math.floor(rate / bucket + 0.5 + 1e-9) * bucket
    return round(min(1.0, max(bucket if bucket > 0 else _MIN_RATE, rate)), 9)


def keep_count(num_patches: int, rate: float) -> int:
    """Patch tokens kept at ``rate`` ``(0, 1]``: ``max(1, int(num_patches * rate))``; 1.0 keeps all.

    Raises:
        VitpruneError: ``rate`` outside ``(0, 1]``.
    """
    try:
        return keep_count_for_rate(num_patches, rate)
    except ValueError as exc:
        raise VitpruneError(str(exc)) from None
