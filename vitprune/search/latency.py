"""Latency for :mod:`vitprune.search`: timing on a backend, and the additive model that predicts a schedule's latency.

A schedule's latency is predicted as ``base_ms · flops_ratio + Σ overhead_ms(N_b)`` over its merging blocks
(a per-operator lookup table, as hardware-aware NAS predicts latency, e.g. FBNet, arXiv 1812.03443 §3.2):
compute scales with the FLOPs the graph analysis predicts, and each ``TokenMerge`` adds the time of its
~20 small kernels (matching, a top-k and a sort, gathers) that FLOPs do not show. On the 64 px digits ViT
(compiled, batch 16) the search measured one merge at 256 patches at 1.89 ms beyond its FLOPs' share, against
64 ms for the whole six-block model (``benchmarks/results/fidelity_digits64_search_latency.md``), and at
FLOPs 0.6 a three-block merge schedule ran at 1.11x the throughput of a six-block one
(``benchmarks/results/fidelity_digits64_compiled.md``: 520 vs 469 img/s). The merge's time is measured, not assumed: one
``TokenMerge`` alone, at the model's width and heads, on the backend and batch size of the search, at a few
token counts (interpolated in between). importance-mask's scoring is in its FLOPs and its gather is one
kernel a stage: it is not charged more.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vitprune.errors import SearchError
from vitprune.graph.analysis import ViTGraph


def measure_latencies(models: dict[str, nn.Module], input_size: tuple[int, ...], backend: str, batch: int,
                      repeats: int = 3, device: Any = "cpu", dtype: Any = None) -> dict[str, float]:
    """Milliseconds for one forward of a ``[batch, *input_size]`` input on ``backend``, per model, measured by
    :func:`vitprune.ship.bench.bench` in interleaved rounds (so the models share the machine's drift; median
    over the rounds: batch 1 the p50 latency, else ``batch`` over the median throughput), on ``device`` in
    ``dtype`` (moved copies off the CPU or float32: the models stay where they are).

    Raises:
        SearchError: a model does not run on ``backend`` (the first line of why).
    """
    from vitprune.device import resolve_device, resolve_dtype
    from vitprune.ship.bench import bench

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if dev.type != "cpu" or dt != torch.float32:
        models = {name: copy.deepcopy(m) for name, m in models.items()}  # bench moves and casts in place
    rows = bench(models, tuple(input_size), backends=(backend,), batches=(batch,), repeats=repeats, iters=2,
                 latency_runs=5 * repeats, progress=False, device=dev, dtype=dt)
    out = {}
    for row in rows:
        if row.error:
            raise SearchError(f"cannot time the model on {backend}: {row.error}")
        out[row.model] = float(row.latency_ms_p50) if batch == 1 else 1e3 * batch / float(row.images_per_s)
    return out


def measure_latency(model: nn.Module, input_size: tuple[int, ...], backend: str, batch: int, **where: Any) -> float:
    """:func:`measure_latencies` of one model (``where``: its ``device`` and ``dtype``)."""
    return measure_latencies({"model": model}, input_size, backend, batch, **where)["model"]


class _MergeProbe(nn.Module):
    """One ``TokenMerge`` as a block calls it: ``x [B, N, C]`` -> merged ``[B, N - r, C]``, its keys ``[B, H, N,
    C / H]`` viewed from ``x`` (a view costs nothing; the merge's own work is what is timed)."""

    def __init__(self, num_prefix_tokens: int, num_patches: int, heads: int) -> None:
        super().__init__()
        from vitprune.ops.modules import TokenMerge

        self.heads = heads
        self.merge = TokenMerge(num_prefix_tokens, num_patches, max(1, num_patches // 4), block=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return self.merge(x, k)[0]


def merge_overhead_ms(vit: ViTGraph, patches: int, base_ms: float, total_flops: int, backend: str,
                      batch: int, **where: Any) -> float:
    """Milliseconds one ``TokenMerge`` adds beyond its FLOPs' share of ``base_ms``, with ``patches`` patch
    tokens alive, at the first block's width and heads, on ``backend`` at ``batch`` (``r`` = a quarter of the
    patches: its top-k and sort cover every patch whatever ``r`` is). ``total_flops``: the original's per image.
    Never below 0. ``where``: the ``device`` and ``dtype`` of :func:`measure_latencies`."""
    from vitprune.graph.flops import count_flops

    b = vit.blocks[0]
    probe = _MergeProbe(vit.num_prefix_tokens, patches, b.heads).eval()
    size = (vit.num_prefix_tokens + patches, b.dim)
    ms = measure_latencies({"merge": probe}, size, backend, batch, **where)["merge"]
    flops = count_flops(probe, torch.zeros(1, *size))
    return max(0.0, ms - base_ms * flops / total_flops)


@dataclass
class LatencyModel:
    """Predicted milliseconds of a schedule: ``base_ms · flops_ratio + Σ`` merge overheads (module docstring).

    ``scale`` corrects the whole prediction after a searched schedule is measured (measured / predicted).
    """

    base_ms: float
    patches: list[int] = field(default_factory=list)  # patch counts the merge was timed at, ascending
    overhead_ms: list[float] = field(default_factory=list)  # its overhead at each
    scale: float = 1.0

    @classmethod
    def measure(cls, vit: ViTGraph, base_ms: float, total_flops: int, backend: str, batch: int,
                merges: bool, **where: Any) -> "LatencyModel":
        """Time the merge (when ``merges``) at ``P``, ``P/2``, ``P/4`` and ``P/8`` patch tokens (at least 2), on
        ``where``'s ``device`` in its ``dtype`` (:func:`measure_latencies`)."""
        model = cls(float(base_ms))
        if merges:
            P = vit.num_patches
            model.patches = sorted({max(2, P // d) for d in (8, 4, 2, 1)})
            model.overhead_ms = [merge_overhead_ms(vit, p, base_ms, total_flops, backend, batch, **where)
                                 for p in model.patches]
        return model

    def merge_ms(self, patches: int) -> float:
        """The overhead of one merge with ``patches`` patch tokens alive (linear between the timed counts,
        constant beyond them)."""
        if not self.patches:
            return 0.0
        return float(np.interp(patches, self.patches, self.overhead_ms))

    def predict(self, space: Any, v: Sequence[int]) -> float:
        """Milliseconds of schedule ``v`` of ``space`` (:mod:`vitprune.search.spaces`)."""
        ms = self.base_ms * space.ratio(v)
        if space.method == "token-merge":
            prefix = space.vit.num_prefix_tokens
            for r, n in zip(v, space.tokens(v)):
                if r:
                    ms += self.merge_ms(n - prefix)
        return ms * self.scale

    def to_dict(self) -> dict[str, Any]:
        return {"base_ms": self.base_ms, "merge_patches": list(self.patches),
                "merge_overhead_ms": [round(v, 4) for v in self.overhead_ms], "scale": self.scale}
