"""What fine-tuning with fewer tokens costs and buys, on real digits and on ViT-S/16 at 224x224, on CPU.

Data: scikit-learn's digits written as PNG folders by ``examples/digits.py --write-folders`` (1,347 train /
450 val, 32x32). Model: the example's ViT (timm ``vit_small_patch16_224`` with img_size 32, patch 4 -> 64
patches + CLS, width 64, depth 4, 10 classes), random init from ``--seed``. Every training run below is
``vitprune.train.finetune`` (AdamW, lr ``--lr``, batch 64, 1 warm-up epoch, cosine, label smoothing 0.1, clip 1.0,
RandomResizedCrop scale (0.6, 1), no flip), ``--epochs`` epochs, the same seed and the same initial weights.

1. **Training cost** (from scratch): all tokens (the captured model) vs token-drop keep 0.5 (PatchDropout,
   random, training only; no distillation): val top-1 after training (eval: all tokens), seconds per epoch,
   and, on a fixed batch of 64 (``steps`` training steps of forward + backward + AdamW, the two models
   interleaved, ``repeats`` rounds, median): step throughput ratio and two memory measures, ratios
   keep-0.5 / all-tokens:
   - *saved activations*: bytes of the tensors autograd saves for backward during one training forward
     (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once) = the activation memory a
     training step holds at its peak, exactly, on any device;
   - *profiler peak*: the largest ``Total Allocated`` of the CPU allocator seen by ``torch.profiler``
     (``profile_memory=True``) during one whole step, minus its value at the start of the step: activations
     plus gradients plus optimizer temporaries (CPU has no ``max_memory_allocated``; this is its analogue).
   The same three measures for ``vit_small_patch16_224`` at 224x224 (1000 classes, random init), batch 16.
2. **PSS** (arXiv 2208.09520): cyclic schedule (keep 0.8 -> 0.0 -> 0.8 within each epoch, 0.2 buckets, clipped
   to [0.2, 1]; mean ~0.46) vs constant keep 0.5 (run 1) vs all tokens (run 1): val top-1 at inference keep
   rates 1.0, 0.8, 0.6, 0.4 (``vitprune.train.evaluate``: random selection, seed 0; the all-tokens model gets a
   token-drop rewrite to be evaluated so).
3. **Recovery**: the all-tokens model of run 1 rewritten by ``importance-mask`` (``flops=0.5, first_block=1``,
   dynamic top-k by CLS attention), val top-1 before and after ``--recovery-epochs`` epochs of fine-tuning
   at lr ``--recovery-lr`` with distillation from the original model (the default teacher: keep-all).

Torch runs on ``--threads`` threads (default 1: on a CPU shared with other processes, 2 OpenMP threads on
2 busy cores ran a training step 10x slower than 1 thread). The load average at start and end is recorded.

    python benchmarks/finetune_digits.py                      # ~8 minutes on 1 idle core
    python benchmarks/finetune_digits.py --epochs 2 --recovery-epochs 1 --vit-steps 1 --out /tmp/fd  # smoke
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import vitprune
from common import ROOT, load_example, saved_activation_bytes, train_step, write_results

KEEP_RATES = [1.0, 0.8, 0.6, 0.4]


# -- step cost -------------------------------------------------------------------------------------------------


def profiler_peak_bytes(step: Callable[[], None]) -> int:
    """Peak growth of the CPU allocator's ``Total Allocated`` over one step, from ``torch.profiler``'s memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    first = [e for e in events if e.get("name") == "[memory]"][0]["args"]
    return max(totals) - (first["Total Allocated"] - first["Bytes"])


def step_costs(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int,
               repeats: int) -> dict[str, dict[str, Any]]:
    """Per model: images/s of training steps (median over interleaved rounds), saved activations, profiler peak."""
    models = {name: copy.deepcopy(m) for name, m in models.items()}  # the steps change the weights
    fns = {name: train_step(m, x, y)[0] for name, m in models.items()}
    for fn in fns.values():
        fn()  # warm-up (allocator, optimizer state)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    out = {}
    for name, m in models.items():
        med = statistics.median(times[name])
        out[name] = {"step_s_median": med, "step_s_all": times[name], "images_per_s": len(x) / med,
                     "saved_activation_bytes": saved_activation_bytes(m, x),
                     "profiler_peak_bytes": profiler_peak_bytes(fns[name])}
    return out


def ratios(costs: dict[str, dict[str, Any]], num: str, den: str) -> dict[str, float]:
    a, b = costs[num], costs[den]
    return {"step_throughput": a["images_per_s"] / b["images_per_s"],
            "saved_activations": a["saved_activation_bytes"] / b["saved_activation_bytes"],
            "profiler_peak": a["profiler_peak_bytes"] / b["profiler_peak_bytes"]}


# -- runs --------------------------------------------------------------------------------------------------------


