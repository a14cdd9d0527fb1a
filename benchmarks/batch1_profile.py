"""Where batch-1 time goes: ViT-S/16 at 224, FLOPs 0.5, eager and compiled, on this CPU.

Three measurements, one run:

1. **Latency** at batch 1 (and batch 16 for comparison) of the original and of each rewrite, eager and
   ``vitprune.compile``, interleaved rounds (every model timed once per round, median over rounds);
   speed-up / FLOPs-ideal = (t_original / t_rewrite) · FLOPs ratio.
2. **Profile** (``torch.profiler``, eager, batch 1): self CPU time grouped into matrix products (linear
   layers), attention (SDPA), token ops (vitprune's top-k, sort, gathers), and the rest (norms, GELU, adds,
   reshapes, Python dispatch), for the original and each rewrite.
3. **Matrix-product efficiency**: GFLOP/s of ``F.linear`` on the model's four linear shapes with ``M`` =
   the token counts the rewrite's blocks see, at batch 1 and batch 16, and the speed-up / FLOPs-ideal those
   rates alone predict for the linear layers (FLOPs-ideal assumes every row costs the same).

    python benchmarks/batch1_profile.py                       # about 5 minutes on 2 idle cores
    python benchmarks/batch1_profile.py --quick --threads 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

import vitprune
from common import ROOT, write_results

METHODS = {
    "token-drop": dict(method="token-drop", keep_rate=0.5, selection="magnitude", at_inference=True),
    "importance-mask-dynamic": dict(method="importance-mask", flops=0.5),
    "importance-mask-static": dict(method="importance-mask", flops=0.5, mode="static"),
}
GROUPS = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::_softmax"),
    "token ops": ("aten::topk", "aten::sort", "aten::gather", "aten::index", "aten::take_along_dim",
                  "aten::index_select", "aten::cat"),
}


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "rest")


def time_once(model, x: torch.Tensor, iters: int) -> float:
    """Seconds per forward, ``iters`` forwards after the caller's warm-up."""
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    return (time.perf_counter() - start) / iters


