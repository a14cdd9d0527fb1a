"""Fidelity of importance-mask without fine-tuning, on the digits ViT of ``examples/digits.py``.

The model (timm ViT, depth 4, 32x32 input, patch 4: 64 patches + CLS) is trained on scikit-learn's
digits (stratified 75/25 split, ``random_state=0``) with the example's own functions, then rewritten,
never fine-tuned, at each FLOPs target (default 0.6 and 0.4) by:

- ``importance-mask`` ``mode=dynamic`` and ``mode=static`` with ``flops=TARGET`` and ``first_block=1``
  (the model has 4 blocks: with the default ``first_block=3`` a 0.4 target is out of reach); static
  calibration uses the TRAIN split in chunks of 64 images, never the test split;
- ``token-drop`` ``at_inference=True``, ``selection=random`` and ``magnitude``: the keep count ``k``
  (keep_rate ``k / 64``) is found by bisection over ``k`` on the rewrite report's measured FLOPs ratio,
  taking the ``k`` whose ratio is closest to the target.

For every rewrite, on the 450 test images, in eval mode, after ``torch.manual_seed(0)``, batches of
256: test accuracy; top-1 agreement (fraction of test images whose argmax equals the original
model's); the report's FLOPs ratio (``torch.utils.flop_counter``, eval mode); keep-all max abs diff;
tokens (prefix + patches) each block attends over. A configuration a pass refuses is recorded with
its error message instead of numbers.

    python benchmarks/fidelity_digits.py                          # trains 30 epochs (a few minutes)
    python benchmarks/fidelity_digits.py --model /tmp/digits.safetensors   # cache: load, or train + save
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch

import vitprune
from common import ROOT, load_example, token_drop_keep_count, write_atomic
from vitprune.errors import VitpruneError

FIRST_BLOCK = 1


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Argmax predictions in eval mode, seeded like ``digits.accuracy`` (same batches of 256)."""
    model.eval()
    torch.manual_seed(0)
    return torch.cat([model(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])


def row_for(name: str, target: float, setting: str, build, x_test, y_test, reference, num_blocks: int) -> dict:
    row = {"method": name, "setting": setting, "target": target}
    try:
        gm, rep = build()
    except VitpruneError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    pred = predict(gm, x_test)
    tpb = rep.decisions["tokens_per_block"]  # token-drop: one int, the same for every block
    params = dict(rep.params)
    if params.get("calibration"):
        params["calibration"] = "train split, chunks of 64"
    row.update(accuracy=float((pred == y_test).float().mean()), agreement=float((pred == reference).float().mean()),
               flops_ratio=rep.flops_ratio, keep_all_max_abs_diff=rep.keep_all_max_abs_diff,
               tokens_per_block=tpb if isinstance(tpb, list) else [tpb] * num_blocks, params=params)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | setting | target | accuracy | agreement | FLOPs ratio | keep-all diff | tokens/block |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['setting']} | {r['target']} | refused: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['setting']} | {r['target']} | {r['accuracy']:.4f} | {r['agreement']:.4f} "
                     f"| {r['flops_ratio']:.3f} | {r['keep_all_max_abs_diff']:.1e} "
                     f"| {' '.join(map(str, r['tokens_per_block']))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and training")
    parser.add_argument("--targets", default="0.6,0.4", help="comma-separated FLOPs targets")
    parser.add_argument("--model", type=Path, help="state-dict .safetensors cache: loaded if it exists, "
                        "else the trained model is saved there")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fidelity_digits.json")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file, save_file

    digits = load_example()
    x_train, y_train, x_test, y_test = digits.digits_split()
    torch.manual_seed(args.seed)
    model = digits.build_model()
    if args.model is not None and args.model.exists():
        model.load_state_dict(load_file(str(args.model)))
        trained, epochs = f"loaded from {args.model}", None  # epochs unknown for a cached model
    else:
        digits.train(model, x_train, y_train, args.epochs, seed=args.seed)
        hp = {k: v.default for k, v in inspect.signature(digits.train).parameters.items() if k in ("batch", "lr")}
        trained, epochs = f"trained {args.epochs} epochs, seed {args.seed}, {hp} (digits.train defaults)", args.epochs
        if args.model is not None:
            save_file(model.state_dict(), str(args.model))
    model.eval()
    reference = predict(model, x_test)
    base_acc = digits.accuracy(model, x_test, y_test)
    print(f"original model ({trained}): test accuracy {base_acc:.4f} on {len(y_test)} digits", flush=True)

    example = x_train[:8]
    vit = vitprune.inspect_model(model, example_input=example)
    num_patches, nb = vit.num_patches, vit.num_blocks
    rows = [{"method": "original", "setting": "-", "target": 1.0, "accuracy": base_acc, "agreement": 1.0,
             "flops_ratio": 1.0, "keep_all_max_abs_diff": 0.0, "tokens_per_block": [vit.num_tokens] * nb}]
    ratios: dict[int, float] = {}
    calibration = lambda: (x_train[i:i + 64] for i in range(0, len(x_train), 64))  # noqa: E731
    for target in (float(t) for t in args.targets.split(",")):
        for mode in ("dynamic", "static"):
            extra = {"calibration": calibration()} if mode == "static" else {}
            rows.append(row_for("importance-mask", target, f"{mode}, first_block={FIRST_BLOCK}",
                                lambda: vitprune.rewrite(model, "importance-mask", example_input=example, flops=target,
                                                         mode=mode, first_block=FIRST_BLOCK, **extra),
                                x_test, y_test, reference, nb))
        try:
            k = token_drop_keep_count(model, target, example, ratios)
        except VitpruneError as exc:
            rows.append({"method": "token-drop", "setting": "bisection", "target": target, "error": str(exc)})
            continue
        for selection in ("random", "magnitude"):
            rows.append(row_for("token-drop", target, f"{selection}, at_inference, keep {k}/{num_patches}",
                                lambda: vitprune.rewrite(model, "token-drop", example_input=example,
                                                         keep_rate=k / num_patches, selection=selection,
                                                         at_inference=True),
                                x_test, y_test, reference, nb))
        print(f"target {target}: done", flush=True)

    md = table(rows)
    print(md)
    header = (f"Digits ViT ({digits.ARCH} {digits.MODEL_ARGS}), {trained}, original test accuracy {base_acc:.4f} "
              f"on {len(y_test)} images; torch {torch.__version__}. No fine-tuning. importance-mask uses "
              f"first_block={FIRST_BLOCK} (4 blocks); static calibration: train split. token-drop keep count "
              f"chosen by bisection over k on the report's FLOPs ratio (closest to target). Eval mode, seed 0.")
    result = {"torch": torch.__version__, "arch": digits.ARCH, "model_args": digits.MODEL_ARGS,
              "epochs": epochs, "seed": args.seed, "model": trained, "test_images": len(y_test),
              "original_accuracy": base_acc, "first_block": FIRST_BLOCK,
              "token_drop_keep_rate": "bisection over keep count on the report's flops_ratio", "rows": rows}
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), header + "\n\n" + md + "\n")
    print(f"results in {args.out} and {args.out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