def train(name: str, model, folders: Path, work: Path, epochs: int, lr: float, **options) -> dict[str, Any]:
    print(f"[{name}] fine-tuning {epochs} epochs", flush=True)
    start = time.perf_counter()
    result = vitprune.finetune(model, folders / "train", work / name, val=folders / "val", epochs=epochs,
                               batch_size=64, lr=lr, progress=False, **options)
    wall = time.perf_counter() - start
    h = result.history
    print(f"[{name}] val top-1 {h[-1]['val_top1']:.4f}, {wall / epochs:.1f} s/epoch", flush=True)
    return {"result": result, "val_top1": h[-1]["val_top1"], "val_top1_per_epoch": [e["val_top1"] for e in h],
            "train_seconds_per_epoch": statistics.mean(e["seconds"] for e in h),
            "wall_seconds_per_epoch": wall / epochs, "train_images_per_s": statistics.mean(e["images_per_s"] for e in h),
            "keep_rate_mean": statistics.mean(e["keep_rate_mean"] for e in h)}


def at_keep_rates(model, folders: Path) -> dict[str, float]:
    rows = vitprune.evaluate(model, folders / "val", keep_rates=KEEP_RATES, seed=0)["rows"]
    return {f"{r['keep_rate']:.1f}": r["top1"] for r in rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="epochs of each training run")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the from-scratch runs")
    parser.add_argument("--recovery-epochs", type=int, default=5)
    parser.add_argument("--recovery-lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="digits step-cost: steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="step-cost: interleaved rounds")
    parser.add_argument("--vit-steps", type=int, default=3, help="ViT-S 224 step-cost: timed rounds of 1 step")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_digits",
                        help="results: OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    digits = load_example()
    load_start, began = os.getloadavg(), time.perf_counter()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vitprune-finetune-bench-") as tmp:
        work = Path(tmp)
        digits.write_image_folders(work / "digits")
        folders = work / "digits"
        torch.manual_seed(args.seed)
        base = vitprune.capture(vitprune.load(digits.ARCH, model_args=digits.MODEL_ARGS))
        dropped, _ = vitprune.rewrite(base, "token-drop", keep_rate=0.5)
        cyclic_start, _ = vitprune.rewrite(base, "token-drop", keep_rate=0.5)

        # 1. training cost, digits model
        runs = {"all_tokens": train("all_tokens", base, folders, work, args.epochs, args.lr, distill=False),
                "keep_0.5": train("keep_0.5", dropped, folders, work, args.epochs, args.lr, distill=False)}
        g = torch.Generator().manual_seed(args.seed)
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        costs = step_costs({"all_tokens": base, "keep_0.5": dropped}, x, y, args.steps, args.repeats)
        result["digits_cost"] = {
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in runs.items()},
            "step_costs": costs, "ratios_keep_0.5_over_all": ratios(costs, "keep_0.5", "all_tokens")}
        print("[digits] step-cost ratios", result["digits_cost"]["ratios_keep_0.5_over_all"], flush=True)

        # 1b. ViT-S/16 at 224
        torch.manual_seed(args.seed)
        vit = vitprune.load("timm:vit_small_patch16_224")
        vit_td, _ = vitprune.rewrite(vit, "token-drop", keep_rate=0.5)
        g = torch.Generator().manual_seed(args.seed)
        xv, yv = torch.randn(16, 3, 224, 224, generator=g), torch.randint(0, 1000, (16,), generator=g)
        vcosts = step_costs({"all_tokens": vitprune.capture(vit), "keep_0.5": vit_td}, xv, yv, 1, args.vit_steps)
        result["vit_small_224"] = {"batch": 16, "step_costs": vcosts,
                                   "ratios_keep_0.5_over_all": ratios(vcosts, "keep_0.5", "all_tokens")}
        print("[vit_small_224] ratios", result["vit_small_224"]["ratios_keep_0.5_over_all"], flush=True)
        del vit, vit_td

        # 2. PSS cyclic vs constant 0.5 vs all tokens, at inference keep rates
        runs["pss_cyclic"] = train("pss_cyclic", cyclic_start, folders, work, args.epochs, args.lr, distill=False,
                                   schedule="cyclic", keep_start=0.8, keep_end=0.0, bucket=0.2)
        base_td, _ = vitprune.rewrite(runs["all_tokens"]["result"].model, "token-drop", keep_rate=1.0)
        result["pss"] = {
            name: {"train_keep_rate_mean": runs[key]["keep_rate_mean"], "val_top1_at_keep_rate": at_keep_rates(m, folders),
                   "train_seconds_per_epoch": runs[key]["train_seconds_per_epoch"]}
            for name, key, m in [("all tokens", "all_tokens", base_td),
                                 ("constant keep 0.5", "keep_0.5", runs["keep_0.5"]["result"].model),
                                 ("PSS cyclic 0.8->0.0", "pss_cyclic", runs["pss_cyclic"]["result"].model)]}
        result["pss_cyclic_run"] = {k: v for k, v in runs["pss_cyclic"].items() if k != "result"}

        # 3. recovery of an importance-mask model
        original = runs["all_tokens"]["result"].model
        masked, report = vitprune.rewrite(original, "importance-mask", flops=0.5, first_block=1)
        before = vitprune.evaluate(masked, folders / "val")["rows"][0]["top1"]
        tuned = train("importance_mask_ft", masked, folders, work, args.recovery_epochs, args.recovery_lr)
        result["recovery"] = {
            "flops_ratio": report.flops_ratio, "tokens_per_block": report.decisions.get("tokens_per_block"),
            "original_val_top1": vitprune.evaluate(original, folders / "val")["rows"][0]["top1"],
            "before_val_top1": before, "after_val_top1": tuned["val_top1"],
            "after_val_top1_per_epoch": tuned["val_top1_per_epoch"], "epochs": args.recovery_epochs,
            "lr": args.recovery_lr, "distillation": "default teacher (original via keep-all), weight 0.5, T 1"}

    result["machine"] = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                         "cpu_count": os.cpu_count(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                         "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                         "total_seconds": time.perf_counter() - began}
    result["config"] = {"arch": digits.ARCH, "model_args": digits.MODEL_ARGS, "epochs": args.epochs, "lr": args.lr,
                        "batch": 64, "seed": args.seed, "steps": args.steps, "repeats": args.repeats,
                        "vit_steps": args.vit_steps, "train_images": 1347, "val_images": 450}
    write_results(args.out, result, to_markdown(result))
    return result


def to_markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    mb = 1e6
    dc, vc = r["digits_cost"], r["vit_small_224"]
    lines = [f"# Fine-tuning with fewer tokens (digits ViT, CPU, {m['threads']} thread(s))", "",
             f"torch {m['torch']}, {c['epochs']} epochs, lr {c['lr']}, batch {c['batch']}, seed {c['seed']}, "
             f"{c['train_images']} train / {c['val_images']} val digits; load avg {m['loadavg_start'][0]:.2f} -> "
             f"{m['loadavg_end'][0]:.2f}; total {m['total_seconds'] / 60:.1f} min. Method: "
             "`benchmarks/finetune_digits.py` docstring.", "",
             "## 1. Training cost: token-drop keep 0.5 vs all tokens (same start, same seed)", "",
             "| run | val top-1 | train s/epoch | wall s/epoch (incl. val) | train img/s |", "|---|---:|---:|---:|---:|"]
    for name, run in dc["runs"].items():
        lines.append(f"| {name} | {run['val_top1']:.4f} | {run['train_seconds_per_epoch']:.2f} | "
                     f"{run['wall_seconds_per_epoch']:.2f} | {run['train_images_per_s']:.0f} |")
    lines += ["", "| model, batch | variant | step s (median) | img/s | saved activations MB | profiler peak MB |",
              "|---|---|---:|---:|---:|---:|"]
    for label, costs in [("digits ViT, 64", dc["step_costs"]), (f"ViT-S/16 224, {vc['batch']}", vc["step_costs"])]:
        for name, s in costs.items():
            lines.append(f"| {label} | {name} | {s['step_s_median']:.3f} | {s['images_per_s']:.0f} | "
                         f"{s['saved_activation_bytes'] / mb:.1f} | {s['profiler_peak_bytes'] / mb:.1f} |")
    lines += ["", "| ratio keep 0.5 / all tokens | step throughput | saved activations | profiler peak |", "|---|---:|---:|---:|"]
    for label, rr in [("digits ViT", dc["ratios_keep_0.5_over_all"]), ("ViT-S/16 224", vc["ratios_keep_0.5_over_all"])]:
        lines.append(f"| {label} | {rr['step_throughput']:.2f}x | {rr['saved_activations']:.3f} | {rr['profiler_peak']:.3f} |")
    lines += ["", "## 2. PSS cyclic vs constant keep 0.5: val top-1 at inference keep rates (random selection)", "",
              "| trained with | mean train keep | train s/epoch | " + " | ".join(f"keep {k}" for k in KEEP_RATES) + " |",
              "|---|---:|---:|" + "---:|" * len(KEEP_RATES)]
    for name, p in r["pss"].items():
        accs = " | ".join(f"{p['val_top1_at_keep_rate'][f'{k:.1f}']:.4f}" for k in KEEP_RATES)
        lines.append(f"| {name} | {p['train_keep_rate_mean']:.2f} | {p['train_seconds_per_epoch']:.2f} | {accs} |")
    rc = r["recovery"]
    lines += ["", f"## 3. Recovery: importance-mask (flops 0.5, first_block 1) + {rc['epochs']} epochs with distillation", "",
              f"FLOPs ratio {rc['flops_ratio']:.3f}, tokens per block {rc['tokens_per_block']}; fine-tune lr {rc['lr']}, "
              f"{rc['distillation']}.", "", "| model | val top-1 |", "|---|---:|",
              f"| original (all tokens, run 1) | {rc['original_val_top1']:.4f} |",
              f"| importance-mask, no fine-tune | {rc['before_val_top1']:.4f} |",
              f"| importance-mask, fine-tuned | {rc['after_val_top1']:.4f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
