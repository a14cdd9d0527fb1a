"""``vitprune.search``: the per-block schedule that keeps the most of a model's output at a FLOPs (or latency) budget.

For users who cannot fine-tune: Patch Slimming (Tang et al., arXiv 2106.02852, §3.3) searches each layer's
kept-patch count top-down under an error tolerance on calibration data; DiffRate (Chen et al., arXiv
2305.17997) learns per-layer prune and merge rates under a FLOPs constraint. vitprune searches the same
object, a static per-block schedule, without gradients and without fine-tuning: every candidate is a real
rewrite of the captured graph (the same pass ``vitprune rewrite`` runs), scored by how close its output
stays to the original's on calibration images.

Search space (every count a Python int, the rewrite's static shapes):

- ``importance-mask`` (dynamic mode: each image keeps its top-k patches by a patch score, step 0 below):
  nested keep counts, ``a[b]`` patches alive at block ``b``, ``a[0] = P`` (block 0 sees every
  patch: dropping there is token-drop's place), non-increasing. The pass takes rates; exact counts are
  written as rates ``(k + 0.5) / alive`` (:func:`rates_for_counts`).
- ``token-merge`` (ToMe, arXiv 2210.09461): ``r[b]`` tokens merged in block ``b``, at most half the patch
  tokens alive there (bipartite matching), as the pass's per-block list ``r=[r0, r1, ...]``.

FLOPs are predicted exactly from the graph analysis (:mod:`vitprune.graph.keep_counts`; the same model the
passes use); a schedule is admissible iff its predicted ratio is ``<= target + 0.005``.

Algorithm (deterministic, at most ``budget`` evaluations; one evaluation = one rewrite + one forward of the
calibration images; a schedule already scored costs nothing):

0. importance-mask's patch score (:data:`SEARCHED_SCORES`: the CLS row, the mean query's, L1/L2 norm, CLS row
   x norm) is chosen on the default schedule: no score wins on every model
   (``benchmarks/results/importance_scores.md``), so each is scored once and the best is kept for the rest.
1. Seeds, per method: the pass's own default for the target (importance-mask: geometric decay from block 3,
   :func:`~vitprune.graph.keep_counts.solve_for_flops`; token-merge: ToMe's constant ``r`` from block 0,
   :func:`~vitprune.graph.keep_counts.solve_merge_for_flops`), always evaluated first, then the same solvers
   from every other first block (spread evenly when they do not fit in half the budget). A seed whose
   closest-to-target solution overshoots the tolerance is repaired by lowering its last blocks.
2. Refinement of the best seed by greedy coordinate moves: give ``δ`` more tokens to block ``i`` and
   re-solve block ``j``'s count so the predicted FLOPs is admissible and as close to the target as it can
   be, or take ``δ`` from block ``i`` and re-solve ``j`` upward (nesting kept: raising a block raises the
   earlier ones below it, lowering one lowers the later ones above it). Pairs are tried nearest first,
   a move is accepted only if the calibration cosine strictly improves, ``δ`` starts at 4% of the patches
   and halves after a full round of moves without improvement.

The result is never worse on calibration than the best seed, so never worse than a method's default when
that default is admissible.

Latency targets: the largest FLOPs target whose default schedule (the first method whose default reaches it)
meets the latency is found in at most 5 measured steps (:func:`vitprune.ship.bench.bench`), the FLOPs search
runs there, and the searched schedule's latency is measured; if it misses, the target steps down in proportion
(at most twice, half the budget each).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitprune.errors import PassError, SearchError, VitpruneError
from vitprune.frontends.capture import capture
from vitprune.graph import keep_counts as kc
from vitprune.graph.analysis import ViTGraph, analyse
from vitprune.graph.flops import count_flops
from vitprune.passes import make_pass, run_passes

#: the methods :func:`search` can schedule.
METHODS = ("importance-mask", "token-merge")
#: importance-mask scores the search tries (no patch score wins on every model: benchmarks/results/importance_scores.md).
#: Not "attention-received": its full attention map costs FLOPs the schedule's prediction leaves out.
SEARCHED_SCORES = ("cls", "mean-query", "l1", "l2", "cls-norm")
#: a schedule is admissible iff its predicted FLOPs ratio is at most the target plus this.
FLOPS_TOLERANCE = 0.005
#: the version of the schedule file layout (``{"vitprune_schedule": 1, ...}``).
SCHEDULE_VERSION = 1
_CALIBRATION_BATCH = 32


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


class _KeepSpace:
    """importance-mask: ``v[b]`` patches alive at block ``b``; ``v[0] = P``, non-increasing, ``>= 1``."""

    method = "importance-mask"
    first = 1  # the first block whose count may change

    def __init__(self, vit: ViTGraph, total: int) -> None:
        self.vit, self.total, self.P, self.L = vit, total, vit.num_patches, vit.num_blocks
        self.score = "auto"  # the patch score; the search fixes it from the defaults (see SEARCHED_SCORES)

    @property
    def key(self) -> str:
        return f"{self.method}:{self.score}"

    def scores(self) -> list[str]:
        """``auto`` and every other score the model's readout admits (``auto`` is the CLS row, or the mean
        query's without a CLS token: that one is not tried twice)."""
        auto = "cls" if self.vit.readout.token_indices and self.vit.num_prefix_tokens else "mean-query"
        return ["auto"] + [s for s in SEARCHED_SCORES if s != auto and (auto == "cls" or s not in ("cls", "cls-norm"))]

    def from_counts(self, counts: dict[int, int]) -> tuple[int, ...]:
        v, alive = [], self.P
        for b in range(self.L):
            alive = min(alive, counts.get(b, alive))
            v.append(alive)
        return tuple(v)

    def counts(self, v: Sequence[int]) -> dict[int, int]:
        return {b: v[b] for b in range(1, self.L) if v[b] < v[b - 1]}

    def ratio(self, v: Sequence[int]) -> float:
        return kc.predicted_ratio(self.vit, self.counts(v), self.total)

    def params(self, v: Sequence[int]) -> dict[str, Any]:
        return {"keep": rates_for_counts(self.P, self.counts(v), self.L), "mode": "dynamic", "score": self.score}

    def tokens(self, v: Sequence[int]) -> list[int]:
        return kc.tokens_per_block(self.vit, self.counts(v))

    def default(self, target: float) -> tuple[int, ...]:
        return self.from_counts(kc.solve_for_flops(self.vit, target, self.total, 3))

    def scan(self, target: float) -> list[tuple[int, ...]]:
        out = []
        for s in range(1, self.L):
            try:
                out.append(self.from_counts(kc.solve_for_flops(self.vit, target, self.total, s)))
            except VitpruneError:
                continue  # the target is out of reach from that first block
        return out

    def step(self, v: Sequence[int], i: int, d: int) -> tuple[int, ...] | None:
        w = list(v)
        new = min(self.P, w[i] + d) if d > 0 else max(1, w[i] + d)
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
            lo = v[i] if j < i else 1  # lower than block i's count would undo the move at i
            for k in range(v[j], lo - 1, -1):
                yield tuple(v[:j]) + (k,) + tuple(min(a, k) for a in v[j + 1:])
        else:
            for k in range(v[j], v[j - 1] + 1):
                yield tuple(v[:j]) + (k,) + tuple(v[j + 1:])

    def schedule(self, v: Sequence[int]) -> dict[int, int]:
        return self.counts(v)


