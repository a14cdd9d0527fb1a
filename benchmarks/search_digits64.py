"""``vitprune.search`` on the 64 px digits ViT of ``fidelity_digits64.py``: one schedule file per FLOPs target.

Calibration: 64 images of the TRAIN split (seeded sample; the test split, which the fidelity benchmark scores,
is never seen), no labels. The files land in ``benchmarks/results/schedules/`` and are the ``--schedule``
rows of the fidelity benchmark:

    python benchmarks/search_digits64.py                      # about 1.5 min on 2 cores (model cached)
    python benchmarks/fidelity_digits64.py --tome-src DIR --schedule benchmarks/results/schedules/digits64_flops*.json

With a latency as well (``--latency-ms MS``, or ``--faster-than-tome X --tome-src DIR``: stock ToMe at the
target's ``r`` and the original timed together on ``--backend`` at ``--batch`` by the search's own timer, and
the search asked for ``X`` times ToMe's speed-up over the original), the search must meet both
(:mod:`vitprune.search.latency`); the file is ``digits64_flops{T}_ms.json``:

    python benchmarks/search_digits64.py --targets 0.6 --methods token-merge --faster-than-tome 1.1 \
        --tome-src /tmp/tome_src --backend compile --batch 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import vitprune
from common import ROOT
from fidelity_digits64 import EPOCHS, LR, digits_module, trained_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.7,0.6,0.5")
    p.add_argument("--model", type=Path, help="weights cache, as fidelity_digits64.py's --model")
    p.add_argument("--budget", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "schedules")
    p.add_argument("--methods", default="importance-mask,token-merge")
    p.add_argument("--latency-ms", type=float, help="a latency the schedule must meet as well")
    p.add_argument("--faster-than-tome", type=float, help="latency = stock ToMe's at the target / this")
    p.add_argument("--tome-src", type=Path, help="a checkout of facebookresearch/ToMe (for --faster-than-tome)")
    p.add_argument("--backend", default="eager", choices=("eager", "compile", "onnxruntime"))
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.faster_than_tome and args.tome_src is None:
        p.error("--faster-than-tome needs --tome-src")
    torch.set_num_threads(args.threads)
    digits = digits_module()
    x_train, y_train, x_test, y_test = digits.digits_split()
    import tempfile

    path = args.model or Path(tempfile.gettempdir()) / f"vitprune_digits64_e{EPOCHS}_lr{LR:g}_s0.safetensors"
    model, _ = trained_model(digits, path, EPOCHS, 0, LR, x_train, y_train, x_test, y_test)
    calibration = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:64]]
    args.out.mkdir(parents=True, exist_ok=True)
    for target in (float(t) for t in args.targets.split(",")):
        start = time.perf_counter()
        speedup = None
        if args.faster_than_tome:
            speedup = tome_speedup(args.tome_src, model, target, x_test[:1], args.backend, args.batch) \
                * args.faster_than_tome
        timed = args.latency_ms is not None or speedup is not None
        r = vitprune.search(model, flops=target, latency_ms=args.latency_ms, speedup=speedup, calibration=calibration,
                            budget=args.budget, methods=args.methods, backend=args.backend, batch=args.batch)
        r.save(args.out / f"digits64_flops{target:g}{'_ms' if timed else ''}.json")
        default = f"{r.default_method} {r.default_cosine:.5f}" if r.default_cosine is not None else "none admissible"
        print(f"FLOPs {target:g}: {r.method} {r.params} calibration cosine {r.cosine:.5f} (default {default}), "
              f"measured FLOPs {r.measured_flops_ratio:.4f}, {r.evaluations} rewrites scored, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if timed:
            print(f"  latency {r.latency_ms:.2f} ms (predicted {r.predicted_latency_ms:.2f}, target "
                  f"{r.latency_target_ms:.2f}, original {r.latency_original_ms:.2f}; speed-up {r.speedup:.3f}x, "
                  f"asked {r.speedup_target:.3f}x) at batch {args.batch} on {args.backend}; "
                  f"latency model {r.latency_model}", flush=True)


def tome_speedup(tome_src: Path, model: torch.nn.Module, target: float, one: torch.Tensor, backend: str,
                 batch: int) -> float:
    """Stock ToMe's speed-up over the original at ``target`` FLOPs (its ``r`` as ``fidelity_digits64.py`` picks
    it), both timed together by the search's own timer."""
    from fidelity_digits64 import tome_model, tome_r_at, tome_ratio
    from vitprune.search.latency import measure_latencies

    sys.path.insert(0, str(tome_src.resolve()))
    import tome

    ratio = tome_ratio(tome, model, one)
    r = tome_r_at(ratio, target)
    ms = measure_latencies({"original": model, "tome": tome_model(tome, model, r)}, tuple(one.shape[1:]), backend,
                           batch, repeats=7)
    print(f"stock ToMe r={r} (FLOPs {ratio(r):.3f}): {ms['tome']:.2f} ms, original {ms['original']:.2f} ms "
          f"(speed-up {ms['original'] / ms['tome']:.3f}x) at batch {batch} on {backend}", flush=True)
    return ms["original"] / ms["tome"]


if __name__ == "__main__":
    main()
