"""CPU throughput of a timm ViT and of vitprune rewrites of it, eager and ``torch.compile``.

    python benchmarks/throughput.py --model vit_small_patch16_224 --batch 32 \
        --variant token-drop:keep_rate=0.5,at_inference=True --backend eager,compile --repeats 7 \
        --out benchmarks/results/NAME.json

For every model (the original, then each ``--variant METHOD:key=value,...``, any method registered in
``vitprune.passes.PASSES``) and backend: warm up (for ``compile`` the first call compiles; its wall time
is recorded), then ``--repeats`` rounds; in each round every (model, backend) runs once in turn,
interleaved so machine noise hits all alike. One run = ``--iters`` forward passes of one
``[batch, C, H, W]`` input (size from ``vitprune.load.default_input_size``) under
``torch.inference_mode`` in eval mode.

Units: throughput in images/s (median, min, max over the rounds); speed-up = median / original's median
on the same backend; FLOPs ratio = ``flops_after / flops_before`` of the rewrite report (FLOPs per forward,
``torch.utils.flop_counter``); ideal speed-up = 1 / FLOPs ratio; efficiency = speed-up / ideal;
``token_op_share`` = fraction (0..1) of an eager forward's CPU time spent inside vitprune token modules
(torch.profiler; profiler overhead inflates small ops); ``compile_s`` = seconds of the first compiled call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vitprune
from vitprune.errors import VitpruneError
from vitprune.load import default_input_size, parse_model_args
from vitprune.modules import TokenModule
from vitprune.passes import PASSES

BACKENDS = ("eager", "compile")


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"token-drop:keep_rate=0.5,at_inference=True"`` -> ``("token-drop", {"keep_rate": 0.5, ...})``.

    Values are Python literals (``ast.literal_eval``), else strings; a comma splits parameters only when a
    ``key=`` follows it, so tuple values like ``sizes=(1,2)`` survive.
    """
    method, _, rest = spec.partition(":")
    items = [s.strip() for s in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest) if s.strip()]
    return method.strip(), parse_model_args(items)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed_run(fn: Any, x: torch.Tensor, iters: int) -> float:
    """Seconds (wall clock) for ``iters`` forward passes of ``fn`` on ``x``."""
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return time.perf_counter() - start


def token_op_share(model: nn.Module, x: torch.Tensor, forwards: int = 2) -> float:
    """Fraction (0..1) of eager forward CPU time spent in the model's ``TokenModule`` forwards.

    Each token module's ``forward`` is wrapped in ``record_function("vitprune::<Class>")`` for the
    duration of the profile (an instance attribute, removed afterwards), the whole forward in
    ``record_function("vitprune::forward")``; the share is the sum of the token events' ``cpu_time_total``
    (self + children) over the forward's.
    """
    mods = [m for m in model.modules() if isinstance(m, TokenModule)]
    if not mods:
        return 0.0
    patched = []
    for m in mods:
        label, inner = f"vitprune::{type(m).__name__}", m.forward

        def wrapped(*a: Any, _inner: Any = inner, _label: str = label, **kw: Any) -> Any:
            with torch.profiler.record_function(_label):
                return _inner(*a, **kw)

        patched.append((m, "forward" in m.__dict__, m.__dict__.get("forward")))
        m.forward = wrapped
    try:
        with torch.inference_mode():
            model(x)  # warm-up outside the profile
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(forwards):
                    with torch.profiler.record_function("vitprune::forward"):
                        model(x)
    finally:
        for m, had, old in patched:
            if had:
                m.forward = old
            else:
                del m.forward
    events = {e.key: e.cpu_time_total for e in prof.key_averages()}
    labels = {f"vitprune::{type(m).__name__}" for m in mods}
    total = events.get("vitprune::forward", 0.0)
    return sum(events.get(k, 0.0) for k in labels) / total if total > 0 else float("nan")


