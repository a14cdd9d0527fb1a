"""Speed of every method on one GPU: ViT-B/16 and ViT-L/16 at 224, bfloat16, eager / compiled / CUDA graphs.

Prepared to run in under 8 minutes on one GPU with only what a GPU image has (torch, timm) plus vitprune's
source (``pip install --no-deps -e .`` or ``PYTHONPATH=.``):

    PYTHONPATH=. python benchmarks/gpu_speed.py [--tome-src DIR] [--budget-s 450]
    PYTHONPATH=. python benchmarks/gpu_speed.py --dry-run          # CPU, tiny model, seconds (a test runs it)

What it measures (random init: speed does not depend on the weights), for each architecture:
- the original and every method at FLOPs 0.7 and 0.5: token-drop at inference (keep count by bisection on the
  counted FLOPs), importance-mask dynamic and static (calibrated on random images), lifespan-gather (before any
  fine-tuning), token-merge; stock ToMe (``tome.patch.timm``, ``r`` by bisection on its counted FLOPs) when
  ``--tome-src DIR`` points at a facebookresearch/ToMe checkout;
- :func:`vitprune.ship.bench.bench` rows (CUDA events, interleaved rounds, median): eager at batch 1, 32 and
  256; compiled (inductor, one dynamic-batch graph) at 32 and 256; CUDA graphs (``reduce-overhead``) at batch 1;
  speed-up and speed-up / FLOPs-ideal against the original on the same backend and batch; latency p50 at batch
  1; peak memory (``torch.cuda.max_memory_allocated`` beyond the weights);
- one training step (forward, cross-entropy, backward, AdamW; bfloat16 autocast, float32 weights) of token-drop
  keep 0.5 against keep 1.0: steps/s and peak memory (PatchDropout's headline, arXiv 2208.07220).

The budget: compiling is most of the time (inductor: ~25 s a ViT-B graph, ~1 min a ViT-L graph: 6 models a
FLOPs target and backend), so not everything fits 8 minutes. The stages run in this order, what matters most
first: ViT-B/16 built (rewritten and verified on the CPU, float32), eager at every batch, its training step,
compiled at FLOPs 0.5 (batches 32, 256), CUDA graphs at FLOPs 0.5 (batch 1); then ViT-L/16 built, eager and
trained; then the compiled groups left (ViT-B at 0.7, ViT-L). A stage whose estimate (the first compiled group
measures the seconds per graph) exceeds the time left is skipped and listed; ``--archs ViT-L/16`` in a second
run measures what the first one skipped of ViT-L. The plan is printed first; the results
(``benchmarks/results/gpu_speed.md`` / ``.json``; ``gpu_speed_ViT-L_16`` and so on for ``--archs``) are rewritten
after every stage, so a timeout still leaves a table. Exit status 1 when a stage or a rewrite failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import vitprune
from common import train_step, write_atomic
from vitprune.graph.flops import count_flops
from vitprune.io.origin import default_input_size
from vitprune.ops.modules import TokenDrop
from vitprune.ship.bench import BenchRow, bench, table, timed

#: name -> (timm architecture, constructor arguments, method options beyond the FLOPs target)
ARCHS = {"ViT-B/16": ("vit_base_patch16_224", {}, {}), "ViT-L/16": ("vit_large_patch16_224", {}, {})}
# the dry run: 4 blocks, width 32, 16 patches, on the CPU; compile traced by dynamo alone (backend "eager"); the
# pruning points sit before block 1 (the default, block 3, is past its end)
DRY_ARCHS = {"tiny": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2),
                      {"importance-mask": {"first_block": 1}, "lifespan-gather": {"after_block": 1}})}
TARGETS = (0.7, 0.5)
METHODS = ("token-drop", "importance-mask-dynamic", "importance-mask-static", "lifespan-gather", "token-merge")
#: estimated seconds to compile one graph (inductor, on a GPU machine); replaced by what the first group measures
COMPILE_S = {"ViT-B/16": 25.0, "ViT-L/16": 60.0, "tiny": 1.0}
#: estimated seconds to build (rewrite on the CPU, float32, verified) every model of an architecture
BUILD_S = {"ViT-B/16": 60.0, "ViT-L/16": 120.0, "tiny": 3.0}
#: estimated seconds of the eager rows and of the training step
EAGER_S = {"ViT-B/16": 25.0, "ViT-L/16": 70.0, "tiny": 2.0}
TRAIN_S = {"ViT-B/16": 10.0, "ViT-L/16": 20.0, "tiny": 1.0}


@dataclass
class Setup:
    """What a run measures and where."""

    archs: dict[str, tuple[str, dict, dict]]
    device: torch.device
    dtype: torch.dtype
    batches: tuple[int, int, int]  # (latency batch, throughput batches...)
    compile_backend: str
    repeats: int
    iters: int
    train_batch: int
    budget_s: float
    tome_src: Path | None
    methods: tuple[str, ...] = ()  # of METHODS
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


@dataclass
class Arch:
    """One architecture's models (built lazily), FLOPs ratios and what its compiles took."""

    name: str
    models: dict[str, torch.nn.Module] = field(default_factory=dict)  # "original", "METHOD@F"
    train_models: dict[float, torch.nn.Module] = field(default_factory=dict)  # token-drop keep rate -> model
    notes: dict[str, Any] = field(default_factory=dict)
    compile_s: float | None = None  # measured seconds per compiled graph
    baselines: set = field(default_factory=set)  # the compiled backends the original has rows on


