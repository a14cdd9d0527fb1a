"""lifespan-gather vs importance-mask vs token-drop at FLOPs 0.5 on the real digits ViT, same fine-tune budget.

The example's ViT (``examples/digits.py``: 4 blocks, 64 patches + CLS) is trained on all tokens with
``vitprune.train.finetune`` (``--epochs``), then rewritten three ways at FLOPs ≈ 0.5 and each fine-tuned for the
same ``--recovery-epochs`` at ``--recovery-lr`` with distillation from the original (the default teacher):

- lifespan-gather (``flops=0.5, after_block=1``): life regressor before block 1, static prefix budgets;
- importance-mask dynamic (``flops=0.5, first_block=1``): top-k by CLS attention before each block;
- token-drop at inference (``keep_rate=0.5``, random, training and inference).

Reported: val top-1 (450 real digits) before and after fine-tuning, and the FLOPs ratio. One seed; 1 image
is 0.22 points. Torch runs on ``--threads`` (default 1; see ``finetune_digits.py``).

    python benchmarks/lifespan_digits.py            # ~6 minutes on one idle core
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import vitprune
from common import load_example, write_atomic


VARIANTS = {
    "lifespan-gather": ("lifespan-gather", {"flops": 0.5, "after_block": 1}),
    "importance-mask (dynamic)": ("importance-mask", {"flops": 0.5, "first_block": 1}),
    "token-drop (at inference)": ("token-drop", {"keep_rate": 0.5, "at_inference": True}),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--recovery-epochs", type=int, default=5)
    p.add_argument("--recovery-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lifespan_digits.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    digits = load_example()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits.write_image_folders(tmp / "data")
        base = vitprune.finetune(vitprune.capture(digits.build_model(0)), tmp / "data" / "train", tmp / "base",
                                 val=tmp / "data" / "val", epochs=args.epochs, lr=args.lr, batch_size=64, progress=False)
        original = base.model.eval()
        top1 = base.history[-1]["val_top1"]
        rows = [{"method": "original", "flops_ratio": 1.0, "before": top1, "after": top1}]
        print(f"original: val top-1 {top1:.4f}", flush=True)
        x = torch.randn(2, *original.meta["vitprune"]["input_shape"][1:], generator=torch.Generator().manual_seed(0))
        for name, (method, params) in VARIANTS.items():
            rewritten, report = vitprune.rewrite(original, method, example_input=x, **params)
            before = vitprune.evaluate(rewritten, tmp / "data" / "val", seed=0)["rows"][0]["top1"]
            tuned = vitprune.finetune(rewritten, tmp / "data" / "train", tmp / name.split()[0], val=tmp / "data" / "val",
                                      epochs=args.recovery_epochs, lr=args.recovery_lr, batch_size=64, progress=False)
            after = vitprune.evaluate(tuned.model, tmp / "data" / "val", seed=0)["rows"][0]["top1"]
            rows.append({"method": name, "params": params, "flops_ratio": report.flops_ratio,
                         "tokens_per_block": report.decisions.get("tokens_per_block"), "before": before, "after": after})
            print(f"{name}: FLOPs {report.flops_ratio:.3f}, val top-1 {before:.4f} -> {after:.4f}", flush=True)
    result = {"torch": torch.__version__, "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    md = [f"Digits ViT, trained {args.epochs} epochs on all tokens; each rewrite fine-tuned {args.recovery_epochs} "
          f"epochs at lr {args.recovery_lr} with distillation; val top-1 on 450 digits; torch {torch.__version__}.", "",
          "| method | FLOPs ratio | val top-1 before fine-tune | after |", "|---|---:|---:|---:|"]
    md += [f"| {r['method']} | {r['flops_ratio']:.3f} | {r['before']:.4f} | {r['after']:.4f} |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(result, indent=2))
    write_atomic(args.out.with_suffix(".md"), text)
    return result


if __name__ == "__main__":
    main()
