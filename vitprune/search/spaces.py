"""Schedule spaces of :mod:`vitprune.search`: one int per block, with exact predicted FLOPs."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

from vitprune.errors import SearchError, VitpruneError
from vitprune.graph import keep_counts as kc
from vitprune.graph.analysis import ViTGraph


#: the methods :func:`search` can schedule.
METHODS = ("importance-mask", "token-merge")
#: importance-mask scores the search tries (no patch score wins on every model: benchmarks/results/importance_scores.md).
#: Not "attention-received": its full attention map costs FLOPs the schedule's prediction leaves out.
SEARCHED_SCORES = ("cls", "mean-query", "l1", "l2", "cls-norm")
#: a schedule is admissible iff its predicted FLOPs ratio is at most the target plus this.
FLOPS_TOLERANCE = 0.005


# --------------------------------------------------------------------------------------------------------
# exact counts as the rates importance-mask takes


def rates_for_counts(num_patches: int, counts: dict[int, int], num_blocks: int | None = None) -> dict[int, float]:
    """Keep rates that make :func:`~vitprune.graph.keep_counts.counts_from_rates` give exactly ``counts``.

    ``counts``: ``{block: patches kept before block}``, non-increasing in the block, each in
    ``1 .. num_patches``. A block that keeps every patch alive there is left out (it prunes nothing). Each
    rate is ``(k + 0.5) / alive``: ``int(alive · rate)`` is ``k`` with half a token of margin against
    rounding (rates are rounded to 6 decimals when that still reproduces the counts).

    Returns:
        ``{block: rate}`` with every rate in ``(0, 1)``.

    Raises:
        SearchError: a count outside ``1 .. alive`` (counts increase, or a count below 1), or a block
            outside ``1 .. num_blocks - 1``.
    """
    stages, alive = {}, int(num_patches)
    for block, k in sorted((int(b), int(v)) for b, v in counts.items()):
        if not 1 <= k <= alive:
            raise SearchError(f"keep count {k} before block {block} is outside 1..{alive} (counts must not increase)")
        if k < alive:
            stages[block] = alive = k
    blocks = int(num_blocks) if num_blocks is not None else max(stages, default=0) + 1
    for digits in (6, None):
        rates, alive = {}, int(num_patches)
        for block, k in stages.items():
            rate = (k + 0.5) / alive
            rates[block] = round(rate, digits) if digits else rate
            alive = k
        try:
            got = kc.counts_from_rates(int(num_patches), blocks, rates)
        except VitpruneError as exc:
            raise SearchError(str(exc)) from exc
        if got == stages:
            return rates
    raise RuntimeError(f"rates {rates} do not reproduce the keep counts {stages}")  # pragma: no cover


# --------------------------------------------------------------------------------------------------------
# schedule spaces: a schedule is a tuple of one int per block


class KeepSpace:
    """importance-mask: ``v[b]`` patches alive at block ``b``; ``v[0] = P``, non-increasing, ``>= floor``
    (``min_keep``, :func:`~vitprune.graph.keep_counts.min_keep_for`)."""

    method = "importance-mask"
    first = 1  # the first block whose count may change

    def __init__(self, vit: ViTGraph, total: int, min_keep: int | None = None) -> None:
        self.vit, self.total, self.P, self.L = vit, total, vit.num_patches, vit.num_blocks
        self.floor = kc.min_keep_for(vit, min_keep)
        self.score = "auto"  # the patch score; the search fixes it from the defaults (see SEARCHED_SCORES)

    @property
    def key(self) -> str:
        return f"{self.method}:{self.score}"

    def scores(self) -> list[str]:
        """``auto`` and every other score the model's readout admits (``auto`` is :func:`score_query`'s default:
        it is not tried twice; the CLS-row scores only where the readout reads a CLS token)."""
        from vitprune.passes.base import reads_cls_token, score_query

        auto, cls = score_query(self.vit)[0], reads_cls_token(self.vit)
        return ["auto"] + [s for s in SEARCHED_SCORES if s != auto and (cls or s not in ("cls", "cls-norm"))]

    def from_counts(self, counts: dict[int, int]) -> tuple[int, ...]:
        v, alive = [], self.P
        for b in range(self.L):
            alive = min(alive, counts.get(b, alive))
            v.append(alive)
        return tuple(v)

    def counts(self, v: Sequence[int]) -> dict[int, int]:
        return {b: v[b] for b in range(1, self.L) if v[b] < v[b - 1]}

    @property
    def score_name(self) -> str:
        """The score the rewrite will compute (``auto`` resolved as the pass resolves it): its own FLOPs
        (``distinct``'s similarity matrix) count in the predicted ratio, as the pass counts them in a ``--flops``
        target."""
        from vitprune.passes.base import resolve_score

        return resolve_score(self.vit, self.score)[0]

    def ratio(self, v: Sequence[int]) -> float:
        return kc.predicted_ratio(self.vit, self.counts(v), self.total, self.score_name)

    def params(self, v: Sequence[int]) -> dict[str, Any]:
        return {"keep": rates_for_counts(self.P, self.counts(v), self.L), "mode": "dynamic", "score": self.score}

    def tokens(self, v: Sequence[int]) -> list[int]:
        return kc.tokens_per_block(self.vit, self.counts(v))

    def solvers(self) -> list[Callable[[float], tuple[int, ...]]]:
        """Seed families, FLOPs target -> schedule (raising VitpruneError out of reach): the pass's default
        (geometric decay from block 3) first, then the same from every first block."""
        return [functools.partial(self._solve, first) for first in dict.fromkeys([3, *range(1, self.L)])]

    def _solve(self, first: int, target: float) -> tuple[int, ...]:
        return self.from_counts(kc.solve_for_flops(self.vit, target, self.total, first, self.score_name,
                                                   min_keep=self.floor))

    def step(self, v: Sequence[int], i: int, d: int) -> tuple[int, ...] | None:
        w = list(v)
        new = min(self.P, w[i] + d) if d > 0 else max(self.floor, w[i] + d)
        if new == w[i]:
            return None
        w[i] = new
        if d > 0:  # kept at i means alive before i too
            for m in range(1, i):
                w[m] = max(w[m], new)
        else:  # dropped before i means gone after i too
            for m in range(i + 1, self.L):
                w[m] = min(w[m], new)
        return tuple(w)

    def options(self, v: Sequence[int], j: int, down: bool, i: int) -> Iterable[tuple[int, ...]]:
        """Schedules with block ``j``'s count re-solved (down or up), nearest first, ``v`` itself included."""
        if down:
            lo = v[i] if j < i else self.floor  # lower than block i's count would undo the move at i
            for k in range(v[j], lo - 1, -1):
                yield tuple(v[:j]) + (k,) + tuple(min(a, k) for a in v[j + 1:])
        else:
            for k in range(v[j], v[j - 1] + 1):
                yield tuple(v[:j]) + (k,) + tuple(v[j + 1:])

    def schedule(self, v: Sequence[int]) -> dict[int, int]:
        return self.counts(v)


class MergeSpace:
    """token-merge: ``v[b]`` tokens merged in block ``b``, at most half of the patch tokens alive there, never
    leaving fewer than ``floor`` (``min_keep``)."""

    method = "token-merge"
    key = method
    first = 0

    def __init__(self, vit: ViTGraph, total: int, mlp: list[int], min_keep: int | None = None) -> None:
        self.vit, self.total, self.mlp, self.P, self.L = vit, total, mlp, vit.num_patches, vit.num_blocks
        self.floor = kc.min_keep_for(vit, min_keep)

    def normalise(self, v: Sequence[int]) -> tuple[int, ...]:
        out, alive = [], self.P
        for r in v:
            r = max(0, min(int(r), alive // 2, alive - self.floor))
            out.append(r)
            alive -= r
        return tuple(out)

    def from_merges(self, merges: dict[int, int]) -> tuple[int, ...]:
        return self.normalise([merges.get(b, 0) for b in range(self.L)])

    def merges(self, v: Sequence[int]) -> dict[int, int]:
        return {b: r for b, r in enumerate(v) if r}

    def ratio(self, v: Sequence[int]) -> float:
        return kc.merge_predicted_ratio(self.vit, self.merges(v), self.total, self.mlp)

    def params(self, v: Sequence[int]) -> dict[str, Any]:
        return {"r": [int(r) for r in v]}

    def tokens(self, v: Sequence[int]) -> list[int]:
        return kc.merge_tokens_per_block(self.vit, self.merges(v))

    def solvers(self) -> list[Callable[[float], tuple[int, ...]]]:
        """Seed families, FLOPs target -> schedule: ToMe's constant ``r`` from block 0 (the pass's default)
        first, then from every other first block on, then in the first blocks only (blocks ``0..e`` for each
        ``e``): fewer merging blocks, each merging more, which is faster at the same FLOPs (every merge adds
        kernels FLOPs do not show, :mod:`vitprune.search.latency`)."""
        spans = [(s, None) for s in range(self.L)] + [(0, e) for e in range(self.L - 1)]
        return [functools.partial(self._solve, first, last) for first, last in spans]

    def _solve(self, first: int, last: int | None, target: float) -> tuple[int, ...]:
        r = kc.solve_merge_for_flops(self.vit, target, self.total, self.mlp, first, last, min_keep=self.floor)
        return self.from_merges(kc.merge_schedule(self.vit, r, first, last, self.floor))

    def step(self, v: Sequence[int], i: int, d: int) -> tuple[int, ...] | None:
        w = list(v)
        w[i] = max(0, w[i] + d)
        w = self.normalise(w)
        return None if w[i] == v[i] else w

    def options(self, v: Sequence[int], j: int, down: bool, i: int) -> Iterable[tuple[int, ...]]:
        if down:
            values = range(v[j], -1, -1)
        else:
            alive = self.P - sum(v[:j])
            values = range(v[j], alive // 2 + 1)
        for k in values:
            yield self.normalise(tuple(v[:j]) + (k,) + tuple(v[j + 1:]))

    def schedule(self, v: Sequence[int]) -> dict[int, int]:
        return self.merges(v)