@torch.no_grad()
def latency(models: dict, batch: int, rounds: int, iters: int) -> dict[str, float]:
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for m in models.values():  # warm-up (compiles)
        m(x)
        m(x)
    times = defaultdict(list)
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(time_once(m, x, iters))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def profile(model, iters: int) -> dict[str, float]:
    """Self CPU milliseconds per forward at batch 1, by group."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model(x)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            model(x)
    out = defaultdict(float)
    for e in prof.key_averages():
        out[group_of(e.key)] += e.self_cpu_time_total / 1000.0 / iters
    wall = time_once(model, x, iters) * 1000.0
    out["total (wall, unprofiled)"] = wall
    return dict(out)


def gemm_rates(tokens: list[int], dim: int, hidden: int, batches: list[int], iters: int) -> list[dict]:
    """GFLOP/s of the four linear layers of a block at each token count and batch."""
    rows = []
    shapes = {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, hidden), "fc2": (hidden, dim)}
    with torch.no_grad():
        for batch in batches:
            for n in tokens:
                total_flops, total_s = 0, 0.0
                for k, m in shapes.values():
                    a, w, b = torch.randn(batch * n, k), torch.randn(m, k), torch.randn(m)
                    for _ in range(3):
                        F.linear(a, w, b)
                    s = min(time_once(lambda t: F.linear(t, w, b), a, iters) for _ in range(3))
                    total_flops += 2 * batch * n * k * m
                    total_s += s
                rows.append({"batch": batch, "tokens": n, "gflops_per_s": total_flops / total_s / 1e9})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=10, help="forwards per timing at batch 1 (batch 16: a fifth)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch1_profile")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.iters = 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = vitprune.load("timm:vit_small_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    calib = [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(2))]
    eager, reports = {"original": original}, {}
    for name, params in METHODS.items():
        params = dict(params)
        if params.get("mode") == "static":
            params["calibration"] = calib
        gm, rep = vitprune.rewrite(original, example_input=x, **params)
        eager[name], reports[name] = gm.eval(), rep
    ratios = {"original": 1.0, **{n: r.flops_ratio for n, r in reports.items()}}
    tokens = {"original": [197] * 12, **{n: (r.decisions["tokens_per_block"] if isinstance(
        r.decisions["tokens_per_block"], list) else [r.decisions["tokens_per_block"]] * 12) for n, r in reports.items()}}
    backends = {"eager": eager}
    if not args.no_compile:
        backends["compile"] = {n: vitprune.compile(m) for n, m in eager.items()}
    result = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "iters": args.iters,
              "flops_ratio": ratios, "tokens_per_block": tokens, "latency": {},
              "command": "python benchmarks/batch1_profile.py " + " ".join(argv or [])}
    for backend, models in backends.items():
        for batch in (1, 16):
            iters = args.iters if batch == 1 else max(1, args.iters // 5)
            t = latency(models, batch, args.rounds, iters)
            result["latency"][f"{backend} batch {batch}"] = t
            print(backend, batch, {n: f"{v * 1000:.1f} ms" for n, v in t.items()}, flush=True)
    result["profile"] = {n: profile(m, args.iters) for n, m in eager.items()}
    counts = sorted({n for t in tokens.values() for n in t}, reverse=True)
    result["gemm"] = gemm_rates(counts, 384, 1536, [1, 16], max(2, args.iters))
    write_results(args.out, result, table(result))
    return result


def table(r: dict) -> str:
    names = list(r["flops_ratio"])
    lines = [f"ViT-S/16 at 224, random init (speed does not depend on weights), torch {r['torch']}, "
             f"{r['threads']} threads, {r['rounds']} interleaved rounds, median. Command: `{r['command'].strip()}`.", "",
             "## Speed-up / FLOPs-ideal", "", "| model | FLOPs ratio | tokens per block | "
             + " | ".join(r["latency"]) + " |", "|---|---:|---|" + "---:|" * len(r["latency"])]
    for n in names:
        cells = []
        for t in r["latency"].values():
            speed = t["original"] / t[n]
            cells.append(f"{t[n] * 1000:.1f} ms, {speed:.2f}× ({speed * r['flops_ratio'][n]:.2f})")
        tpb = r["tokens_per_block"][n]
        lines.append(f"| {n} | {r['flops_ratio'][n]:.3f} | {' '.join(map(str, tpb))} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: latency per forward, speed-up, and (speed-up / FLOPs-ideal).", "",
              "## Eager batch-1 profile (self CPU ms per forward)", ""]
    groups = [g for g in [*GROUPS, "rest", "total (wall, unprofiled)"]]
    lines += ["| model | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for n in names:
        prof = r["profile"][n]
        base = r["profile"]["original"]
        lines.append(f"| {n} | " + " | ".join(
            f"{prof.get(g, 0):.1f} ({prof.get(g, 0) / base[g]:.2f})" if base.get(g) else f"{prof.get(g, 0):.1f}"
            for g in groups) + " |")
    lines += ["", "In brackets: the time relative to the original's for the same group.", "",
              "## Linear-layer throughput by rows (the four linear layers of a block, GFLOP/s)", "",
              "| tokens | batch 1 | batch 16 |", "|---:|---:|---:|"]
    rates = {(g["batch"], g["tokens"]): g["gflops_per_s"] for g in r["gemm"]}
    for n in sorted({g["tokens"] for g in r["gemm"]}, reverse=True):
        lines.append(f"| {n} | {rates[1, n]:.1f} | {rates[16, n]:.1f} |")
    lines += ["", "Linear layers alone, time predicted from these rates (each block's rows at its token count) vs "
              "their FLOPs: the speed-up / FLOPs-ideal the matrix products allow.", "",
              "| model | linear FLOPs ratio | batch 1 | batch 16 |", "|---|---:|---:|---:|"]
    for n in names:
        tokens, base = r["tokens_per_block"][n], r["tokens_per_block"]["original"]
        cells = []
        for batch in (1, 16):
            t = sum(k / rates[batch, k] for k in tokens) / sum(k / rates[batch, k] for k in base)
            cells.append(f"{(1 / t) * sum(tokens) / sum(base):.2f}")
        lines.append(f"| {n} | {sum(tokens) / sum(base):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
