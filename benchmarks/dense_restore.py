"""Dense outputs after token pruning, per restore rule: the DINOv2-style stand-in trained on the digits canvases.

The model of ``examples/dinov2_dense.py`` (Hugging Face ``Dinov2Model``: LayerScale, CLS, bicubic
``interpolate_pos_encoding`` from a 24x24 grid to 16x16; a ``ConvTranspose2d`` decoder that is 25% of the
FLOPs; trained here, cached in /tmp) is rewritten, **without fine-tuning**, at FLOPs targets 0.7 / 0.6 / 0.5
of the whole model by

- token-drop at inference (distinct and random selection; keep count by bisection on the measured ratio),
- importance-mask dynamic (the default score, distinct) and static (64 train canvases), ``first_block=1``,
- token-merge (``flops`` target; always restored by ToMe's unmerge: merge-then-unmerge, arXiv 2303.17604),

each dropping method once per restore rule (``--rules``: ``last``, a dropped token's features at the drop point;
``nearest``, the final features of the kept token most similar to it at the first pruning point). ``nearest``'s
similarity matrix costs ``2·P·K·C`` FLOPs (2.7% of this model at K = 161), which every measured FLOPs ratio
includes: token-drop's keep count is bisected on it (so ``nearest`` keeps fewer tokens at the same FLOPs),
importance-mask's solver does not count it (same keep counts under every rule, ``nearest`` a little above the
target). Scored on the
500 test canvases: mIoU (11 classes), mIoU / the original's, and the per-pixel Pearson r against the original
of the foreground probability ``1 - softmax(logits)[background]`` and of the logits (every pixel of every
canvas pooled). ``--finetune`` adds one label-free fine-tune row (``vitprune.finetune(labels=False)``: per-pixel
KL to the original on unlabelled train canvases) per ``--finetune-methods`` at ``--finetune-flops``.

    python benchmarks/dense_restore.py                            # one thread; ~12 min (training: +9 min)
    python benchmarks/dense_restore.py --targets 0.6 --rules nearest --finetune

Results: ``benchmarks/results/dense_restore.{json,md}`` (atomic).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitprune
from common import ROOT, write_results


def _load(name: str, path: Path):
    """A script (``benchmarks/dense_digits.py``, which shares ``dense_digits`` with the example it imports) as a
    module under its own ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits_bench = _load("dense_digits_bench", ROOT / "benchmarks" / "dense_digits.py")  # rewrite(): the methods
sys.path.insert(0, str(ROOT / "examples"))
import dense_digits as example  # noqa: E402  (data and metric)
import dinov2_dense as standin  # noqa: E402  (the model)

METHODS = ("token-drop-distinct", "token-drop-random", "importance-mask-dynamic", "importance-mask-static",
           "token-merge")
UNMERGED = ("token-merge",)  # restored by ToMe's unmerge, whatever the rule