def build_models(args: argparse.Namespace) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The original model and each variant's rewrite, as entries ``{name, module, report|error}``."""
    torch.manual_seed(0)
    original = vitprune.load(f"timm:{args.model}", model_args=parse_model_args(args.model_arg)).eval()
    c, h, w = default_input_size(original)
    x = torch.randn(args.batch, c, h, w, generator=torch.Generator().manual_seed(0))
    small = x[:2]  # rewrite's analysis/verification batch: FLOPs ratio does not depend on batch size
    entries: list[dict[str, Any]] = [{"name": "original", "method": None, "params": {}, "module": original}]
    for spec in args.variant:
        method, params = parse_variant(spec)
        entry: dict[str, Any] = {"name": spec, "method": method, "params": params, "module": None}
        try:
            gm, report = vitprune.rewrite(original, method, example_input=small, **params)
            entry.update(module=gm.eval(), flops_before=report.flops_before, flops_after=report.flops_after)
        except Exception as exc:  # a pass that refuses this model: record and go on with the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(f"rewrite {spec!r} failed: {entry['error']}", file=sys.stderr)
        entries.append(entry)
    flops = next((e["flops_before"] for e in entries if "flops_before" in e), None)
    if flops is None:
        from vitprune.flops import count_flops

        flops = count_flops(original, small)
    entries[0].update(flops_before=flops, flops_after=flops)
    return entries, x


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements; returns the JSON-ready result (``machine``, ``config``, ``rows``)."""
    torch.set_num_threads(args.threads)
    load_start, started = os.getloadavg(), datetime.datetime.now(datetime.timezone.utc)
    entries, x = build_models(args)
    runs: list[dict[str, Any]] = []  # one per (model, backend)
    for backend in args.backend:
        for e in entries:
            row = {"model": e["name"], "method": e["method"], "params": e["params"], "backend": backend,
                   "flops_before": e.get("flops_before"), "flops_after": e.get("flops_after"),
                   "compile_s": None, "error": e.get("error"), "seconds": []}
            runs.append(row)
            if e["module"] is None:
                continue
            fn = e["module"] if backend == "eager" else torch.compile(e["module"], dynamic=False)
            try:
                with torch.inference_mode():
                    start = time.perf_counter()
                    fn(x)  # compile: this call compiles
                    if backend == "compile":
                        row["compile_s"] = time.perf_counter() - start
                    fn(x)
                row["fn"] = fn
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                print(f"{backend} {e['name']!r} failed: {row['error']}", file=sys.stderr)
    live = [r for r in runs if "fn" in r]
    with torch.inference_mode():
        for i in range(args.repeats):
            for r in live:
                r["seconds"].append(timed_run(r["fn"], x, args.iters))
            print(f"round {i + 1}/{args.repeats} done", file=sys.stderr)
    shares = {e["name"]: token_op_share(e["module"], x) for e in entries[1:] if e["module"] is not None}
    rows = []
    for r in runs:
        r.pop("fn", None)
        ips = [args.batch * args.iters / s for s in r.pop("seconds")]
        r["images_per_s"] = ips
        r["images_per_s_median"] = statistics.median(ips) if ips else None
        r["images_per_s_min"] = min(ips) if ips else None
        r["images_per_s_max"] = max(ips) if ips else None
        r["token_op_share"] = shares.get(r["model"]) if r["backend"] == "eager" else None
        ratio = r["flops_after"] / r["flops_before"] if r["flops_before"] and r["flops_after"] else None
        r["flops_ratio"], r["ideal_speedup"] = ratio, (1 / ratio if ratio else None)
        rows.append(r)
    for r in rows:
        base = next(b for b in rows if b["backend"] == r["backend"] and b["model"] == "original")
        ok = r["images_per_s_median"] and base["images_per_s_median"]
        r["speedup"] = r["images_per_s_median"] / base["images_per_s_median"] if ok else None
        r["efficiency"] = r["speedup"] / r["ideal_speedup"] if r["speedup"] and r["ideal_speedup"] else None
    c, h, w = x.shape[1:]
    machine = {"torch": torch.__version__, "timm": getattr(sys.modules.get("timm"), "__version__", None), "vitprune": vitprune.__version__,
               "python": platform.python_version(), "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
               "date": started.isoformat(timespec="seconds"),
               "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    config = {"model": args.model, "model_args": parse_model_args(args.model_arg), "batch": args.batch,
              "input_shape": [args.batch, c, h, w], "iters": args.iters, "repeats": args.repeats,
              "backends": args.backend, "variants": args.variant, "argv": args.argv}
    return {"machine": machine, "config": config, "rows": rows}


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table (one row per model and backend) with a one-line header."""
    m, c = result["machine"], result["config"]
    lines = [f"`{c['model']}` batch {c['batch']}, input {c['input_shape']}, {c['repeats']} rounds × {c['iters']} "
             f"forwards; torch {m['torch']}, {m['threads']} threads, {m['cpu_model']}, {m['date']}, "
             f"load avg {m['loadavg_start'][0]:.2f} → {m['loadavg_end'][0]:.2f}", "",
             "| model | backend | img/s (median) | min–max | speed-up | FLOPs ratio | ideal | efficiency "
             "| token-op share | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["images_per_s_median"] is None:
            lines.append(f"| {r['model']} | {r['backend']} | error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['backend']} | {_f(r['images_per_s_median'], '.1f')} "
            f"| {_f(r['images_per_s_min'], '.1f')}–{_f(r['images_per_s_max'], '.1f')} | {_f(r['speedup'], '.2f')}× "
            f"| {_f(r['flops_ratio'], '.3f')} | {_f(r['ideal_speedup'], '.2f')}× | {_f(r['efficiency'], '.0%')} "
            f"| {_f(r['token_op_share'], '.1%')} | {_f(r['compile_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="timm architecture (random init)")
    p.add_argument("--model-arg", action="append", default=[], metavar="K=V", help="timm.create_model argument")
    p.add_argument("--batch", type=int, default=32, help="images per forward")
    p.add_argument("--variant", action="append", default=[], metavar="METHOD:K=V,...",
                   help=f"a rewrite to measure (repeatable); methods: {', '.join(sorted(PASSES))}")
    p.add_argument("--backend", default="eager,compile", help="comma list of: " + ", ".join(BACKENDS))
    p.add_argument("--repeats", type=int, default=7, help="timed rounds")
    p.add_argument("--iters", type=int, default=3, help="forward passes per timed run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/MODEL.json); a .md goes next to it")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.backend = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not args.backend or set(args.backend) - set(BACKENDS):
        p.error(f"--backend must be a comma list of {', '.join(BACKENDS)}, got {','.join(args.backend)!r}")
    for spec in args.variant:
        try:
            method, _ = parse_variant(spec)
        except VitpruneError as exc:
            p.error(str(exc))
        if method not in PASSES:
            p.error(f"unknown method {method!r} in --variant {spec!r}; registered: {', '.join(sorted(PASSES))}")
    if min(args.batch, args.repeats, args.iters, args.threads) < 1:
        p.error("--batch, --repeats, --iters and --threads must be >= 1")
    args.out = args.out or Path(__file__).resolve().parent / "results" / f"{args.model}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``--out`` (JSON) and its ``.md``; 1 if any model failed."""
    args = parse_args(argv)
    result = benchmark(args)
    table = markdown(result)
    print(table, end="")
    _write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    _write_atomic(args.out.with_suffix(".md"), table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 1 if any(r["error"] and r["backend"] == "eager" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
