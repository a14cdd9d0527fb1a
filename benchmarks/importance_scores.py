"""Which patch score keeps the most of a trained ViT's output? importance-mask dynamic, every score, no fine-tuning.

Four digits ViTs are trained here (the model of ``examples/digits.py``: 32x32 input, patch 4, 64 patches,
depth 4, width 64, scikit-learn's digits, stratified 75/25 split), one per family the field ships:

- ``cls``: CLS readout (the example's model, DeiT/AugReg style);
- ``layerscale``: CLS readout with LayerScale (``init_values=0.1``, CaiT/DINOv2 style);
- ``registers``: CLS readout and 4 register tokens (``reg_tokens=4``, "Vision Transformers Need Registers");
- ``mean-pool``: no CLS token, mean over the patches (``global_pool="avg"``).

Each is rewritten by ``importance-mask`` ``mode=dynamic``, ``first_block=1``, at each FLOPs target, once per
score of :data:`vitprune.ops.token_ops.SCORES` (the CLS-row scores only where the readout reads a CLS
token). On the 450 test images, eval mode: top-1 agreement with the original model and the mean cosine
similarity of the logits to the original's; the report's FLOPs ratio (the attention-received score computes
the full attention map, which is counted).

    python benchmarks/importance_scores.py                                # trains 4 models (a few minutes)
    python benchmarks/importance_scores.py --cache /tmp/score_models      # reuse trained weights
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vitprune
from common import ROOT, load_example, write_results
from vitprune.ops.token_ops import SCORES

VARIANTS = {
    "cls": {},
    "layerscale": {"init_values": 0.1},
    "registers": {"reg_tokens": 4},
    "mean-pool": {"class_token": False, "global_pool": "avg"},
}
CLS_SCORES = ("cls", "cls-norm")


def trained(example, name: str, x, y, epochs: int, cache: Path | None) -> torch.nn.Module:
    """The ``name`` variant of the example's ViT, trained ``epochs`` epochs (seed 0), cached as safetensors."""
    torch.manual_seed(0)
    model = vitprune.load(example.ARCH, model_args={**example.MODEL_ARGS, **VARIANTS[name]})
    path = cache / f"{name}_{epochs}ep.safetensors" if cache else None
    if path and path.exists():
        model.load_state_dict(load_file(path))
    else:
        example.train(model, x, y, epochs)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--targets", default="0.7,0.6,0.5")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache", type=Path, help="folder for the trained weights (read if present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "importance_scores")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    example = load_example()
    x_train, y_train, x_test, y_test = example.digits_split(0)
    targets = [float(t) for t in args.targets.split(",")]
    rows, models = [], {}
    for name in args.variants.split(","):
        start = time.perf_counter()
        model = trained(example, name, x_train, y_train, args.epochs, args.cache)
        ref = outputs(model, x_test)
        acc = float((ref.argmax(-1) == y_test).float().mean())
        models[name] = {"model_args": {**example.MODEL_ARGS, **VARIANTS[name]}, "test_accuracy": acc,
                        "seconds_to_train_or_load": round(time.perf_counter() - start, 1)}
        print(f"{name}: test accuracy {acc:.4f}", flush=True)
        for target in targets:
            for score in SCORES:
                if name == "mean-pool" and score in CLS_SCORES:
                    continue
                gm, rep = vitprune.rewrite(model, method="importance-mask", flops=target, first_block=1, score=score,
                                           example_input=x_test[:2])
                out = outputs(gm, x_test)
                rows.append({"variant": name, "target": target, "score": score, "flops_ratio": rep.flops_ratio,
                             "agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                             "cosine": float(F.cosine_similarity(out, ref, dim=-1).mean()),
                             "accuracy": float((out.argmax(-1) == y_test).float().mean()),
                             "tokens_per_block": rep.decisions["tokens_per_block"]})
                print(f"  FLOPs {target}: {score:>18} agreement {rows[-1]['agreement']:.4f} cosine "
                      f"{rows[-1]['cosine']:.4f} (FLOPs {rep.flops_ratio:.3f})", flush=True)
    result = {"torch": torch.__version__, "epochs": args.epochs, "threads": args.threads, "models": models,
              "rows": rows, "command": "python benchmarks/importance_scores.py " + " ".join(argv or [])}
    write_results(args.out, result, table(result))
    return result


def table(result: dict) -> str:
    rows = result["rows"]
    scores = [s for s in SCORES if any(r["score"] == s for r in rows)]
    lines = [
        f"importance-mask dynamic (first_block=1), no fine-tuning, on digits ViTs trained {result['epochs']} epochs "
        f"here (32x32, patch 4, 64 patches, depth 4, width 64); torch {result['torch']}. Command: "
        f"`{result['command'].strip()}`.",
        "",
        "Test accuracy of the originals: " + ", ".join(f"{n} {m['test_accuracy']:.4f}" for n, m in result["models"].items())
        + ".",
        "",
        "Top-1 agreement with the original / mean logit cosine, 450 test images:",
        "",
        "| model | FLOPs | " + " | ".join(scores) + " |",
        "|---|---|" + "---|" * len(scores),
    ]
    keys = sorted({(r["variant"], r["target"]) for r in rows}, key=lambda k: (list(VARIANTS).index(k[0]), -k[1]))
    for variant, target in keys:
        cells = []
        for s in scores:
            r = next((r for r in rows if (r["variant"], r["target"], r["score"]) == (variant, target, s)), None)
            cells.append("-" if r is None else f"{r['agreement']:.3f} / {r['cosine']:.3f}")
        lines.append(f"| {variant} | {target} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over the models and targets each score applies to (agreement / cosine / counted FLOPs ratio):", ""]
    for s in scores:
        mine = [r for r in rows if r["score"] == s]
        lines.append(f"- {s}: {sum(r['agreement'] for r in mine) / len(mine):.4f} / "
                     f"{sum(r['cosine'] for r in mine) / len(mine):.4f} / "
                     f"{sum(r['flops_ratio'] for r in mine) / len(mine):.3f} ({len(mine)} rewrites)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
