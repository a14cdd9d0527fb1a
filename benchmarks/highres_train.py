"""PatchDropout's claim that training savings grow with image size (arXiv 2208.07220), measured on CPU.

Model: ``vitprune.load("timm:vit_small_patch16_224", model_args={"img_size": S, "num_classes": 10})`` (ViT-S/16,
random init: cost does not depend on weights) at each size S of ``--sizes``, captured as is (keep 1.0) and
rewritten by ``token-drop`` at each keep rate of ``--keep`` (PatchDropout: random patches, prefix token kept,
active in train mode). Every model is saved (``vitprune.save``) to a temporary folder. A training step is
forward (train mode) + cross-entropy + backward + AdamW on one fixed seeded batch (``--batch`` images, random
labels), on ``--threads`` torch threads.

- **train FLOPs ratio**: the rewrite report's ``flops_after_train / flops_before`` (torch.utils.flop_counter,
  attention included): the FLOPs-ideal speed-up is its inverse.
- **images/s**: all models in this process, one warm-up step each (which also sizes ``n``, the steps per timing:
  the fewest steps lasting ``--min-time`` s), then ``--rounds`` rounds; in each round every config is timed
  once over its ``n`` steps (interleaved, so machine noise hits all alike); the median over rounds.
  **speed-up** = images/s over keep 1.0's at the same size; **/ FLOPs-ideal** = speed-up x train FLOPs ratio.
- **peak memory**, each config in a fresh subprocess that loads the saved model: AdamW's state is created
  first (one ``opt.step()`` on zero gradients), then freed memory is returned to the OS (``malloc_trim``), the
  process's peak RSS is reset (``/proc/self/clear_refs`` = 5, Linux) and one training step runs; reported:
  ``VmHWM`` after the step minus ``VmRSS`` before it (``/proc/self/status``): activations, gradients and
  temporaries, a steady-state step's peak above weights + optimizer state, plus a few one-time MiB of a first
  step. Not ``ru_maxrss``: a child's starts at its parent's RSS (fork + exec), which hid the step here.
- **saved activations**: in that subprocess, the bytes of the tensors autograd saves for backward in one
  training forward (``torch.autograd.graph.saved_tensors_hooks``, each storage once, weights excluded), as
  ``benchmarks/finetune_digits.py`` measures them.

    python benchmarks/highres_train.py --threads 2    # full: sizes 224,448,672, batch 2, 5 rounds; ~4-6 min on 2 idle cores (est.)
    python benchmarks/highres_train.py --quick --threads 1            # smoke: sizes 224,448, 2 rounds
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import vitprune
from common import ROOT, saved_activation_bytes, train_step, write_results

ARCH = "timm:vit_small_patch16_224"
MIB = 2**20


def batch(size: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def child(model_dir: str, size: int, n: int, seed: int, threads: int) -> dict[str, Any]:
    """Peak RSS growth of one training step and saved activations, for the saved model ``model_dir``."""
    torch.set_num_threads(threads)
    model = vitprune.load(model_dir)
    x, y = batch(size, n, seed)
    step, opt = train_step(model, x, y)
    for p in model.parameters():  # AdamW state now, so the measured step is a steady-state one
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        method, before = "VmHWM after the step - VmRSS before it (peak reset by /proc/self/clear_refs)", status_bytes("VmRSS")
    except OSError:
        method, before = "VmHWM after - VmHWM before (no clear_refs: a lower bound)", status_bytes("VmHWM")
    step()
    peak = status_bytes("VmHWM")
    return {"rss_before_bytes": before, "peak_rss_bytes": peak, "peak_rss_growth_bytes": peak - before,
            "rss_method": method, "saved_activation_bytes": saved_activation_bytes(model, x)}


def measure_memory(model_dir: Path, size: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--sizes", str(size), "--batch", str(args.batch),
           "--seed", str(args.seed), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- throughput: every config in this process, interleaved ---------------------------------------------------------


def throughput(models: dict[str, torch.nn.Module], xs: dict[str, tuple], rounds: int, min_time: float) -> dict[str, Any]:
    steps = {name: train_step(m, *xs[name])[0] for name, m in models.items()}
    n_steps = {}
    for name, fn in steps.items():  # warm-up (allocator, AdamW state); sizes the steps per timing
        start = time.perf_counter()
        fn()
        n_steps[name] = max(1, math.ceil(min_time / (time.perf_counter() - start)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(n_steps[name]):
                fn()
            times[name].append((time.perf_counter() - start) / n_steps[name])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    return {name: {"steps_per_timing": n_steps[name], "step_s_all": t, "step_s_median": statistics.median(t),
                   "images_per_s": len(xs[name][0]) / statistics.median(t)} for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="224,448,672", help="image sizes in px (multiples of 16)")
    p.add_argument("--keep", default="0.5,0.25", help="token-drop keep rates (keep 1.0 is always measured)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per timing at least (steps per timing)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="defaults sizes 224,448, 2 rounds, min-time 0.3 (a smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "highres_train",
                   help="results: OUT.json and OUT.md")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: memory of one saved model, JSON on stdout
    if p.parse_args(argv).quick:  # other defaults; flags given explicitly still win
        p.set_defaults(sizes="224,448", rounds=2, min_time=0.3)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, int(args.sizes), args.batch, args.seed, args.threads)))
        return {}
    sizes = [int(s) for s in args.sizes.split(",")]
    keeps = [1.0] + [float(k) for k in args.keep.split(",") if float(k) != 1.0]
    torch.set_num_threads(args.threads)
    load_start, began = os.getloadavg(), time.perf_counter()

    models, xs, rows = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="vitprune-highres-") as tmp:
        for size in sizes:
            torch.manual_seed(args.seed)
            original = vitprune.load(ARCH, model_args={"img_size": size, "num_classes": 10})
            x, y = batch(size, args.batch, args.seed)
            num_patches = vitprune.inspect_model(original, example_input=x[:1]).num_patches
            for keep in keeps:
                name = f"{size}px keep {keep}"
                if keep == 1.0:
                    gm, kept, flops = vitprune.capture(original), num_patches, 1.0
                else:
                    gm, rep = vitprune.rewrite(original, "token-drop", keep_rate=keep, example_input=x[:1])
                    kept, flops = rep.decisions["keep_count"], rep.flops_after_train / rep.flops_before
                path = vitprune.save(gm, Path(tmp) / f"m{size}_{keep}")
                mem = measure_memory(path, size, args)
                print(f"[{name}] train FLOPs ratio {flops:.3f}, peak RSS growth {mem['peak_rss_growth_bytes'] / MIB:.0f} "
                      f"MiB, saved activations {mem['saved_activation_bytes'] / MIB:.0f} MiB", flush=True)
                models[name], xs[name] = gm, (x, y)
                rows.append({"name": name, "size": size, "keep_rate": keep, "num_patches": num_patches,
                             "kept_patches": kept, "train_flops_ratio": flops, **mem})
    speed = throughput(models, xs, args.rounds, args.min_time)
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["keep_rate"] == 1.0)
        r.update(speed[r["name"]])
        r["speedup"] = r["images_per_s"] / speed[base["name"]]["images_per_s"]
        r["speedup_over_flops_ideal"] = r["speedup"] * r["train_flops_ratio"]
        r["saved_activations_ratio"] = r["saved_activation_bytes"] / base["saved_activation_bytes"]
        r["peak_rss_growth_ratio"] = r["peak_rss_growth_bytes"] / base["peak_rss_growth_bytes"]

    result = {
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                    "cpu_count": os.cpu_count(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "total_seconds": time.perf_counter() - began},
        "config": {"arch": ARCH, "num_classes": 10, "sizes": sizes, "keep_rates": keeps, "batch": args.batch,
                   "rounds": args.rounds, "min_time": args.min_time, "seed": args.seed, "quick": args.quick,
                   "command": "python benchmarks/highres_train.py " + " ".join(sys.argv[1:] if argv is None else argv)},
        "rows": rows,
    }
    write_results(args.out, result, to_markdown(result))
    return result


def to_markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    lines = [
        f"# Training step cost vs image size: ViT-S/16, token-drop (PatchDropout), CPU{' (quick run)' * c['quick']}", "",
        f"`{c['command']}`", "",
        f"torch {m['torch']}, {m['threads']} thread(s), batch {c['batch']}, {c['rounds']} interleaved rounds "
        f"(>= {c['min_time']} s per timing), seed {c['seed']}, random init, 10 classes; load avg "
        f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; total {m['total_seconds'] / 60:.1f} min; "
        f"{m['date_utc'][:16]} UTC.", "",
        "A step = forward (train mode) + cross-entropy + backward + AdamW. images/s: median over rounds. "
        "The CLS token is always kept besides the patches. Speed-up: over keep 1.0 at the same size; / FLOPs-ideal = speed-up x train FLOPs ratio. Peak memory: "
        f"{r['rows'][0]['rss_method']}, one step in a fresh process with AdamW state already allocated. Saved "
        "activations: tensors autograd saves in one training forward. Method: the script's docstring.", "",
        "| size | patch tokens | keep rate | kept patch tokens | train FLOPs ratio | images/s | speed-up | speed-up / FLOPs-ideal "
        "| peak memory MiB | saved activations MiB | saved act. ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(
            f"| {row['size']} | {row['num_patches']} | {row['keep_rate']:g} | {row['kept_patches']} | "
            f"{row['train_flops_ratio']:.3f} | {row['images_per_s']:.3f} | {row['speedup']:.2f}x | "
            f"{row['speedup_over_flops_ideal']:.2f} | {row['peak_rss_growth_bytes'] / MIB:.0f} | "
            f"{row['saved_activation_bytes'] / MIB:.0f} | {row['saved_activations_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
