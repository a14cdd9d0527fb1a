"""mIoU of a dense model after token pruning: the "dense digits" segmentation ViT, with every token restored.

The model of ``examples/dense_digits.py`` (timm ViT, 64×64 canvases of scikit-learn's handwritten digits,
patch 4: 256 patch tokens + CLS, depth 4; per-token linear head upsampled to 11-class per-pixel logits;
trained here, 8 epochs, cached in /tmp) is rewritten at FLOPs targets 0.7 / 0.6 / 0.5 by

- token-drop at inference (distinct, magnitude and random selection; keep count by bisection on the measured
  ratio, the selection's own FLOPs included),
- importance-mask dynamic (the dense default score, distinct; ``--scores`` adds others) and static
  (``first_block=1``: four blocks; static calibrated on 64 train canvases),
- lifespan-gather (``after_block=1``, distinct score, its regressor as initialised, before fine-tuning),
- token-merge (``flops`` target, proportional attention),

each restoring every dropped token before the head (vitprune's token restore; after token-merge every grid
position takes its merged token's features: ToMe's unmerge). Scored on the 500 test canvases (digits no training canvas used): mIoU over
the 11 classes, and per-pixel agreement with the original's prediction. Then ``--finetune-methods`` at
``--finetune-flops`` are fine-tuned **without labels** (``vitprune.finetune(labels=False)``: per-pixel KL to
the original on the train canvases written as unlabelled PNGs) for ``--epochs`` epochs, and scored again.

    python benchmarks/dense_digits.py                    # ~70 min on 2 cores (training the model: +11 min)
    python benchmarks/dense_digits.py --epochs 2 --targets 0.6 --finetune-methods importance-mask-dynamic

Results: ``benchmarks/results/dense_digits.{json,md}`` (atomic).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitprune
from common import token_drop_keep_count, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import dense_digits as example  # noqa: E402  (the example is a script, not a package)

METHODS = ("token-drop-distinct", "token-drop-magnitude", "token-drop-random", "importance-mask-dynamic",
           "importance-mask-dynamic-mean-query", "importance-mask-static", "lifespan-gather",
           "lifespan-gather-mean-query", "token-merge")


def rewrite(model, method: str, target: float, x: torch.Tensor, calibration: torch.Tensor, **restore):
    """``(rewritten, report)`` of ``method`` at FLOPs ``target``; ``restore`` (``restore="nearest"``): the restore
    rule of the methods that drop tokens (token-merge always unmerges)."""
    if method.startswith("token-drop"):
        selection = method.rsplit("-", 1)[1]
        k = token_drop_keep_count(model, target, x, selection=selection, **restore)  # the rule's FLOPs counted
        num_patches = vitprune.inspect_model(model, example_input=x).num_patches
        return vitprune.rewrite(model, "token-drop", example_input=x, keep_rate=k / num_patches, at_inference=True,
                                selection=selection, **restore)
    if method == "token-merge":
        return vitprune.rewrite(model, "token-merge", example_input=x, flops=target)
    score = {"score": "mean-query"} if method.endswith("-mean-query") else {}  # the pre-distinct default
    if method.startswith("importance-mask"):
        mode = method.split("-")[2]
        extra = {"calibration": [calibration]} if mode == "static" else score
        return vitprune.rewrite(model, "importance-mask", example_input=x, flops=target, mode=mode, first_block=1,
                                **extra, **restore)
    return vitprune.rewrite(model, "lifespan-gather", example_input=x, flops=target, after_block=1, **score, **restore)


@torch.no_grad()
def predictions(model, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    model.eval()
    torch.manual_seed(0)  # token-drop random: the same draws for every run
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def score(model, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None) -> dict:
    pred = predictions(model, x)
    out = example.segmentation_miou(pred, y)
    return {"miou": out["miou"], "pixel_acc": out["pixel_acc"],
            "pixel_agreement": None if reference is None else float((pred == reference).float().mean())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.7,0.6,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--finetune-flops", type=float, default=0.6)
    p.add_argument("--finetune-methods", default="importance-mask-dynamic,lifespan-gather,token-drop-distinct")
    p.add_argument("--epochs", type=int, default=5, help="label-free fine-tuning epochs")
    p.add_argument("--finetune-images", type=int, default=3000, help="train canvases fine-tuned on (unlabelled)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--model-epochs", type=int, default=example.DEFAULTS["epochs"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dense_digits")
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = example.trained_model(epochs=args.model_epochs, log=True)
    x_train, _, x_test, y_test = example.dense_digits_split()
    x = x_test[:2]
    calibration = x_train[:64]
    original_pred = predictions(model, x_test)
    rows = [{"method": "original", "flops": 1.0, **score(model, x_test, y_test, original_pred)}]
    rewritten = {}
    for target in (float(t) for t in args.targets.split(",")):
        for method in args.methods.split(","):
            try:
                gm, report = rewrite(model, method, target, x, calibration)
            except vitprune.VitpruneError as exc:
                rows.append({"method": method, "target": target, "refused": str(exc)})
                continue
            rewritten[(method, target)] = gm
            rows.append({"method": method, "target": target, "flops": report.flops_ratio,
                         "keep_all_max_abs_diff": report.keep_all_max_abs_diff,
                         "tokens_per_block": report.decisions.get("tokens_per_block"),
                         **score(gm, x_test, y_test, original_pred)})
            print(rows[-1], flush=True)
    tuned = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "canvases"
        example.write_images(images, train_images=args.finetune_images)
        for method in args.finetune_methods.split(","):
            gm = rewritten.get((method, args.finetune_flops))
            if gm is None:
                continue
            t0 = time.perf_counter()
            result = vitprune.finetune(gm, images, Path(tmp) / f"ft-{method}", labels=False, epochs=args.epochs,
                                       batch_size=32, lr=args.lr, warmup_epochs=0.5, progress=False, num_workers=0)
            tuned_model = vitprune.load(result.model_path)
            tuned.append({"method": method, "target": args.finetune_flops, "epochs": args.epochs,
                          "images": args.finetune_images, "seconds": time.perf_counter() - t0,
                          "history": [{k: h.get(k) for k in ("epoch", "train_distill", "seconds")}
                                      for h in result.history],
                          **score(tuned_model, x_test, y_test, original_pred)})
            print(tuned[-1], flush=True)
    base = rows[0]["miou"]
    result = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                          "date": datetime.datetime.now().isoformat(timespec="seconds")},
              "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "finetuned": tuned,
              "seconds": time.perf_counter() - start}
    command = "python benchmarks/dense_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command.strip()
    lines = [f"Command: `{result['command']}`.", "",
             f"Dense digits segmentation ViT (`examples/dense_digits.py`, {args.model_epochs} epochs), 500 test canvases; "
             f"torch {torch.__version__}, {result['machine']['date']}. mIoU kept = mIoU / original's "
             f"({base:.4f}). Pixel agreement: with the original's per-pixel prediction.", "",
             "| method | FLOPs target | FLOPs | mIoU | kept | pixel acc | pixel agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['method']} | {r.get('target', '')} | refused: {r['refused']} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r.get('target', '–')} | {r['flops']:.3f} | {r['miou']:.4f} | "
                     f"{r['miou'] / base:.3f} | {r['pixel_acc']:.4f} | "
                     f"{'–' if r['pixel_agreement'] is None else format(r['pixel_agreement'], '.4f')} |")
    if tuned:
        lines += ["", f"Label-free fine-tuning (`vitprune.finetune(labels=False)`: per-pixel KL to the original, "
                      f"{args.finetune_images} unlabelled train canvases, batch 32, lr {args.lr}):", "",
                  "| method | FLOPs target | epochs | minutes | mIoU | kept | pixel agreement |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in tuned:
            lines.append(f"| {r['method']} | {r['target']} | {r['epochs']} | {r['seconds'] / 60:.1f} | {r['miou']:.4f} | "
                         f"{r['miou'] / base:.3f} | {r['pixel_agreement']:.4f} |")
    write_results(args.out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
