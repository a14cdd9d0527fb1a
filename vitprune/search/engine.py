"""The search itself: seeds, greedy moves, latency targets, and :func:`search`."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitprune.device import resolve_device, resolve_dtype
from vitprune.errors import PassError, SearchError, VitpruneError
from vitprune.frontends.capture import capture
from vitprune.graph.analysis import analyse
from vitprune.graph.flops import count_flops
from vitprune.passes import make_pass, run_passes
from vitprune.io.images import is_path
from vitprune.search import latency as lat
from vitprune.search.calibration import calibration_batches, flat_outputs
from vitprune.search.schedule import SearchResult, jsonable
from vitprune.search.spaces import FLOPS_TOLERANCE, METHODS, KeepSpace, MergeSpace


# --------------------------------------------------------------------------------------------------------
# what a schedule must fit


@dataclass
class _Budget:
    """The constraints a schedule must meet: predicted FLOPs ratio ``<= flops + FLOPS_TOLERANCE`` and / or
    predicted latency (:class:`~vitprune.search.latency.LatencyModel`) ``<= latency_ms``. ``seed_flops``: the
    FLOPs target the seeds are solved at."""

    flops: float | None
    latency_ms: float | None = None
    model: lat.LatencyModel | None = None

    @property
    def seed_flops(self) -> float:
        if self.flops is not None:
            return self.flops
        return round(min(0.95, self.latency_ms / (self.model.base_ms * self.model.scale)), 4)

    def admits(self, space, v: Sequence[int]) -> bool:
        if self.flops is not None and space.ratio(v) > self.flops + FLOPS_TOLERANCE:
            return False
        return self.latency_ms is None or self.model.predict(space, v) <= self.latency_ms

    def usage(self, space, v: Sequence[int]) -> float:
        """How much of the tightest constraint ``v`` uses (1: exactly at it)."""
        used = []
        if self.flops is not None:
            used.append(space.ratio(v) / self.flops)
        if self.latency_ms is not None:
            used.append(self.model.predict(space, v) / self.latency_ms)
        return max(used)

    def describe(self) -> str:
        parts = [f"FLOPs target {self.flops:g}"] if self.flops is not None else []
        if self.latency_ms is not None:
            parts.append(f"a latency of {self.latency_ms:g} ms")
        return " and ".join(parts)


# --------------------------------------------------------------------------------------------------------
# the search


@dataclass
class _Candidate:
    method: str
    vector: tuple[int, ...]
    predicted: float
    cosine: float | None = None
    agreement: float | None = None
    error: str | None = None


class _Searcher:
    """Captures and analyses the model once, computes the original outputs once, scores candidates."""

    def __init__(self, model: nn.Module, calibration: Any, methods: tuple[str, ...], seed: int, limit: int,
                 input_size, mean, std, frontend: str, progress: bool, min_keep: int | None = None,
                 device: Any = None, dtype: Any = None) -> None:
        from vitprune.io.origin import default_input_size, example_input
        from vitprune.io.preprocess import resolve_preprocessing
        from vitprune.rewrite import _opaque_attention

        self.model, self.methods, self.seed, self.progress = model, methods, seed, progress
        if input_size is None:
            try:
                input_size = default_input_size(model)
            except VitpruneError:
                if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 4):
                    raise
                input_size = tuple(calibration.shape[1:])  # a model that does not say: the calibration tensor does
        size = tuple(int(v) for v in input_size)
        # capture, passes and FLOPs run on the CPU in float32 (self.x); calibration forwards and timings on
        # ``device`` in ``dtype`` (:mod:`vitprune.device`), each on a moved copy
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.preprocessing = None
        if is_path(calibration):
            prep = resolve_preprocessing(model, mean, std, channels=size[0])
            mean, std, self.preprocessing = prep.mean, prep.std, prep.to_dict()
        self.batches, self.calibration, self.images = calibration_batches(
            calibration, size, mean, std, limit, seed, self.device)
        self.batches = [b.to(self.dtype) for b in self.batches]
        self.x = example_input(model, size)  # what `vitprune rewrite` analyses and verifies with
        ref = capture(model, self.x, frontend)
        if frontend == "auto" and _opaque_attention(ref, self.x):
            ref = capture(model, self.x, "export")  # importance-mask and token-merge read queries and keys
        ref.eval()
        self.reference = ref
        self.vit = analyse(ref, self.x)
        self.flops_before = count_flops(ref, self.x)
        self.total = self.flops_before // self.x.shape[0]
        self.spaces: dict[str, Any] = {}
        for m in methods:
            if m == "importance-mask":
                self.spaces[m] = KeepSpace(self.vit, self.total, min_keep)
            else:
                from vitprune.passes.token_merge import measure_flops

                self.spaces[m] = MergeSpace(self.vit, self.total, measure_flops(ref, self.vit, self.x)[1], min_keep)
        with torch.no_grad():
            scorer = self.placed(ref)
            self.original = [flat_outputs(scorer(b), b.shape[0]) for b in self.batches]
            del scorer
        self.cache: dict[tuple[str, tuple[int, ...]], _Candidate] = {}
        self.evaluations = 0
        self.evaluated: list[dict[str, Any]] = []
        self.bar = None  # the progress bar of the search running
        self.decisions: dict[str, Any] = {}  # what the last pass built fixed

    # -- building and scoring -------------------------------------------------------------------------

    def build(self, method: str, params: dict[str, Any]) -> fx.GraphModule:
        """The captured model rewritten by ``method`` with ``params`` (no verification), in eval mode; its
        ``decisions`` attribute holds what the pass fixed (keep counts / merges)."""
        gm = copy.deepcopy(self.reference)
        pass_ = make_pass(method, **params)
        gm, _ = run_passes(gm, [pass_], self.x)
        gm.eval()
        self.decisions = pass_.record
        return gm

    def placed(self, gm: nn.Module) -> nn.Module:
        """``gm`` on the search's device in its dtype: a moved copy unless that is the CPU in float32."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return gm
        return copy.deepcopy(gm).to(device=self.device, dtype=self.dtype)

    @property
    def where(self) -> dict[str, Any]:
        """Where timings run: ``device`` and ``dtype`` keywords of :func:`vitprune.ship.bench.bench`."""
        return {"device": self.device, "dtype": self.dtype}

    def score(self, gm: nn.Module) -> tuple[float, float | None]:
        cos, agree, n = [], 0, 0
        gm = self.placed(gm)
        with torch.no_grad():
            for b, (ref, ref_top) in zip(self.batches, self.original):
                flat, top = flat_outputs(gm(b), b.shape[0])
                cos.append(F.cosine_similarity(flat, ref, dim=1, eps=1e-12))
                if ref_top is not None and top is not None:
                    agree += int((top == ref_top).sum())
                    n += b.shape[0]
        return float(torch.cat(cos).mean()), (agree / n if n else None)

    def evaluate(self, space, vector: tuple[int, ...], stage: str, limit: int) -> _Candidate | None:
        """Score ``vector`` (cached); ``None`` when it is new and ``limit`` evaluations are spent."""
        key = (space.key, vector)
        if key in self.cache:
            return self.cache[key]
        if self.evaluations >= limit:
            return None
        self.evaluations += 1
        if self.bar is not None:
            self.bar.update(1)
        cand = _Candidate(space.method, vector, space.ratio(vector))
        try:
            gm = self.build(space.method, space.params(vector))
        except PassError as exc:
            cand.error = str(exc)
        else:
            self._same_schedule(space, vector)
            cand.cosine, cand.agreement = self.score(gm)
            del gm
        self.cache[key] = cand
        self.evaluated.append({"method": space.method, "score": getattr(space, "score", None), "stage": stage,
                               "schedule": {str(b): k for b, k in space.schedule(vector).items()},
                               "tokens_per_block": space.tokens(vector),
                               "predicted_flops_ratio": cand.predicted, "cosine": cand.cosine,
                               "agreement": cand.agreement, "error": cand.error})
        return cand

    def _same_schedule(self, space, vector: tuple[int, ...]) -> None:
        """The pass must have fixed exactly the searched counts (else the predicted FLOPs would be wrong)."""
        got = self.decisions.get("keep_counts" if space.method == "importance-mask" else "merges")
        want = {str(b): k for b, k in space.schedule(vector).items()}
        if got != want:
            raise RuntimeError(f"{space.method} fixed {got}, the search asked for {want}")  # pragma: no cover

    # -- one search within a budget ----------------------------------------------------------------------

    def run(self, target: _Budget, budget: int) -> dict[str, Any]:
        """Search within ``target`` with at most ``budget`` new evaluations; returns the best candidate and the
        per-method summary."""
        from vitprune.train.progress import Progress

        limit = self.evaluations + budget
        self.bar = Progress(total=budget, desc=f"search {target.describe()}", unit="evals", enabled=self.progress)
        try:
            return self._run(target, limit)
        finally:
            self.bar.close()
            self.bar = None

    def _resolve(self, space, v: tuple[int, ...], j: int, down: bool, i: int, target: _Budget):
        """``v`` with block ``j`` re-solved: admissible, as close to the tightest constraint as it can be (ties:
        nearest to ``v``); ``None`` when no count of block ``j`` is admissible."""
        best, gap = None, math.inf
        for w in space.options(v, j, down, i):
            if target.admits(space, w) and abs(target.usage(space, w) - 1) < gap - 1e-12:
                best, gap = w, abs(target.usage(space, w) - 1)
        return best

    def _repair(self, space, v: tuple[int, ...], target: _Budget):
        """An admissible schedule near ``v``: its last blocks lowered until it fits ``target`` (``None``: none)."""
        for j in range(space.L - 1, space.first - 1, -1):
            if target.admits(space, v):
                return v
            w = self._resolve(space, v, j, space.method == "importance-mask", j, target)
            if w is None:  # even block j's extreme does not fit: take it and go on with the earlier blocks
                w = list(space.options(v, j, space.method == "importance-mask", j))[-1]
            v = w
        return v if target.admits(space, v) else None

    def _fit(self, space, solve, target: _Budget, steps: int = 4):
        """A seed of the family ``solve`` (FLOPs target -> schedule) that ``target`` admits: solved at the seed
        FLOPs, then, while a latency is exceeded (a merge's time is not in its FLOPs), at a FLOPs target lowered
        by the excess; else repaired (:meth:`_repair`); ``None`` when out of reach."""
        f, v = target.seed_flops, None
        for _ in range(steps):
            try:
                v = solve(f)
            except VitpruneError:
                break  # out of the family's reach
            if target.admits(space, v) or target.latency_ms is None:
                break
            excess = (target.model.predict(space, v) - target.latency_ms) / (target.model.base_ms * target.model.scale)
            if excess <= 0:  # the FLOPs limit binds, not the latency
                break
            f = round(f - excess - 1e-3, 4)
            if f <= 0:
                break
        if v is None:
            return None
        return v if target.admits(space, v) else self._repair(space, v, target)

    def _fits(self, c: _Candidate, target: _Budget) -> bool:
        return target.admits(self.spaces[c.method], c.vector)

    def _run(self, target: _Budget, limit: int) -> dict[str, Any]:
        per_method: dict[str, dict[str, Any]] = {}
        seeds: dict[str, list[tuple[int, ...]]] = {}
        best: _Candidate | None = None
        flops = target.seed_flops

        def consider(c: _Candidate | None) -> None:
            nonlocal best
            if c is None or c.cosine is None or not self._fits(c, target):
                return
            if best is None or c.cosine > best.cosine:
                best = c

        # stage 1a: every method's default, as the pass would solve the target itself
        for m in self.methods:
            space = self.spaces[m]
            info = per_method[m] = {"default_params": {"flops": flops}, "default_predicted_flops_ratio": None,
                                    "default_admissible": None, "default_cosine": None, "default_agreement": None,
                                    "default_error": None}
            seeds[m] = []
            try:
                v = space.solvers()[0](flops)
            except VitpruneError as exc:
                info["default_error"] = str(exc)
            else:
                c = self.evaluate(space, v, "default", limit)
                if c is None:  # the budget is spent (a latency search's later round)
                    continue
                if hasattr(space, "scores"):  # importance-mask: which patch score, judged on the default schedule
                    tried = {"auto": c}
                    for score in space.scores()[1:]:
                        space.score = score
                        tried[score] = self.evaluate(space, v, "score", limit)
                    ok = {k: t for k, t in tried.items() if t is not None and t.cosine is not None}
                    space.score = max(ok, key=lambda k: ok[k].cosine, default="auto")
                    info["scores"] = {k: t.cosine for k, t in ok.items()}
                    info["score"] = space.score
                    for t in ok.values():
                        consider(t)
                info.update(default_predicted_flops_ratio=c.predicted, default_admissible=target.admits(space, v),
                            default_cosine=c.cosine, default_agreement=c.agreement, default_error=c.error,
                            default_tokens_per_block=space.tokens(v))
                consider(c)
                if not info["default_admissible"]:
                    fixed = self._repair(space, v, target)
                    if fixed is not None:
                        seeds[m].append(fixed)
            for solve in space.solvers():
                v = self._fit(space, solve, target)
                if v is not None and v not in seeds[m] and (space.key, v) not in self.cache:
                    seeds[m].append(v)
        # stage 1b: the first-block scans, spread evenly (round robin over the methods) over at most half the
        # evaluations left
        left = max(0, (limit - self.evaluations) // 2)
        quota = dict.fromkeys(self.methods, 0)
        while left > 0 and any(quota[m] < len(seeds[m]) for m in self.methods):
            for m in self.methods:
                if left > 0 and quota[m] < len(seeds[m]):
                    quota[m] += 1
                    left -= 1
        for m in self.methods:
            for v in _spread(seeds[m], quota[m]):
                consider(self.evaluate(self.spaces[m], v, "seed", limit))
        if best is None:
            return {"best": None, "per_method": per_method}

        # stage 2: greedy coordinate moves on the best seed
        space = self.spaces[best.method]
        coords = range(space.first, space.L)
        moves = sorted(((i, j, s) for i in coords for j in coords if i != j for s in (1, -1)),
                       key=lambda t: (abs(t[0] - t[1]), t[0], t[1], -t[2]))
        delta = max(1, round(0.04 * space.P))
        cursor = since = 0
        while moves and self.evaluations < limit:
            if since >= len(moves):
                if delta == 1:
                    break
                delta, since = delta // 2, 0
                continue
            i, j, s = moves[cursor]
            cursor, since = (cursor + 1) % len(moves), since + 1
            w = space.step(best.vector, i, s * delta)
            if w is None:
                continue
            # more tokens kept at i (importance-mask) or more merged at i (token-merge): block j gives back
            w = self._resolve(space, w, j, s > 0, i, target)
            if w is None or w == best.vector:
                continue
            c = self.evaluate(space, w, "move", limit)
            if c is not None and c.cosine is not None and c.cosine > best.cosine and self._fits(c, target):
                best, since = c, 0
        for m in self.methods:
            mine = [c for (mm, _), c in self.cache.items() if mm == self.spaces[m].key and c.cosine is not None
                    and self._fits(c, target)]
            top = max(mine, key=lambda c: c.cosine, default=None)
            per_method[m].update(
                best_cosine=top.cosine if top else None, best_agreement=top.agreement if top else None,
                best_predicted_flops_ratio=top.predicted if top else None,
                best_params=jsonable(self.spaces[m].params(top.vector)) if top else None,
                errors=sorted({c.error for (mm, _), c in self.cache.items() if mm.split(":")[0] == m and c.error}))
        return {"best": best, "per_method": per_method}

    def result(self, target: _Budget, outcome: dict[str, Any], budget: int) -> tuple[SearchResult, fx.GraphModule]:
        """The :class:`SearchResult` for ``run``'s outcome, and the searched schedule's rewritten model.

        Raises:
            SearchError: no candidate was admissible (the message gives each method's reason).
        """
        best = outcome["best"]
        per_method = outcome["per_method"]
        if best is None:
            reasons = []
            for m, info in per_method.items():
                failed = next(iter(info.get("errors") or []), None) or (
                    info.get("default_error") if info.get("default_predicted_flops_ratio") is not None else None)
                space = self.spaces[m]
                least = _least(space)
                if failed:
                    reasons.append(f"{m}: {failed}")
                elif target.latency_ms is not None:
                    reasons.append(f"{m} at its least FLOPs ({space.ratio(least):.3f}) is predicted at "
                                   f"{target.model.predict(space, least):.3g} ms")
                else:
                    reasons.append(f"{m} reaches {space.ratio(least):.3f} at the least")
            raise SearchError(f"no method admits {target.describe()} ({'; '.join(reasons)})")
        space = self.spaces[best.method]
        gm = self.build(best.method, space.params(best.vector))
        measured = count_flops(gm, self.x) / self.flops_before
        defaults = [(m, i) for m, i in per_method.items() if i.get("default_admissible") and i.get("default_cosine") is not None]
        dm, di = max(defaults, key=lambda t: t[1]["default_cosine"], default=(None, {}))
        sched = space.schedule(best.vector)
        res = SearchResult(
            method=best.method, params=space.params(best.vector),
            keep_counts=sched if best.method == "importance-mask" else None,
            merges=sched if best.method == "token-merge" else None,
            tokens_per_block=space.tokens(best.vector), flops_target=float(target.seed_flops),
            predicted_flops_ratio=best.predicted, measured_flops_ratio=measured, cosine=best.cosine,
            agreement=best.agreement, default_method=dm, default_params=di.get("default_params"),
            default_cosine=di.get("default_cosine"), default_agreement=di.get("default_agreement"),
            per_method=per_method, evaluations=self.evaluations, budget=budget, seed=self.seed,
            calibration=self.calibration, calibration_images=self.images, preprocessing=self.preprocessing,
            num_patches=self.vit.num_patches, num_prefix_tokens=self.vit.num_prefix_tokens,
            num_blocks=self.vit.num_blocks, flops_per_image=int(self.total), evaluated=list(self.evaluated))
        res.flops_limit = target.flops
        if target.latency_ms is not None:
            res.predicted_latency_ms = target.model.predict(space, best.vector)
            res.latency_model = target.model.to_dict()
        return res, gm


def _least(space) -> tuple[int, ...]:
    """The schedule of a space with the lowest predicted FLOPs (one patch from block 1; half merged in every block)."""
    if space.method == "importance-mask":
        return (space.P,) + (1,) * (space.L - 1)
    return space.normalise([space.P] * space.L)


def _spread(items: list, k: int) -> list:
    """``k`` of ``items``, evenly spaced, in order (all of them when ``k >= len(items)``)."""
    if k >= len(items):
        return list(items)
    if k <= 0:
        return []
    if k == 1:
        return [items[len(items) // 2]]
    picks = sorted({round(n * (len(items) - 1) / (k - 1)) for n in range(k)})
    return [items[p] for p in picks]


# --------------------------------------------------------------------------------------------------------
# latency


def _search_latency(s: _Searcher, flops: float | None, latency_ms: float | None, speedup: float | None,
                    backend: str, batch: int, budget: int, retries: int = 2) -> SearchResult:
    """Search within a latency (``latency_ms``, or the original's time over ``speedup``) and ``flops`` when given,
    with the additive latency model (:mod:`vitprune.search.latency`), then time the schedule found against the
    original in the same interleaved rounds; when their ratio misses, the model is scaled by measured /
    predicted and the search runs again (at most ``retries`` times, half the budget each).

    Times are relative to the original's first timing: a shared machine's speed drifts between timings, the
    ratio of two models timed together does not (much)."""
    size = tuple(s.x.shape[1:])
    base = lat.measure_latencies({"original": s.reference}, size, backend, batch, repeats=5, **s.where)["original"]
    if latency_ms is None:
        latency_ms = base / speedup
    elif base <= latency_ms and flops is None:
        raise SearchError(f"the original model already runs in {base:.3g} ms at batch {batch} on {backend}, within "
                          f"{latency_ms:g} ms: there is nothing to prune")
    model = lat.LatencyModel.measure(s.vit, base, s.total, backend, batch, merges="token-merge" in s.methods,
                                     **s.where)
    result = None
    for attempt in range(retries + 1):
        b = budget if attempt == 0 else max(len(s.methods), budget // 2)
        target = _Budget(flops, latency_ms, model)
        try:
            found, gm = s.result(target, s.run(target, b), b)
        except SearchError:
            if result is None:
                raise
            break  # the corrected model admits nothing: keep the last schedule found
        pair = lat.measure_latencies({"original": s.reference, "candidate": gm}, size, backend, batch, repeats=5,
                                     **s.where)
        del gm
        relative = pair["candidate"] / pair["original"]
        found.latency_ms, found.latency_target_ms, found.latency_original_ms = relative * base, latency_ms, base
        found.speedup, found.speedup_target = 1 / relative, base / latency_ms
        found.latency_met, found.backend, found.batch = relative * base <= latency_ms, backend, batch
        result = found
        if result.latency_met:
            break
        model.scale *= relative * base / found.predicted_latency_ms * 1.01  # the model was optimistic: correct it
    result.budget = budget
    return result


# --------------------------------------------------------------------------------------------------------
# the public entry point


def search(model: nn.Module, *, flops: float | None = None, latency_ms: float | None = None,
           speedup: float | None = None, calibration: Any,
           methods: Sequence[str] = METHODS, budget: int = 48, seed: int = 0, batch: int = 1,
           backend: str = "eager", calibration_limit: int = 64, progress: bool = True,
           input_size: tuple[int, int, int] | None = None, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, frontend: str = "auto", min_keep: int | None = None,
           device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> SearchResult:
    """Find the per-block schedule (keep counts or merges) that keeps ``model``'s output closest to the original
    at a FLOPs or latency budget, without fine-tuning (module docstring: search space and algorithm; Patch
    Slimming, arXiv 2106.02852 §3.3; DiffRate, arXiv 2305.17997).

    Args:
        model: the ViT (anything ``vitprune.rewrite`` takes); it is not modified (its train/eval modes are
            restored).
        flops: target FLOPs per image as a fraction of the original's, in ``(0, 1)``; a schedule is admissible
            iff its predicted ratio is ``<= flops + 0.005``.
        latency_ms: milliseconds one forward of a ``[batch, C, H, W]`` input may take on ``backend``
            (``"eager"``, ``"compile"`` or ``"onnxruntime"``) on this machine, instead of ``flops`` or as well
            (then both must hold): a schedule is admissible iff its predicted latency
            (:class:`~vitprune.search.latency.LatencyModel`: FLOPs plus each merge's measured time) is at most
            this; the schedule found is timed against the original in the same rounds, and ``latency_ms`` of
            the result is its time relative to the original's, times the original's first timing.
        speedup: instead of ``latency_ms``: the original's time on ``backend`` at ``batch`` over this, ``> 1``
            (a relative target survives a machine whose speed drifts).
        calibration: a folder of images (read recursively, resized and center-cropped to the model's input,
            normalised with the model's own mean/std, :mod:`vitprune.io.preprocess`), a ``[N, C, H, W]``
            tensor or an iterable of ``[B, C, H, W]`` tensors (already normalised).
        methods: among ``"importance-mask"`` (dynamic) and ``"token-merge"``.
        budget: at most this many rewrites scored on the calibration images (a latency search whose schedule
            misses when measured corrects its model and searches twice more at most, with half the budget
            each); at least one per method.
        seed: which ``calibration_limit`` images are used when there are more (the search itself is
            deterministic); the same seed gives the same schedule.
        calibration_limit: calibration images used, ``>= 1``.
        progress: on stderr, a tqdm bar on a terminal, else a plain line every 10 s and at the end
            (:class:`vitprune.train.progress.Progress`).
        input_size: ``(C, H, W)`` when it cannot be read from the model or a calibration tensor.
        mean, std: override the normalisation of calibration images read from a folder.
        frontend: as :func:`vitprune.rewrite`.
        min_keep: the fewest patch tokens a schedule may leave a block (default
            :func:`~vitprune.graph.keep_counts.default_min_keep`: ``min(10% of the patches, 16)``, at least 1).
        device, dtype: where the calibration forwards and the timings run (:mod:`vitprune.device`; default CUDA
            when available, float32); capture, the passes and FLOPs stay on the CPU in float32.

    Returns:
        A :class:`SearchResult`; ``vitprune.rewrite(model, result.method, **result.params)`` builds the model
        (``result.save(path)`` writes the schedule file ``vitprune rewrite --schedule`` reads).

    Raises:
        SearchError: neither ``flops`` nor ``latency_ms``, a target outside ``(0, 1)`` or a latency that is
            not positive, an unknown method or backend, a budget below the number of methods, empty or
            malformed calibration data, no method that admits the target (each method's reason is given), a
            latency alone that the original model already meets, or a model that does not run on ``backend``.
        VitpruneError: a bad ``device`` or ``dtype``.
        CaptureError, AnalysisError: the model cannot be captured or is not a ViT vitprune can rewrite.
    """
    start = time.perf_counter()
    if flops is None and latency_ms is None and speedup is None:
        raise SearchError("give a FLOPs target (--flops F), a latency (--latency-ms MS or --speedup X), or both")
    if latency_ms is not None and speedup is not None:
        raise SearchError("give a latency as --latency-ms or --speedup, not both")
    if speedup is not None and not (isinstance(speedup, (int, float)) and 1.0 < speedup < math.inf):
        raise SearchError(f"speed-up must be above 1, got {speedup}")
    if flops is not None and not (isinstance(flops, (int, float)) and 0.0 < float(flops) < 1.0):
        raise SearchError(f"FLOPs target must be in (0, 1), got {flops}")
    if latency_ms is not None and not (isinstance(latency_ms, (int, float)) and latency_ms > 0 and math.isfinite(latency_ms)):
        raise SearchError(f"latency must be a positive number of milliseconds, got {latency_ms}")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SearchError(f"unknown method {unknown[0] if unknown else ''!r} to search; choose from {', '.join(METHODS)}")
    if int(budget) < len(methods):
        raise SearchError(f"a budget of {budget} evaluations is below one per method ({len(methods)})")
    if int(calibration_limit) < 1:
        raise SearchError(f"calibration_limit must be at least 1, got {calibration_limit}")
    if latency_ms is not None or speedup is not None:
        from vitprune.ship.bench import BACKENDS

        if backend not in BACKENDS:
            raise SearchError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if int(batch) < 1:
            raise SearchError(f"batch must be at least 1, got {batch}")
    if calibration is None:
        raise SearchError("the search needs calibration images (--calibration DIR)")

    modes = {m: m.training for m in model.modules()}
    try:
        s = _Searcher(model, calibration, methods, int(seed), int(calibration_limit), input_size, mean, std,
                      frontend, progress, min_keep, device, dtype)
        if latency_ms is None and speedup is None:
            target = _Budget(float(flops))
            result, _ = s.result(target, s.run(target, int(budget)), int(budget))
        else:
            result = _search_latency(s, None if flops is None else float(flops),
                                     None if latency_ms is None else float(latency_ms),
                                     None if speedup is None else float(speedup), backend, int(batch), int(budget))
    finally:
        for m, training in modes.items():
            m.training = training
    result.seconds = time.perf_counter() - start
    return result
