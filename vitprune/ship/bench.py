"""``vitprune bench``: parameters, FLOPs, throughput, latency and peak memory of models × backends × batches.

Timing: after warm-up (compilation included), ``repeats`` rounds; in each round every model runs once
in turn for the same backend and batch (interleaved, so machine noise hits all models alike); a run is
``iters`` forward passes under ``torch.inference_mode``. Throughput is the median over rounds, in
images/s. Latency p50/p90 (ms) is measured at batch 1 from single forward passes. Peak memory (eager
only, bytes) is the largest sum of live tensor allocations during one forward, from the profiler's
memory events (``profile_memory=True``): activations and workspaces, not the weights.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vitprune.errors import VitpruneError
from vitprune.io.outputs import atomic_file
from vitprune.frontends.onnx import OnnxModel
from vitprune.graph.flops import count_flops
from vitprune.ops.modules import TokenModule
from vitprune.native_logs import filtered_native_stderr

BACKENDS = ("eager", "compile", "onnxruntime")


@dataclass
class BenchRow:
    """One model × backend × batch measurement."""

    model: str
    backend: str
    batch: int
    params: int
    flops_per_image: int
    images_per_s: float | None = None
    images_per_s_runs: list[float] = field(default_factory=list)
    latency_ms_p50: float | None = None  # batch 1 only
    latency_ms_p90: float | None = None
    peak_memory_bytes: int | None = None  # eager only
    token_op_share: float | None = None  # eager: share of forward CPU time inside vitprune token ops
    accuracy: float | None = None
    speedup: float | None = None  # vs the first model, same backend and batch
    flops_ratio: float | None = None  # vs the first model
    efficiency: float | None = None  # speed-up / FLOPs-ideal speed-up (= speed-up · FLOPs ratio)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _onnx_runner(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    import onnxruntime as ort

    from vitprune.ship.export_onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, example_input=x[:2] if x.shape[0] > 1 else x, parity_batches=(1,))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda t: session.run(None, {name: t.numpy()})[0]


def _onnx_file_runner(model: OnnxModel) -> Callable[[torch.Tensor], Any]:
    """An ONNX Runtime session for an ONNX model, with ONNX Runtime's default (full) graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda t: session.run(None, {name: t.numpy()})[0]


def _onnx_flops(model: OnnxModel, x: torch.Tensor) -> int:
    from vitprune.frontends.onnx import run_values
    from vitprune.graph.flops_onnx import count_onnx_flops

    values = run_values(model.proto, x.numpy())
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    shapes[model.proto.graph.input[0].name] = tuple(x.shape)
    shapes.update({i.name: tuple(i.dims) for i in model.proto.graph.initializer})
    return count_onnx_flops(model.proto, shapes)


