"""``vitprune bench``: parameters, FLOPs, throughput, latency and peak memory of models × backends × batches.

Timing: after warm-up (compilation included), ``repeats`` rounds; in each round every model runs once
in turn for the same backend and batch (interleaved, so machine noise hits all models alike); a run is
``iters`` forward passes under ``torch.inference_mode``. Throughput is the median over rounds, in
images/s. Latency p50/p90 (ms) is measured at batch 1 from single forward passes.

Device and precision (:mod:`vitprune.device`): FLOPs are counted first, where the model is (float32 on the CPU
for a model just loaded; a count does not depend on the dtype), then every model and input is moved and cast
(``module.to(device, dtype)``, in place) and runs there in that dtype. On the
CPU a run is timed with ``time.perf_counter``; on CUDA, which runs asynchronously, with CUDA events
recorded around it after a ``torch.cuda.synchronize`` (the queue is empty, so the events measure the run).

Peak memory (bytes) is what one forward allocates beyond the weights and the input: on the CPU (eager
only) the largest sum of live tensor allocations, from the profiler's memory events (``profile_memory=True``);
on CUDA (every backend) ``torch.cuda.max_memory_allocated`` during the forward minus what was allocated
before it. ``cuda_graphs`` compiles with inductor's CUDA graphs (``mode="reduce-overhead"``; rows say
``compile+cudagraphs``).
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

from vitprune.compat import cpu_profile
from vitprune.device import dtype_name, resolve_device, resolve_dtype, synchronize
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
    peak_memory_bytes: int | None = None  # CPU: eager only; CUDA: every backend (see the module docstring)
    token_op_share: float | None = None  # eager: share of forward CPU time inside vitprune token ops
    accuracy: float | None = None
    speedup: float | None = None  # vs the first model, same backend and batch
    flops_ratio: float | None = None  # vs the first model
    efficiency: float | None = None  # speed-up / FLOPs-ideal speed-up (= speed-up · FLOPs ratio)
    error: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

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


def runner(model: nn.Module | OnnxModel, backend: str, x: torch.Tensor, cuda_graphs: bool = False,
           compile_backend: str = "inductor") -> Callable[[torch.Tensor], Any]:
    """A callable running ``model`` on ``backend`` (compiled / exported on first use here); ``cuda_graphs``:
    the compile backend uses inductor's CUDA graphs (``mode="reduce-overhead"``); ``compile_backend``: its
    ``torch.compile`` backend.

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

        return vp_compile(model, cuda_graphs=cuda_graphs, backend=compile_backend)
    if backend == "onnxruntime":
        return _onnx_runner(model, x)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def cuda_peak_memory_bytes(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """``torch.cuda.max_memory_allocated`` during one forward ``fn(x)`` on ``x``'s GPU, minus the bytes allocated
    before it (weights, input): what the forward itself needs at its peak."""
    synchronize(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    with torch.inference_mode():
        fn(x)
    synchronize(x.device)
    return int(torch.cuda.max_memory_allocated(x.device) - before)


def timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, iters: int = 1) -> float:
    """Seconds ``iters`` calls ``fn(x)`` take: ``time.perf_counter`` on the CPU; on CUDA, CUDA events around
    the calls after a synchronisation (so the events time the calls' kernels, launch gaps included)."""
    if x.device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    synchronize(x.device)
    begin.record()
    for _ in range(iters):
        fn(x)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3  # ms -> s


def peak_memory_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak of live tensor bytes allocated during one eager forward on the CPU (profiler memory events)."""
    with filtered_native_stderr(), torch.inference_mode(), cpu_profile(profile_memory=True) as prof:
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
            with filtered_native_stderr(), cpu_profile() as prof:
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
          accuracy: Callable[[nn.Module], float] | None = None, progress: bool = True,
          device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
          cuda_graphs: bool = False, compile_backend: str = "inductor") -> list[BenchRow]:
    """Measure every model on every backend and batch size; see the module docstring for the method.

    Args:
        models: name -> model (eval mode is set here; moved and cast to ``device``/``dtype`` in place); the
            first one is the baseline for speed-up.
        input_size: ``(C, H, W)``.
        accuracy: optional ``model -> top-1`` (computed once per model, before the move and cast).
        progress: show a tqdm progress bar over the timing rounds (on stderr, when it is a terminal).
        device: ``cpu``, ``cuda``, ``cuda:N``; ``None``: CUDA when available (:func:`vitprune.device.resolve_device`),
            but the CPU for the ``onnxruntime`` backend or an ONNX model (ONNX Runtime runs here on the CPU).
        dtype: ``float32`` (``None``), ``bfloat16`` or ``float16``: what the weights and inputs are cast to.
        cuda_graphs: the ``compile`` backend uses inductor's CUDA graphs (CUDA only).
        compile_backend: the ``torch.compile`` backend of ``compile`` (``"aot_eager"`` traces without code
            generation: for tests and dry runs, not for timings).

    Returns:
        One :class:`BenchRow` per model × backend × batch, in that order.

    Raises:
        VitpruneError: a bad device or dtype, ``onnxruntime`` or an ONNX model off the CPU or in another dtype
            than float32, ``cuda_graphs`` off CUDA, models that fail on the input size.
    """
    from tqdm import tqdm

    from vitprune.io.sizes import check_fits

    onnx_models = [n for n, m in models.items() if isinstance(m, OnnxModel)]
    if device is None and ("onnxruntime" in backends or onnx_models):
        device = "cpu"
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if ("onnxruntime" in backends or onnx_models) and (dev.type != "cpu" or dt != torch.float32):
        raise VitpruneError(f"the onnxruntime backend runs float32 on the CPU here, not {dtype_name(dt)} on {dev}")
    if cuda_graphs and dev.type != "cuda":
        raise VitpruneError(f"--cuda-graphs records CUDA graphs; the device is {dev}")
    gen = torch.Generator().manual_seed(0)
    for b in batches:  # before any allocation: refused with the size it would need
        check_fits([b, *input_size], f"--batch {b}")
    inputs = {b: torch.randn(b, *input_size, generator=gen) for b in batches}
    info = {}
    for name, m in models.items():
        onnx_model = isinstance(m, OnnxModel)
        if not onnx_model:
            m.eval()
        one = inputs[batches[0]][:1]
        param = None if onnx_model else next(m.parameters(), None)
        if param is not None:  # a model already moved (an earlier bench) is counted where it is: FLOPs are FLOPs
            one = one.to(device=param.device, dtype=param.dtype)
        try:
            flops = _onnx_flops(m, one) if onnx_model else count_flops(m, one)
        except Exception as exc:
            raise VitpruneError(f"{name} fails on a [1, {', '.join(map(str, input_size))}] input: "
                                f"{_first_line(exc)}; all models must take the same input size") from exc
        info[name] = {"params": m.params if onnx_model else sum(p.numel() for p in m.parameters()), "flops": flops,
                      "accuracy": accuracy(m) if accuracy and not onnx_model else None}
        if not onnx_model:
            m.to(device=dev, dtype=dt).eval()  # float parameters and buffers only: token indices stay int64
    inputs = {b: x.to(device=dev, dtype=dt) for b, x in inputs.items()}
    rows: list[BenchRow] = []
    total_rounds = len(backends) * len(batches) * repeats
    # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
    bar = tqdm(total=total_rounds, desc="bench", unit="round", disable=None if progress else True, leave=False)
    for backend in backends:
        label = "compile+cudagraphs" if backend == "compile" and cuda_graphs else backend
        fns: dict[str, Any] = {}
        for name, m in models.items():
            try:
                fns[name] = runner(m, backend, inputs[max(batches)], cuda_graphs=cuda_graphs,
                                   compile_backend=compile_backend)
            except Exception as exc:  # e.g. a model the ONNX exporter cannot handle: record, go on
                fns[name] = exc
        for b in batches:
            x = inputs[b]
            group = []
            for name, m in models.items():
                row = BenchRow(model=name, backend=label, batch=b, params=info[name]["params"],
                               flops_per_image=info[name]["flops"], accuracy=info[name]["accuracy"],
                               device=str(dev), dtype=dtype_name(dt))
                fn = fns[name]
                if isinstance(fn, Exception):
                    row.error = _first_line(fn)
                else:
                    try:
                        with torch.inference_mode():
                            for _ in range(3 if cuda_graphs else 2):  # warm-up, compilation (CUDA graphs: recording)
                                fn(x)
                        synchronize(dev)
                    except Exception as exc:
                        row.error = _first_line(exc)
                group.append(row)
            live = [r for r in group if r.error is None]
            with torch.inference_mode():
                for _ in range(repeats):
                    for r in live:
                        r.images_per_s_runs.append(b * iters / timed(fns[r.model], x, iters))
                    bar.update(1)
                if b == 1:
                    for r in live:
                        times = [timed(fns[r.model], x) * 1e3 for _ in range(latency_runs)]
                        r.latency_ms_p50, r.latency_ms_p90 = (float(v) for v in np.percentile(times, [50, 90]))
            for r in live:
                r.images_per_s = statistics.median(r.images_per_s_runs)
                if dev.type == "cuda":
                    r.peak_memory_bytes = cuda_peak_memory_bytes(fns[r.model], x)
                elif backend == "eager" and not isinstance(models[r.model], OnnxModel):
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
    markers = "osD^v<>pPX*h"
    for i, r in enumerate(pick):  # names in a legend: labels beside close points overlapped (hf_im2td)
        ax.scatter(r.images_per_s, r.accuracy if use_acc else r.flops_ratio, marker=markers[i % len(markers)],
                   label=r.model)
    if pick:
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"throughput (images/s, {backend}, batch {batch})")
    ax.set_ylabel("top-1 accuracy" if use_acc else "FLOPs ratio to the first model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