@torch.no_grad()
def outputs(model, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """``[N, 11, 64, 64]`` logits (eval mode; token-drop random: the same draws for every run)."""
    model.eval()
    torch.manual_seed(0)
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' values (all of them pooled), in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def foreground(logits: torch.Tensor) -> torch.Tensor:
    """``[N, 64, 64]``: probability that a pixel is a digit's stroke (any class but background 0)."""
    return 1.0 - logits.softmax(1)[:, 0]


def score(logits: torch.Tensor, y: torch.Tensor, original: torch.Tensor | None) -> dict:
    """mIoU and pixel accuracy of ``logits`` against ``y``; Pearson r of foreground probability and of logits
    against the ``original`` logits."""
    out = example.segmentation_miou(logits, y)
    row = {"miou": out["miou"], "pixel_acc": out["pixel_acc"]}
    if original is not None:
        row |= {"r_foreground": pearson(foreground(logits), foreground(original)),
                "r_logits": pearson(logits, original),
                "pixel_agreement": float((logits.argmax(1) == original.argmax(1)).float().mean())}
    return row


def finetune_row(gm, method: str, rule: str, target: float, args, x_test, y_test, original) -> dict:
    """One label-free fine-tune (per-pixel KL to the original) of ``gm``, scored like the other rows."""
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "canvases"
        example.write_images(images, train_images=args.finetune_images)
        t0 = time.perf_counter()
        result = vitprune.finetune(gm, images, Path(tmp) / "ft", labels=False, epochs=args.epochs, batch_size=32,
                                   lr=args.lr, warmup_epochs=0.5, progress=False, num_workers=0)
        tuned = vitprune.load(result.model_path)
        return {"method": method, "restore": rule, "target": target, "epochs": args.epochs,
                "images": args.finetune_images, "seconds": time.perf_counter() - t0,
                **score(outputs(tuned, x_test), y_test, original)}


def markdown(result: dict, base: float) -> str:
    lines = [f"Command: `{result['command']}`.", "",
             f"DINOv2-style stand-in (`examples/dinov2_dense.py`, {result['model']['epochs']} epochs, decoder "
             f"{result['model']['decoder_flops_share']:.1%} of {result['model']['flops_per_image'] / 1e6:.1f} "
             f"MFLOPs per image), 500 test canvases, no fine-tuning; torch {torch.__version__}, "
             f"{result['machine']['threads']} thread(s), {result['machine']['date']}. kept = mIoU / original's "
             f"({base:.4f}); r fg / r logits: per-pixel Pearson r against the original of the foreground "
             "probability / of the 11 logits; agreement: per-pixel argmax equal to the original's.", "",
             "| method | restore | FLOPs target | FLOPs | tokens per block | mIoU | kept | r fg | r logits | agreement |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "refused" in r:
            lines.append(f"| {r['method']} | {r['restore']} | {r['target']} | refused: {r['refused']} | | | | | | |")
            continue
        tokens = r.get("tokens_per_block")
        lines.append(f"| {r['method']} | {r.get('restore', '–')} | {r.get('target', '–')} | {r['flops']:.3f} | "
                     f"{'–' if tokens is None else tokens} | {r['miou']:.4f} | {r['miou'] / base:.3f} | "
                     f"{r.get('r_foreground', 1.0):.4f} | {r.get('r_logits', 1.0):.4f} | "
                     f"{r.get('pixel_agreement', 1.0):.4f} |")
    if result["finetuned"]:
        lines += ["", "Label-free fine-tuning (`vitprune.finetune(labels=False)`: per-pixel KL to the original, "
                      "unlabelled train canvases, batch 32):", "",
                  "| method | restore | FLOPs target | epochs | images | minutes | mIoU | kept | r fg | agreement |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["finetuned"]:
            lines.append(f"| {r['method']} | {r['restore']} | {r['target']} | {r['epochs']} | {r['images']} | "
                         f"{r['seconds'] / 60:.1f} | {r['miou']:.4f} | {r['miou'] / base:.3f} | "
                         f"{r['r_foreground']:.4f} | {r['pixel_agreement']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.7,0.6,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rules", default="last,nearest", help="restore rules of the dropping methods")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-epochs", type=int, default=standin.DEFAULTS["epochs"])
    p.add_argument("--finetune", action="store_true", help="add the label-free fine-tune rows")
    p.add_argument("--finetune-flops", type=float, default=0.6)
    p.add_argument("--finetune-methods", default="importance-mask-dynamic:last",
                   help="METHOD:RULE,... fine-tuned at --finetune-flops")
    p.add_argument("--epochs", type=int, default=3, help="label-free fine-tuning epochs")
    p.add_argument("--finetune-images", type=int, default=1000, help="unlabelled train canvases fine-tuned on")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dense_restore")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = standin.trained_model(epochs=args.model_epochs, log=True)
    flops = standin.decoder_flops_share(model)
    x_train, _, x_test, y_test = example.dense_digits_split()
    x, calibration = x_test[:2], x_train[:64]
    original = outputs(model, x_test)
    rows = [{"method": "original", "flops": 1.0, **score(original, y_test, None)}]
    rewritten = {}
    for target in (float(t) for t in args.targets.split(",")):
        for method in args.methods.split(","):
            for rule in ("unmerge",) if method in UNMERGED else args.rules.split(","):
                restore = {} if method in UNMERGED else {"restore": rule}
                t0 = time.perf_counter()
                try:
                    gm, report = digits_bench.rewrite(model, method, target, x, calibration, **restore)
                except vitprune.VitpruneError as exc:
                    rows.append({"method": method, "restore": rule, "target": target, "refused": str(exc)})
                    print(rows[-1], flush=True)
                    continue
                rewritten[(method, rule, target)] = gm
                rows.append({"method": method, "restore": rule, "target": target, "flops": report.flops_ratio,
                             "keep_all_max_abs_diff": report.keep_all_max_abs_diff,
                             "tokens_per_block": report.decisions.get("tokens_per_block"),
                             **score(outputs(gm, x_test), y_test, original),
                             "seconds": time.perf_counter() - t0})
                print(rows[-1], flush=True)
    tuned = []
    write(args, argv, start, flops, rows, tuned)  # the table first: a fine-tune takes minutes
    for spec in args.finetune_methods.split(",") if args.finetune else []:
        method, rule = spec.split(":")
        gm = rewritten.get((method, rule, args.finetune_flops))
        if gm is not None:
            tuned.append(finetune_row(gm, method, rule, args.finetune_flops, args, x_test, y_test, original))
            print(tuned[-1], flush=True)
    return write(args, argv, start, flops, rows, tuned)


def write(args, argv, start: float, flops: dict, rows: list, tuned: list) -> dict:
    """``benchmarks/results/dense_restore.{json,md}`` (atomic) of the rows so far; returns the result."""
    result = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                          "date": datetime.datetime.now().isoformat(timespec="seconds")},
              "model": {"epochs": args.model_epochs, "flops_per_image": flops["total"],
                        "decoder_flops_share": flops["share"]},
              "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "finetuned": tuned,
              "command": ("python benchmarks/dense_restore.py "
                          + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
              "seconds": time.perf_counter() - start}
    write_results(args.out, result, markdown(result, rows[0]["miou"]))
    return result


if __name__ == "__main__":
    main()
