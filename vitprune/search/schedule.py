"""The search result and the schedule file ``vitprune rewrite --schedule`` reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vitprune.errors import SearchError

#: the version of the schedule file layout (``{"vitprune_schedule": 1, ...}``).
SCHEDULE_VERSION = 1


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
    flops_target: float  # --flops; with a latency alone, the FLOPs the seeds were solved at
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
    # latency searches only: the searched schedule's time relative to the original's (timed in the same rounds),
    # times the original's first timing, latency_original_ms
    latency_ms: float | None = None
    flops_limit: float | None = None  # the FLOPs constraint (None: a latency alone)
    predicted_latency_ms: float | None = None  # what the latency model predicted for it
    latency_model: dict[str, Any] | None = None  # LatencyModel.to_dict(): original ms, merge overheads, scale
    latency_target_ms: float | None = None
    latency_original_ms: float | None = None
    latency_met: bool | None = None
    speedup: float | None = None  # the original's time over the schedule's, timed in the same rounds
    speedup_target: float | None = None  # the original's first timing over latency_target_ms
    backend: str | None = None
    batch: int | None = None
    evaluated: list[dict[str, Any]] = field(default_factory=list)  # every evaluation, in order
    seconds: float = 0.0
    model: str | None = None  # what the command line was given as MODEL

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON values (block keys as strings), starting with ``vitprune_schedule``."""
        d = asdict(self)
        d["params"] = jsonable(self.params)
        d["default_params"] = jsonable(self.default_params)
        for key in ("keep_counts", "merges"):
            if d[key] is not None:
                d[key] = {str(b): int(v) for b, v in d[key].items()}
        d["per_method"] = jsonable(d["per_method"])
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


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
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