def runner(model: nn.Module | OnnxModel, backend: str, x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """A callable running ``model`` on ``backend`` (compiled / exported on first use here).

    Raises:
        VitpruneError: an ONNX model on a backend other than ``onnxruntime``.
    """
    if isinstance(model, OnnxModel):
        if backend != "onnxruntime":
            raise VitpruneError(f"an ONNX model runs on onnxruntime only, not {backend}")
        return _onnx_file_runner(model)
    model.eval()
    if backend == "eager":
        return model
    if backend == "compile":
        from vitprune.ship.compile import compile as vp_compile

        return vp_compile(model)
    if backend == "onnxruntime":
        return _onnx_runner(model, x)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def peak_memory_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak of live tensor bytes allocated during one eager forward (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with filtered_native_stderr(), torch.inference_mode(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    # each op's self memory is what it allocated minus what it freed; "[memory]" events are frees
    # outside any op. Their running sum in time order is the live-bytes timeline.
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def token_op_share(model: nn.Module, x: torch.Tensor, forwards: int = 2) -> float:
    """Fraction (0..1) of eager forward CPU time spent inside the model's vitprune token modules."""
    mods = [m for m in model.modules() if isinstance(m, TokenModule)]
    if not mods:
        return 0.0
    for m in mods:
        inner = m.forward

        def wrapped(*a: Any, _inner: Any = inner, _label: str = f"vitprune::{type(m).__name__}", **kw: Any) -> Any:
            with torch.profiler.record_function(_label):
                return _inner(*a, **kw)

        m.forward = wrapped  # instance attribute, removed below
    try:
        with torch.inference_mode():
            model(x)
            with filtered_native_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(forwards):
                    with torch.profiler.record_function("vitprune::forward"):
                        model(x)
    finally:
        for m in mods:
            del m.forward
    events = {e.key: e.cpu_time_total for e in prof.key_averages()}
    total = events.pop("vitprune::forward", 0.0)
    return sum(v for k, v in events.items() if k.startswith("vitprune::")) / total if total else float("nan")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def bench(models: dict[str, nn.Module], input_size: tuple[int, int, int], *, backends=("eager",), batches=(1, 32),
          repeats: int = 5, iters: int = 3, latency_runs: int = 20,
          accuracy: Callable[[nn.Module], float] | None = None, progress: bool = True) -> list[BenchRow]:
    """Measure every model on every backend and batch size; see the module docstring for the method.

    Args:
        models: name -> model (eval mode is set here); the first one is the baseline for speed-up.
        input_size: ``(C, H, W)``.
        accuracy: optional ``model -> top-1`` (computed once per model, eager).
        progress: show a tqdm progress bar over the timing rounds (on stderr, when it is a terminal).

    Returns:
        One :class:`BenchRow` per model × backend × batch, in that order.
    """
    from tqdm import tqdm

    from vitprune.io.sizes import check_fits

    gen = torch.Generator().manual_seed(0)
    for b in batches:  # before any allocation: refused with the size it would need
        check_fits([b, *input_size], f"--batch {b}")
    inputs = {b: torch.randn(b, *input_size, generator=gen) for b in batches}
    info = {}
    for name, m in models.items():
        onnx_model = isinstance(m, OnnxModel)
        if not onnx_model:
            m.eval()
        try:
            flops = _onnx_flops(m, inputs[batches[0]][:1]) if onnx_model else count_flops(m, inputs[batches[0]][:1])
        except Exception as exc:
            raise VitpruneError(f"{name} fails on a [1, {', '.join(map(str, input_size))}] input: "
                                f"{_first_line(exc)}; all models must take the same input size") from exc
        info[name] = {"params": m.params if onnx_model else sum(p.numel() for p in m.parameters()), "flops": flops,
                      "accuracy": accuracy(m) if accuracy and not onnx_model else None}
    rows: list[BenchRow] = []
    total_rounds = len(backends) * len(batches) * repeats
    # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
    bar = tqdm(total=total_rounds, desc="bench", unit="round", disable=None if progress else True, leave=False)
    for backend in backends:
        fns: dict[str, Any] = {}
        for name, m in models.items():
            try:
                fns[name] = runner(m, backend, inputs[max(batches)])
            except Exception as exc:  # e.g. a model the ONNX exporter cannot handle: record, go on
                fns[name] = exc
        for b in batches:
            x = inputs[b]
            group = []
            for name, m in models.items():
                row = BenchRow(model=name, backend=backend, batch=b, params=info[name]["params"],
                               flops_per_image=info[name]["flops"], accuracy=info[name]["accuracy"])
                fn = fns[name]
                if isinstance(fn, Exception):
                    row.error = _first_line(fn)
                else:
                    try:
                        with torch.inference_mode():
                            fn(x)
                            fn(x)  # warm-up (and compilation for this batch size)
                    except Exception as exc:
                        row.error = _first_line(exc)
                group.append(row)
            live = [r for r in group if r.error is None]
            with torch.inference_mode():
                for _ in range(repeats):
                    for r in live:
                        start = time.perf_counter()
                        for _ in range(iters):
                            fns[r.model](x)
                        r.images_per_s_runs.append(b * iters / (time.perf_counter() - start))
                    bar.update(1)
                if b == 1:
                    for r in live:
                        times = []
                        for _ in range(latency_runs):
                            start = time.perf_counter()
                            fns[r.model](x)
                            times.append((time.perf_counter() - start) * 1e3)
                        r.latency_ms_p50, r.latency_ms_p90 = (float(v) for v in np.percentile(times, [50, 90]))
            for r in live:
                r.images_per_s = statistics.median(r.images_per_s_runs)
                if backend == "eager" and not isinstance(models[r.model], OnnxModel):
                    r.peak_memory_bytes = peak_memory_bytes(models[r.model], x)
                    r.token_op_share = token_op_share(models[r.model], x)
            base = group[0]
            for r in group:
                r.flops_ratio = r.flops_per_image / base.flops_per_image
                if r.images_per_s and base.images_per_s:
                    r.speedup = r.images_per_s / base.images_per_s
                    r.efficiency = r.speedup * r.flops_ratio
            rows.extend(group)
    bar.close()
    return rows


def table(rows: list[BenchRow]) -> str:
    """A markdown table of ``rows``."""
    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| model | backend | batch | params (M) | GFLOPs/img | FLOPs ratio | img/s | speed-up | speed-up / ideal | "
             "p50 / p90 ms | peak MB | token ops | accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.backend} | {r.batch} | error: {r.error} ||||||||||")
            continue
        lat = f"{f(r.latency_ms_p50, '.1f')} / {f(r.latency_ms_p90, '.1f')}" if r.latency_ms_p50 else "–"
        lines.append(f"| {r.model} | {r.backend} | {r.batch} | {r.params / 1e6:.1f} | {r.flops_per_image / 1e9:.2f} "
                     f"| {f(r.flops_ratio, '.3f')} | {f(r.images_per_s, '.1f')} | {f(r.speedup, '.2f')}× | {f(r.efficiency, '.2f')} | {lat} "
                     f"| {f(r.peak_memory_bytes and r.peak_memory_bytes / 2**20, '.0f')} | {f(r.token_op_share, '.1%')} "
                     f"| {f(r.accuracy, '.4f')} |")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[BenchRow], path: str | os.PathLike, backend: str | None = None, batch: int | None = None) -> None:
    """Accuracy (or FLOPs ratio when no accuracy) vs throughput, one point per model; PNG written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pick = [r for r in rows if r.images_per_s and (backend is None or r.backend == backend)
            and (batch is None or r.batch == batch)]
    backend = backend or (pick[0].backend if pick else "eager")
    batch = batch or (max(r.batch for r in pick) if pick else 1)
    pick = [r for r in pick if r.backend == backend and r.batch == batch]
    use_acc = all(r.accuracy is not None for r in pick)
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in pick:
        y = r.accuracy if use_acc else r.flops_ratio
        ax.scatter(r.images_per_s, y)
        ax.annotate(r.model, (r.images_per_s, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"throughput (images/s, {backend}, batch {batch})")
    ax.set_ylabel("top-1 accuracy" if use_acc else "FLOPs ratio to the first model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