def token_drop_keep_rate(gm: torch.nn.Module, original_flops: int, target: float, one: torch.Tensor) -> float:
    """Keep rate whose token-drop FLOPs ratio (eval, at inference) is closest to ``target``: bisection over the
    keep count of ``gm``'s (one) ``TokenDrop``, counting FLOPs alone (a verified rewrite then uses the rate)."""
    drop = next(m for m in gm.modules() if isinstance(m, TokenDrop))
    saved, ratios = drop.keep_count, {}

    def ratio(k: int) -> float:
        if k not in ratios:
            drop.keep_count = k
            ratios[k] = count_flops(gm, one) / original_flops
        return ratios[k]

    lo, hi = 1, drop.num_patches  # smallest k with ratio(k) >= target lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ratio(mid) >= target else (mid + 1, hi)
    best = min({max(1, lo - 1), lo}, key=lambda k: abs(ratio(k) - target))
    drop.keep_count = saved
    return (best + 0.5) / drop.num_patches  # keep_count_for_rate floors: the middle of k's interval gives k


def build(setup: Setup, arch: Arch, tome: Any) -> list[str]:
    """The original (random init) and every method at every FLOPs target, rewritten and verified on the CPU;
    returns the rewrites that failed (``"METHOD@F: why"``; the others are measured)."""
    name, args, options = setup.archs[arch.name]
    torch.manual_seed(0)
    original = vitprune.load(f"timm:{name}", model_args=args).eval()
    size = default_input_size(original)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    calibration = torch.randn(8, *size, generator=torch.Generator().manual_seed(1))
    one = x[:1]
    flops = count_flops(original, one)
    arch.models["original"] = original
    arch.notes.update(input_size=list(size), original_flops=flops, rewrite_s={})
    probe = vitprune.rewrite(original, "token-drop", keep_rate=0.5, at_inference=True, example_input=x)[0].eval()
    num_patches = next(m for m in probe.modules() if isinstance(m, TokenDrop)).num_patches
    arch.notes["train_flops_ratio"] = {}
    for keep in (1.0, 0.5):  # training: PatchDropout drops in training only
        arch.train_models[keep], report = vitprune.rewrite(original, "token-drop", keep_rate=keep, example_input=x)
        arch.notes["train_flops_ratio"][keep] = report.flops_after_train / report.flops_before
    errors = []
    for target in TARGETS:
        recipes = {
            "token-drop": ("token-drop", dict(keep_rate=token_drop_keep_rate(probe, flops, target, one),
                                              at_inference=True)),
            "importance-mask-dynamic": ("importance-mask", dict(flops=target)),
            "importance-mask-static": ("importance-mask", dict(flops=target, mode="static", calibration=calibration)),
            "lifespan-gather": ("lifespan-gather", dict(flops=target)),
            "token-merge": ("token-merge", dict(flops=target)),
        }
        for method, (pass_name, params) in ((m, recipes[m]) for m in setup.methods):
            start = time.perf_counter()
            try:
                gm, _ = vitprune.rewrite(original, pass_name, example_input=x, **params, **options.get(pass_name, {}))
            except Exception as exc:  # a refused rewrite is reported; the other methods are measured
                errors.append(f"{method}@{target}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
                continue
            arch.models[f"{method}@{target}"] = gm.eval()
            arch.notes["rewrite_s"][f"{method}@{target}"] = round(time.perf_counter() - start, 2)
        if tome is not None:
            from fidelity_digits64 import tome_model, tome_r_for, tome_ratio

            r = tome_r_for(tome_ratio(tome, original, one), target, max_r=num_patches // 2)
            arch.models[f"tome@{target}"] = tome_model(tome, original, r)
            arch.notes.setdefault("tome_r", {})[str(target)] = r
    return errors


def models_at(arch: Arch, target: float | None, with_original: bool = True) -> dict[str, torch.nn.Module]:
    """The original (when asked) and the models rewritten for ``target`` (every target: ``None``)."""
    picked = {k: m for k, m in arch.models.items() if k != "original" and (target is None or k.endswith(f"@{target}"))}
    return {"original": arch.models["original"], **picked} if with_original else picked


def bench_rows(setup: Setup, arch: Arch, models: dict, backend: str, batches: tuple[int, ...],
               cuda_graphs: bool = False) -> list[dict]:
    """:func:`bench` rows of ``models`` as dicts tagged with the architecture."""
    rows = bench(models, tuple(arch.notes["input_size"]), backends=(backend,), batches=batches, repeats=setup.repeats,
                 iters=setup.iters, latency_runs=max(5, 4 * setup.repeats), progress=False, device=setup.device,
                 dtype=setup.dtype, cuda_graphs=cuda_graphs, compile_backend=setup.compile_backend)
    if backend == "compile":
        torch._dynamo.reset()  # frees the compiled graphs (and CUDA graph pools) before the next group
    return [{"arch": arch.name, **r.to_dict()} for r in rows]


def compile_group(setup: Setup, arch: Arch, target: float, cuda_graphs: bool) -> list[dict]:
    """Compiled rows of every model at ``target`` (and of the original, the first time on this backend): one
    dynamic-batch graph each at the throughput batches, or CUDA graphs at batch 1; the measured seconds per graph
    become the estimate of the next groups."""
    models = models_at(arch, target, with_original=cuda_graphs not in arch.baselines)
    arch.baselines.add(cuda_graphs)
    start = time.perf_counter()
    batches = setup.batches[:1] if cuda_graphs else setup.batches[1:]
    rows = bench_rows(setup, arch, models, "compile", batches, cuda_graphs=cuda_graphs)
    arch.compile_s = (time.perf_counter() - start) / len(models)
    return rows


def train_rows(setup: Setup, arch: Arch) -> list[dict]:
    """Steps/s and peak memory of one training step, token-drop keep 0.5 vs keep 1.0 (autocast, float32 weights;
    the batch and labels live on the device)."""
    from vitprune.device import autocast, synchronize

    size = tuple(arch.notes["input_size"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(setup.train_batch, *size, generator=gen).to(setup.device)
    y = torch.randint(0, 1000, (setup.train_batch,), generator=gen).to(setup.device)
    rows = []
    cuda = setup.device.type == "cuda"
    for keep, gm in sorted(arch.train_models.items(), reverse=True):
        resident = torch.cuda.memory_allocated(setup.device) if cuda else 0  # the other models, not this step's
        gm.to(setup.device)  # float32 weights: autocast runs the forward in setup.dtype
        step, _ = train_step(gm, x, y)

        def run(_x: torch.Tensor) -> None:
            with autocast(setup.device, setup.dtype):
                step()

        run(x), run(x)  # warm-up (optimizer state allocated)
        if cuda:
            torch.cuda.reset_peak_memory_stats(setup.device)
        seconds = [timed(run, x, setup.iters) / setup.iters for _ in range(setup.repeats)]
        synchronize(setup.device)
        # weights, gradients, AdamW state and the step's activations: everything but the other resident models
        peak = torch.cuda.max_memory_allocated(setup.device) - resident if cuda else None
        rows.append({"arch": arch.name, "keep_rate": keep, "batch": setup.train_batch,
                     "train_flops_ratio": arch.notes["train_flops_ratio"][keep],
                     "steps_per_s": 1 / sorted(seconds)[len(seconds) // 2], "peak_memory_bytes": peak})
        gm.to("cpu")
        del step
    rows[1]["speedup"] = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    return rows


def with_speedups(rows: list[dict], archs: dict[str, Arch]) -> list[dict]:
    """FLOPs ratio, speed-up and speed-up / FLOPs-ideal of every row against the original of its architecture,
    backend and batch (measured in an earlier group when its own has none)."""
    base = {(r["arch"], r["backend"], r["batch"]): r for r in rows if r["model"] == "original" and r["images_per_s"]}
    for r in rows:
        r["flops_ratio"] = r["flops_per_image"] / archs[r["arch"]].notes["original_flops"]
        b = base.get((r["arch"], r["backend"], r["batch"]))
        if b is None or not r["images_per_s"]:
            r["speedup"] = r["efficiency"] = None
            continue
        r["speedup"] = r["images_per_s"] / b["images_per_s"]
        r["efficiency"] = r["speedup"] * r["flops_ratio"]
    return rows


def summary(rows: list[dict], train: list[dict], setup: Setup) -> str:
    """Markdown: per architecture one line a model (speed-up and speed-up / ideal per backend and batch)."""
    def cell(r: dict | None) -> str:
        if r is None:
            return "–"
        if r.get("error"):
            return "error"
        if r["batch"] == 1:
            return f"{r['latency_ms_p50']:.2f} ms ({r['speedup']:.2f}×, {r['efficiency']:.2f})" if r["speedup"] else \
                f"{r['latency_ms_p50']:.2f} ms"
        return f"{r['images_per_s']:.0f} ({r['speedup']:.2f}×, {r['efficiency']:.2f})" if r["speedup"] else \
            f"{r['images_per_s']:.0f}"

    b1, *tb = setup.batches
    columns = [("eager", b1), *[("eager", b) for b in tb], *[("compile", b) for b in tb], ("compile+cudagraphs", b1)]
    head = ["model", "FLOPs ratio", *[f"{be} b{b}" + (" p50" if b == b1 else " img/s") for be, b in columns],
            f"peak MB eager b{tb[-1]}"]
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        by = {(r["model"], r["backend"], r["batch"]): r for r in rows if r["arch"] == arch}
        out += [f"### {arch}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for model in dict.fromkeys(r["model"] for r in rows if r["arch"] == arch):
            ratio = next((r["flops_ratio"] for r in by.values() if r["model"] == model and r["flops_ratio"]), None)
            peak = (by.get((model, "eager", tb[-1])) or {}).get("peak_memory_bytes")
            out.append(f"| {model} | {'–' if ratio is None else f'{ratio:.3f}'} | "
                       + " | ".join(cell(by.get((model, be, b))) for be, b in columns)
                       + f" | {'–' if peak is None else f'{peak / 2**20:.0f}'} |")
        out.append("")
    if train:
        out += ["### Training step (token-drop, bfloat16 autocast)", "",
                "| arch | keep | batch | train FLOPs ratio | steps/s | speed-up | peak MB |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for t in train:
            peak = "–" if t["peak_memory_bytes"] is None else f"{t['peak_memory_bytes'] / 2**20:.0f}"
            out.append(f"| {t['arch']} | {t['keep_rate']} | {t['batch']} | {t['train_flops_ratio']:.3f} | "
                       f"{t['steps_per_s']:.2f} | {t.get('speedup', 1.0):.2f}× | {peak} |")
        out.append("")
    return "\n".join(out)


def plan(setup: Setup, archs: dict[str, Arch]) -> list[tuple[str, Callable[[], float], Any, str]]:
    """``(stage, estimated seconds, what, arch)`` in the order they run, what matters most first: the first
    architecture whole at FLOPs 0.5 (build, eager, training, compiled at the throughput batches, CUDA graphs at
    batch 1), then the next architecture's build, eager rows and training, then the compiled groups left."""
    n = 1 + len(setup.methods) + (setup.tome_src is not None)  # models per target: the methods (+ ToMe), the original
    cuda = setup.device.type == "cuda"

    def compiled(a: str, target: float) -> list:
        out = []
        for graphs in ([False, True] if cuda else [False]):
            # the original is compiled with the first group of each backend only
            def est(a: str = a, g: bool = graphs) -> float:
                return (n - (g in archs[a].baselines)) * (archs[a].compile_s or COMPILE_S[a])

            what = f"cudagraphs {a} F={target} b{setup.batches[0]}" if graphs else \
                f"compile {a} F={target} b{','.join(map(str, setup.batches[1:]))}"
            out.append((what, est, ("compile", target, graphs), a))
        return out

    def basics(a: str) -> list:
        return [(f"build {a}", lambda: BUILD_S[a], "build", a),
                (f"eager {a} b{','.join(map(str, setup.batches))}", lambda: EAGER_S[a], "eager", a),
                (f"train {a} keep 0.5 vs 1.0", lambda: TRAIN_S[a], "train", a)]

    names = list(archs)
    stages = basics(names[0]) + compiled(names[0], TARGETS[-1])
    for a in names[1:]:
        stages += basics(a)
    stages += [s for t in TARGETS[:-1] for s in compiled(names[0], t)]
    stages += [s for a in names[1:] for t in reversed(TARGETS) for s in compiled(a, t)]
    return stages


def report(out: Path, setup: Setup, archs: dict[str, Arch], rows: list[dict], train: list[dict], done: list,
           skipped: list, machine: dict, command: str) -> str:
    """Write ``out.json`` and ``out.md`` (atomically) with what is measured so far; returns the markdown."""
    with_speedups(rows, archs)
    md = "\n".join([
        f"{machine['device']}, {str(setup.dtype).removeprefix('torch.')}, torch {torch.__version__}, "
        f"{machine['date']}; "
        f"`{command}`. Cells: img/s, or p50 latency at batch 1 (speed-up ×, speed-up / FLOPs-ideal), against the "
        "original on the same backend and batch; peak memory beyond the weights.", "",
        summary(rows, train, setup),
        "Stages run: " + (", ".join(f"{d['stage']} ({d['seconds']} s)" for d in done) or "none"), "",
        "Skipped: " + ("; ".join(skipped) or "none"), "", "All rows:", "",
        table([BenchRow(**{k: v for k, v in r.items() if k != "arch"}) for r in rows])])
    result = {"machine": machine, "command": command,
              "setup": {"budget_s": setup.budget_s, "batches": setup.batches, "targets": TARGETS,
                        "archs": list(setup.archs), "tome_src": str(setup.tome_src) if setup.tome_src else None},
              "archs": {k: v.notes for k, v in archs.items()}, "stages": done, "skipped": skipped,
              "rows": rows, "train": train}
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2, default=str) + "\n")
    write_atomic(out.with_suffix(".md"), md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tome-src", type=Path, help="A facebookresearch/ToMe checkout: stock ToMe beside the methods.")
    p.add_argument("--budget-s", type=float, default=450.0, help="Seconds the whole run may take (8 min less margin).")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"Comma list of {', '.join(ARCHS)} (a second run can "
                   "take what the first one's budget skipped).")
    p.add_argument("--methods", default=",".join(METHODS), help="Comma list of the methods measured [default: all].")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, a tiny model, dynamo without a compiler: checks the script in seconds.")
    p.add_argument("--out", type=Path, help="Results path without suffix [default: benchmarks/results/gpu_speed; a dry "
                   "run: a temporary folder].")
    args = p.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or set(methods) - set(METHODS):
        print(f"gpu_speed: error: --methods takes {', '.join(METHODS)}, got {args.methods!r}", file=sys.stderr)
        return 2
    if args.dry_run:
        setup = Setup(DRY_ARCHS, torch.device("cpu"), torch.bfloat16, (1, 2), "eager", 1, 1, 4, args.budget_s,
                      args.tome_src, methods)
        out = args.out or Path(tempfile.mkdtemp(prefix="gpu_speed_dry_run-")) / "gpu_speed"
    else:
        if not torch.cuda.is_available():
            print("gpu_speed: error: no CUDA GPU here (--dry-run runs on the CPU)", file=sys.stderr)
            return 2
        picked = [a.strip() for a in args.archs.split(",") if a.strip()]
        if not picked or set(picked) - set(ARCHS):
            print(f"gpu_speed: error: --archs takes {', '.join(ARCHS)}, got {args.archs!r}", file=sys.stderr)
            return 2
        setup = Setup({a: ARCHS[a] for a in picked}, torch.device("cuda"), torch.bfloat16, (1, 32, 256), "inductor",
                      3, 3, 64, args.budget_s, args.tome_src, methods)
        default = "gpu_speed" if len(picked) == len(ARCHS) else "gpu_speed_" + "_".join(picked).replace("/", "_")
        out = args.out or Path(__file__).parent / "results" / default
    tome = None
    if args.tome_src is not None:
        sys.path.insert(0, str(args.tome_src.resolve()))
        import tome  # facebookresearch/ToMe
    command = "python benchmarks/gpu_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = {"device": torch.cuda.get_device_name() if setup.device.type == "cuda" else "cpu",
               "torch": torch.__version__, "timm": importlib.metadata.version("timm"), "cuda": torch.version.cuda,
               "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    archs = {a: Arch(a) for a in setup.archs}
    stages = plan(setup, archs)
    print(f"gpu_speed: {machine['device']}, {str(setup.dtype).removeprefix('torch.')}, budget {setup.budget_s:.0f} s; "
          "plan (estimated seconds; a stage whose estimate exceeds the time left is skipped):", flush=True)
    for name, est, _, _ in stages:
        print(f"  {est():6.0f}  {name}", flush=True)
    rows: list[dict] = []
    train: list[dict] = []
    done: list[dict] = []
    skipped: list[str] = []
    failed = False
    for name, est, kind, a in stages:
        arch = archs[a]
        if not arch.models and kind != "build":
            skipped.append(f"{name} (its models were not built)")
            continue
        if est() > setup.left():
            skipped.append(f"{name} (estimated {est():.0f} s, {max(0.0, setup.left()):.0f} s left)")
            print(f"gpu_speed: skip {skipped[-1]}", flush=True)
            continue
        start = time.perf_counter()
        try:
            if kind == "build":
                for error in build(setup, arch, tome):
                    skipped.append(f"rewrite {a} {error}")
                    print(f"gpu_speed: {skipped[-1]}", flush=True)
                    failed = True
            elif kind == "eager":
                rows += bench_rows(setup, arch, models_at(arch, None), "eager", setup.batches)
            elif kind == "train":
                train += train_rows(setup, arch)
            else:
                rows += compile_group(setup, arch, kind[1], cuda_graphs=kind[2])
        except Exception as exc:  # a stage that fails is recorded; the others still run
            skipped.append(f"{name} (failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")
            print(f"gpu_speed: {skipped[-1]}", flush=True)
            failed = True
            if kind == "build":
                arch.models.clear()  # half an architecture is not measured
            continue
        done.append({"stage": name, "seconds": round(time.perf_counter() - start, 1), "estimated_s": round(est(), 1)})
        print(f"gpu_speed: {name}: {done[-1]['seconds']} s ({setup.left():.0f} s left)", flush=True)
        report(out, setup, archs, rows, train, done, skipped, machine, command)  # partial results, every stage
    print(report(out, setup, archs, rows, train, done, skipped, machine, command), flush=True)
    print(f"gpu_speed: wrote {out.with_suffix('.md')} and .json in {setup.budget_s - setup.left():.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
