"""``vitprune.search`` on the 64 px digits ViT of ``fidelity_digits64.py``: one schedule file per FLOPs target.

Calibration: 64 images of the TRAIN split (seeded sample; the test split, which the fidelity benchmark scores,
is never seen), no labels. The files land in ``benchmarks/results/schedules/`` and are the ``--schedule``
rows of the fidelity benchmark:

    python benchmarks/search_digits64.py                      # about 1.5 min on 2 cores (model cached)
    python benchmarks/fidelity_digits64.py --tome-src DIR --schedule benchmarks/results/schedules/digits64_flops*.json
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args(argv)
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
        r = vitprune.search(model, flops=target, calibration=calibration, budget=args.budget)
        r.save(args.out / f"digits64_flops{target:g}.json")
        print(f"FLOPs {target:g}: {r.method} {r.params} calibration cosine {r.cosine:.5f} (default "
              f"{r.default_method} {r.default_cosine:.5f}), measured FLOPs {r.measured_flops_ratio:.4f}, "
              f"{r.evaluations} rewrites scored, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