class _MergeSpace:
    """token-merge: ``v[b]`` tokens merged in block ``b``, at most half of the patch tokens alive there."""

    method = "token-merge"
    key = method
    first = 0

    def __init__(self, vit: ViTGraph, total: int, mlp: list[int]) -> None:
        self.vit, self.total, self.mlp, self.P, self.L = vit, total, mlp, vit.num_patches, vit.num_blocks

    def normalise(self, v: Sequence[int]) -> tuple[int, ...]:
        out, alive = [], self.P
        for r in v:
            r = max(0, min(int(r), alive // 2))
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

    def default(self, target: float) -> tuple[int, ...]:
        r = kc.solve_merge_for_flops(self.vit, target, self.total, self.mlp, 0)
        return self.from_merges(kc.merge_schedule(self.vit, r, 0))

    def scan(self, target: float) -> list[tuple[int, ...]]:
        out = []
        for s in range(self.L):
            try:
                r = kc.solve_merge_for_flops(self.vit, target, self.total, self.mlp, s)
            except VitpruneError:
                continue
            out.append(self.from_merges(kc.merge_schedule(self.vit, r, s)))
        return out

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


# --------------------------------------------------------------------------------------------------------
# the result


@dataclass
class SearchResult:
    """What :func:`search` found. Ratios are FLOPs per image relative to the original model's; cosines are the
    mean over calibration images of the cosine similarity between the rewritten and the original output
    (flattened per image); agreements the fraction of calibration images whose top-1 class is unchanged
    (``None`` unless the output is ``[B, classes]``).

    ``params`` are exactly the keyword arguments of ``vitprune.rewrite(model, method=method, **params)``
    (and what ``vitprune rewrite MODEL --schedule FILE`` reads from the schedule file).
    """

    method: str
    params: dict[str, Any]
    keep_counts: dict[int, int] | None  # importance-mask: {block: patches kept before it} (stages only)
    merges: dict[int, int] | None  # token-merge: {block: tokens merged in it}
    tokens_per_block: list[int]  # tokens (prefix + patches) each block's attention sees
    flops_target: float
    predicted_flops_ratio: float
    measured_flops_ratio: float | None  # torch.utils.flop_counter on the rewritten model
    cosine: float
    agreement: float | None
    default_method: str | None = None  # the method whose admissible default scored best
    default_params: dict[str, Any] | None = None
    default_cosine: float | None = None
    default_agreement: float | None = None
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)  # each method's default and best
    evaluations: int = 0  # rewrites scored on the calibration images
    budget: int = 0
    seed: int = 0
    calibration: str | None = None  # the folder, or "<tensors>"
    calibration_images: int = 0
    preprocessing: dict[str, Any] | None = None  # mean / std / source, for a folder of images
    num_patches: int = 0
    num_prefix_tokens: int = 0
    num_blocks: int = 0
    flops_per_image: int = 0  # the original's
    latency_ms: float | None = None  # the searched schedule's, measured (latency searches only)
    latency_target_ms: float | None = None
    latency_original_ms: float | None = None
    latency_met: bool | None = None
    backend: str | None = None
    batch: int | None = None
    evaluated: list[dict[str, Any]] = field(default_factory=list)  # every evaluation, in order
    seconds: float = 0.0
    model: str | None = None  # what the command line was given as MODEL

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON values (block keys as strings), starting with ``vitprune_schedule``."""
        d = asdict(self)
        d["params"] = _jsonable(self.params)
        d["default_params"] = _jsonable(self.default_params)
        for key in ("keep_counts", "merges"):
            if d[key] is not None:
                d[key] = {str(b): int(v) for b, v in d[key].items()}
        d["per_method"] = _jsonable(d["per_method"])
        return {"vitprune_schedule": SCHEDULE_VERSION, **d}

    def to_json(self) -> str:
        """The schedule file's text: ``{"vitprune_schedule": 1, "method": ..., "params": {...}, ...}``."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> "SearchResult":
        """Read :meth:`to_json`'s text (or its dict) back.

        Raises:
            SearchError: not JSON, not a vitprune schedule, a newer layout, or required fields missing.
        """
        doc = _schedule_document(data)
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in doc.items() if k in names}
        missing = sorted({"method", "params", "keep_counts", "merges", "tokens_per_block", "flops_target",
                          "predicted_flops_ratio", "measured_flops_ratio", "cosine", "agreement"} - set(kwargs))
        if missing:
            raise SearchError(f"the schedule lacks {', '.join(missing)}")
        kwargs["params"] = _params_from_json(kwargs["method"], kwargs["params"])
        if kwargs.get("default_params") is not None:
            kwargs["default_params"] = _params_from_json(kwargs.get("default_method") or kwargs["method"],
                                                         kwargs["default_params"])
        for key in ("keep_counts", "merges"):
            if kwargs[key] is not None:
                kwargs[key] = {int(b): int(v) for b, v in kwargs[key].items()}
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule file atomically (:func:`vitprune.io.outputs.atomic_file`); returns the path."""
        from vitprune.io.outputs import atomic_file

        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(self.to_json() + "\n")
        return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _params_from_json(method: str, params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise SearchError("the schedule's params must be an object of the method's parameters")
    params = dict(params)
    if method == "importance-mask" and isinstance(params.get("keep"), dict):
        try:
            params["keep"] = {int(b): float(r) for b, r in params["keep"].items()}
        except (TypeError, ValueError):
            raise SearchError("the schedule's keep rates must map block numbers to rates") from None
    return params


def _schedule_document(data: str | bytes | dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except (ValueError, TypeError) as exc:
            raise SearchError(f"the schedule is not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or "vitprune_schedule" not in data:
        raise SearchError("not a vitprune schedule (no \"vitprune_schedule\" field; write one with `vitprune search`)")
    version = data["vitprune_schedule"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEDULE_VERSION:
        raise SearchError(f"schedule layout {version!r} is not one this vitprune reads (1..{SCHEDULE_VERSION})")
    method = data.get("method")
    if not isinstance(method, str) or not method:
        raise SearchError("the schedule names no method")
    return data


def read_schedule(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(method, params)`` from a schedule file, for ``vitprune.rewrite(model, method, **params)``.

    Only ``vitprune_schedule``, ``method`` and ``params`` are read, so a hand-written file serves too.

    Raises:
        SearchError: the file is missing or unreadable, not JSON, not a vitprune schedule or of a newer layout,
            or its params are not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"no such schedule file: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchError(f"cannot read the schedule {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        doc = _schedule_document(text)
    except SearchError as exc:
        raise SearchError(f"{path}: {exc}") from None
    return doc["method"], _params_from_json(doc["method"], doc.get("params"))


def load_schedule(path: str | os.PathLike) -> SearchResult:
    """A schedule file written by :meth:`SearchResult.save` (or ``vitprune search -o``), read back.

    Raises:
        SearchError: as :func:`read_schedule`, or fields of a search result are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"no such schedule file: {path}")
    try:
        return SearchResult.from_json(path.read_text())
    except SearchError as exc:
        raise SearchError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------------------
# calibration data


def _calibration_batches(calibration: Any, input_size: tuple[int, int, int], mean, std, limit: int, seed: int,
                         device: torch.device) -> tuple[list[torch.Tensor], str, int]:
    """``(batches, description, images)``: at most ``limit`` calibration images, sampled with ``seed`` when there
    are more (the same ones for the same seed), as ``[<=32, C, H, W]`` batches."""
    from vitprune.io.images import image_files, load_image

    if isinstance(calibration, (str, bytes)) or hasattr(calibration, "__fspath__"):
        folder = os.fsdecode(calibration)
        try:
            files = image_files(folder)
        except VitpruneError as exc:
            raise SearchError(f"calibration: {exc}") from None
        if len(files) > limit:
            files = [files[i] for i in sorted(random.Random(seed).sample(range(len(files)), limit))]
        images = [load_image(f, input_size, mean, std)[0] for f in files]
        x, what = torch.cat(images), folder
    else:
        if isinstance(calibration, torch.Tensor):
            tensors = [calibration]
        else:
            try:
                tensors = list(calibration)
            except TypeError:
                raise SearchError("calibration must be a folder of images, a [N, C, H, W] tensor or an iterable of "
                                  "[B, C, H, W] tensors") from None
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[1:]) != tuple(input_size):
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise SearchError(f"calibration batches must be [B, {', '.join(map(str, input_size))}] tensors "
                                  f"(the model's input size), got {shape}")
        x = torch.cat([t.detach().float() for t in tensors]) if tensors else torch.empty(0, *input_size)
        if len(x) > limit:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
            x = x[order.sort().values]
        what = "<tensors>"
    if len(x) == 0:
        raise SearchError("the calibration data holds no images")
    return [b.to(device) for b in x.split(_CALIBRATION_BATCH)], what, len(x)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _flat(out: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([B, D] float64 of every output tensor, [B] top-1 or None)``."""
    leaves = [t for t in _tensors(out) if t.dim() >= 1 and t.shape[0] == batch]
    if not leaves:
        raise SearchError("the model's output holds no [B, ...] tensor to compare")
    flat = torch.cat([t.detach().reshape(batch, -1).double().cpu() for t in leaves], 1)
    top = leaves[0].argmax(-1).cpu() if len(leaves) == 1 and leaves[0].dim() == 2 and leaves[0].shape[1] > 1 else None
    return flat, top


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
                 input_size, mean, std, frontend: str, progress: bool) -> None:
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
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        self.preprocessing = None
        if isinstance(calibration, (str, bytes)) or hasattr(calibration, "__fspath__"):
            prep = resolve_preprocessing(model, mean, std, channels=size[0])
            mean, std, self.preprocessing = prep.mean, prep.std, prep.to_dict()
        self.batches, self.calibration, self.images = _calibration_batches(
            calibration, size, mean, std, limit, seed, device)
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
                self.spaces[m] = _KeepSpace(self.vit, self.total)
            else:
                from vitprune.passes.token_merge import measure_flops

                self.spaces[m] = _MergeSpace(self.vit, self.total, measure_flops(ref, self.vit, self.x)[1])
        with torch.no_grad():
            self.original = [_flat(ref(b), b.shape[0]) for b in self.batches]
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

    def score(self, gm: nn.Module) -> tuple[float, float | None]:
        cos, agree, n = [], 0, 0
        with torch.no_grad():
            for b, (ref, ref_top) in zip(self.batches, self.original):
                flat, top = _flat(gm(b), b.shape[0])
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

    # -- one FLOPs-target search ----------------------------------------------------------------------

    def run(self, target: float, budget: int) -> dict[str, Any]:
        """Search at ``target`` with at most ``budget`` new evaluations; returns the best candidate and the
        per-method summary."""
        from tqdm import tqdm

        limit = self.evaluations + budget
        self.bar = tqdm(total=budget, desc=f"search FLOPs {target:g}", unit="eval", leave=False,
                        disable=None if self.progress else True)
        try:
            return self._run(target, limit)
        finally:
            self.bar.close()
            self.bar = None

    def _admissible(self, space, v: tuple[int, ...], target: float) -> bool:
        return space.ratio(v) <= target + FLOPS_TOLERANCE

    def _resolve(self, space, v: tuple[int, ...], j: int, down: bool, i: int, target: float):
        """``v`` with block ``j`` re-solved: admissible, predicted FLOPs closest to ``target`` (ties: nearest
        to ``v``); ``None`` when no count of block ``j`` is admissible."""
        best, gap = None, math.inf
        for w in space.options(v, j, down, i):
            r = space.ratio(w)
            if r <= target + FLOPS_TOLERANCE and abs(r - target) < gap - 1e-12:
                best, gap = w, abs(r - target)
        return best

    def _repair(self, space, v: tuple[int, ...], target: float):
        """An admissible schedule near ``v``: its last blocks lowered until the FLOPs fit (``None``: none)."""
        for j in range(space.L - 1, space.first - 1, -1):
            if self._admissible(space, v, target):
                return v
            w = self._resolve(space, v, j, space.method == "importance-mask", j, target)
            if w is None:  # even block j's extreme does not fit: take it and go on with the earlier blocks
                w = list(space.options(v, j, space.method == "importance-mask", j))[-1]
            v = w
        return v if self._admissible(space, v, target) else None

    def _run(self, target: float, limit: int) -> dict[str, Any]:
        per_method: dict[str, dict[str, Any]] = {}
        seeds: dict[str, list[tuple[int, ...]]] = {}
        best: _Candidate | None = None

        def consider(c: _Candidate | None) -> None:
            nonlocal best
            if c is None or c.cosine is None or c.predicted > target + FLOPS_TOLERANCE:
                return
            if best is None or c.cosine > best.cosine:
                best = c

        # stage 1a: every method's default, as the pass would solve the target itself
        for m in self.methods:
            space = self.spaces[m]
            info = per_method[m] = {"default_params": {"flops": target}, "default_predicted_flops_ratio": None,
                                    "default_admissible": None, "default_cosine": None, "default_agreement": None,
                                    "default_error": None}
            seeds[m] = []
            try:
                v = space.default(target)
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
                info.update(default_predicted_flops_ratio=c.predicted, default_admissible=self._admissible(space, v, target),
                            default_cosine=c.cosine, default_agreement=c.agreement, default_error=c.error,
                            default_tokens_per_block=space.tokens(v))
                consider(c)
                if not info["default_admissible"]:
                    fixed = self._repair(space, v, target)
                    if fixed is not None:
                        seeds[m].append(fixed)
            for v in space.scan(target):
                v = v if self._admissible(space, v, target) else self._repair(space, v, target)
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
            if c is not None and c.cosine is not None and c.cosine > best.cosine \
                    and c.predicted <= target + FLOPS_TOLERANCE:
                best, since = c, 0
        for m in self.methods:
            mine = [c for (mm, _), c in self.cache.items() if mm == self.spaces[m].key and c.cosine is not None
                    and c.predicted <= target + FLOPS_TOLERANCE]
            top = max(mine, key=lambda c: c.cosine, default=None)
            per_method[m].update(
                best_cosine=top.cosine if top else None, best_agreement=top.agreement if top else None,
                best_predicted_flops_ratio=top.predicted if top else None,
                best_params=_jsonable(self.spaces[m].params(top.vector)) if top else None,
                errors=sorted({c.error for (mm, _), c in self.cache.items() if mm.split(":")[0] == m and c.error}))
        return {"best": best, "per_method": per_method}

    def result(self, target: float, outcome: dict[str, Any], budget: int) -> tuple[SearchResult, fx.GraphModule]:
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
                reasons.append(f"{m}: {failed}" if failed else
                               f"{m} reaches {_least(self.spaces[m]):.3f} at the least")
            raise SearchError(f"no method admits FLOPs target {target:g} ({'; '.join(reasons)})")
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
            tokens_per_block=space.tokens(best.vector), flops_target=float(target),
            predicted_flops_ratio=best.predicted, measured_flops_ratio=measured, cosine=best.cosine,
            agreement=best.agreement, default_method=dm, default_params=di.get("default_params"),
            default_cosine=di.get("default_cosine"), default_agreement=di.get("default_agreement"),
            per_method=per_method, evaluations=self.evaluations, budget=budget, seed=self.seed,
            calibration=self.calibration, calibration_images=self.images, preprocessing=self.preprocessing,
            num_patches=self.vit.num_patches, num_prefix_tokens=self.vit.num_prefix_tokens,
            num_blocks=self.vit.num_blocks, flops_per_image=int(self.total), evaluated=list(self.evaluated))
        return res, gm


def _least(space) -> float:
    """The lowest predicted FLOPs ratio of a schedule space (one patch from block 1; half merged in every block)."""
    if space.method == "importance-mask":
        return space.ratio((space.P,) + (1,) * (space.L - 1))
    return space.ratio(space.normalise([space.P] * space.L))


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


def _latency(model: nn.Module, input_size: tuple[int, ...], backend: str, batch: int) -> float:
    """Milliseconds for one forward of a ``[batch, C, H, W]`` input on ``backend``, measured by
    :func:`vitprune.ship.bench.bench` (median over its runs: batch 1 its p50 latency, else ``batch`` over its
    median throughput)."""
    from vitprune.ship.bench import bench

    row = bench({"candidate": model}, tuple(input_size), backends=(backend,), batches=(batch,), repeats=3, iters=2,
                latency_runs=15, progress=False)[0]
    if row.error:
        raise SearchError(f"cannot time the model on {backend}: {row.error}")
    return float(row.latency_ms_p50) if batch == 1 else 1e3 * batch / float(row.images_per_s)


def _latency_target(s: _Searcher, latency_ms: float, backend: str, batch: int, steps: int = 5) -> tuple[float, float]:
    """``(FLOPs target, original latency)``: the largest target (of a few tried) whose default schedule meets
    ``latency_ms`` (the first method's default that reaches the target)."""
    size = tuple(s.x.shape[1:])
    base = _latency(s.reference, size, backend, batch)
    if base <= latency_ms:
        raise SearchError(f"the original model already runs in {base:.3g} ms at batch {batch} on {backend}, within "
                          f"{latency_ms:g} ms: there is nothing to prune")
    # each method's default in order, then importance-mask from block 1 (its widest reach): the first that
    # reaches the target is timed
    recipes = [(m, {"flops": None}) for m in s.methods]
    if "importance-mask" in s.methods:
        recipes.append(("importance-mask", {"flops": None, "first_block": 1}))
    meet, miss, floor, tried = None, 1.0, 0.0, []
    t = min(0.95, max(0.05, latency_ms / base))
    for _ in range(steps):
        t = round(t, 4)
        gm = None
        for method, params in recipes:
            try:
                gm = s.build(method, {**params, "flops": t})
                break
            except PassError:
                continue
        if gm is None:  # no method reaches t
            floor = t
            t = (t + miss) / 2
            continue
        lat = _latency(gm, size, backend, batch)
        del gm
        tried.append((t, lat))
        if lat <= latency_ms:
            meet = t
            if miss - t < 0.02:
                break
            t = (t + miss) / 2
        else:
            miss = t
            t = (meet + t) / 2 if meet is not None else max((floor + t) / 2, t * latency_ms / lat * 0.97)
    if meet is None:
        fastest = min(tried, key=lambda p: p[1], default=None)
        got = f"; the fastest tried ran in {fastest[1]:.3g} ms at FLOPs {fastest[0]:g}" if fastest else ""
        raise SearchError(f"no FLOPs target tried meets {latency_ms:g} ms at batch {batch} on {backend} "
                          f"(the original runs in {base:.3g} ms){got}")
    return meet, base


# --------------------------------------------------------------------------------------------------------
# the public entry point


def search(model: nn.Module, *, flops: float | None = None, latency_ms: float | None = None, calibration: Any,
           methods: Sequence[str] = METHODS, budget: int = 48, seed: int = 0, batch: int = 1,
           backend: str = "eager", calibration_limit: int = 64, progress: bool = True,
           input_size: tuple[int, int, int] | None = None, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, frontend: str = "auto") -> SearchResult:
    """Find the per-block schedule (keep counts or merges) that keeps ``model``'s output closest to the original
    at a FLOPs or latency budget, without fine-tuning (module docstring: search space and algorithm; Patch
    Slimming, arXiv 2106.02852 §3.3; DiffRate, arXiv 2305.17997).

    Args:
        model: the ViT (anything ``vitprune.rewrite`` takes); it is not modified (its train/eval modes are
            restored).
        flops: target FLOPs per image as a fraction of the original's, in ``(0, 1)``; a schedule is admissible
            iff its predicted ratio is ``<= flops + 0.005``.
        latency_ms: instead of ``flops``: milliseconds one forward of a ``[batch, C, H, W]`` input may take on
            ``backend`` (``"eager"``, ``"compile"`` or ``"onnxruntime"``), measured on this machine.
        calibration: a folder of images (read recursively, resized and center-cropped to the model's input,
            normalised with the model's own mean/std, :mod:`vitprune.io.preprocess`), a ``[N, C, H, W]``
            tensor or an iterable of ``[B, C, H, W]`` tensors (already normalised).
        methods: among ``"importance-mask"`` (dynamic) and ``"token-merge"``.
        budget: at most this many rewrites scored on the calibration images per FLOPs search (a latency search
            may step its target down twice more, with half the budget each); at least one per method.
        seed: which ``calibration_limit`` images are used when there are more (the search itself is
            deterministic); the same seed gives the same schedule.
        calibration_limit: calibration images used, ``>= 1``.
        progress: a tqdm bar on stderr (only when it is a terminal).
        input_size: ``(C, H, W)`` when it cannot be read from the model or a calibration tensor.
        mean, std: override the normalisation of calibration images read from a folder.
        frontend: as :func:`vitprune.rewrite`.

    Returns:
        A :class:`SearchResult`; ``vitprune.rewrite(model, result.method, **result.params)`` builds the model
        (``result.save(path)`` writes the schedule file ``vitprune rewrite --schedule`` reads).

    Raises:
        SearchError: both or neither of ``flops`` and ``latency_ms``, a target outside ``(0, 1)`` or a
            latency that is not positive, an unknown method or backend, a budget below the number of methods,
            empty or malformed calibration data, no method that admits the target (each method's reason is
            given), a latency no tried FLOPs target meets or that the original model already meets.
        CaptureError, AnalysisError: the model cannot be captured or is not a ViT vitprune can rewrite.
    """
    start = time.perf_counter()
    if (flops is None) == (latency_ms is None):
        raise SearchError("give exactly one of a FLOPs target (--flops F) or a latency (--latency-ms MS)")
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
    if latency_ms is not None:
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
                      frontend, progress)
        if latency_ms is None:
            result, _ = s.result(float(flops), s.run(float(flops), int(budget)), int(budget))
        else:
            result = _search_latency(s, float(latency_ms), backend, int(batch), int(budget))
    finally:
        for m, training in modes.items():
            m.training = training
    result.seconds = time.perf_counter() - start
    return result


def _search_latency(s: _Searcher, latency_ms: float, backend: str, batch: int, budget: int,
                    retries: int = 2) -> SearchResult:
    target, base = _latency_target(s, latency_ms, backend, batch)
    size = tuple(s.x.shape[1:])
    result = None
    for attempt in range(retries + 1):
        b = budget if attempt == 0 else max(len(s.methods), budget // 2)
        try:
            found, gm = s.result(target, s.run(target, b), b)
        except SearchError:
            if result is None:
                raise
            break  # a lower target no method reaches: keep the last schedule found
        measured = _latency(gm, size, backend, batch)
        del gm
        found.latency_ms, found.latency_target_ms, found.latency_original_ms = measured, latency_ms, base
        found.latency_met, found.backend, found.batch = measured <= latency_ms, backend, batch
        result = found
        if result.latency_met:
            break
        target = round(target * min(0.98, latency_ms / measured), 4)
    result.budget = budget
    return result
