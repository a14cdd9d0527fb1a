"""The main job end to end on real images: scikit-learn's handwritten digits.

1. Train a small timm ViT (random init, no hub) on the digits (1,797 real 8x8 scans, 10 classes,
   upsampled to 32x32), stratified 75/25 train/test split, and report its test accuracy.
2. Save it the ways users save models: a pickled module (``torch.save(model)``) and weights +
   architecture (safetensors + ``--arch timm:... --model-arg ...``).
3. Run the vitprune command line on it: ``inspect``, ``rewrite`` (token-drop: keep-all, keep 0.5 in
   training only, keep 0.5 ``--at-inference``), which verifies and saves; reload each saved model
   with ``vitprune.io.load`` and evaluate it on the test split.

    python examples/digits.py                 # under 3 minutes on 2 idle CPU cores (2 of them training)
    python examples/digits.py --epochs 5 --out /tmp/digits
    python examples/digits.py --write-folders /tmp/digits_folders   # only write train/ and val/ PNG folders
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ARCH = "timm:vit_small_patch16_224"
MODEL_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10}
IMAGE_SIZE = 32


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train [1347, 3, 32, 32], y_train, x_test [450, 3, 32, 32], y_test)``, pixels scaled to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, random_state=seed, stratify=labels.numpy()
    )
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def write_image_folders(out_dir: str | Path, seed: int = 0, max_train: int | None = None,
                        max_val: int | None = None) -> dict[str, int]:
    """Write the digits as ImageFolder trees ``out_dir/train/<digit>/*.png`` and ``out_dir/val/<digit>/*.png``.

    The split is :func:`digits_split` (stratified 75/25: 1,347 train / 450 val); each image is the
    ``IMAGE_SIZE x IMAGE_SIZE`` upsampled digit the training here uses, as an 8-bit greyscale PNG
    (``(pixel + 1) / 2 * 255``, so ``vitprune finetune``'s default mean/std 0.5 maps it back to ``[-1, 1]``).
    ``max_train`` / ``max_val`` keep only the first images of each split (the split is shuffled).

    Returns:
        ``{"train": images written, "val": images written}``.

    Raises:
        FileExistsError: ``out_dir/train`` or ``out_dir/val`` exists (nothing is overwritten).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    targets = {"train": out_dir / "train", "val": out_dir / "val"}
    for path in targets.values():
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another folder")
    x_train, y_train, x_test, y_test = digits_split(seed)
    counts = {}
    for name, (x, y, limit) in {"train": (x_train, y_train, max_train), "val": (x_test, y_test, max_val)}.items():
        pixels = ((x[:limit, 0] + 1.0) / 2.0 * 255.0).round().clamp(0, 255).to(torch.uint8)  # [N, H, W]
        for i, (img, label) in enumerate(zip(pixels, y[:limit].tolist())):
            folder = targets[name] / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.numpy()).save(folder / f"{i:04d}.png")
        counts[name] = len(pixels)
    return counts


def build_model(seed: int = 0) -> torch.nn.Module:
    """The example's ViT, randomly initialised from ``seed`` (so runs are repeatable)."""
    import vitprune

    torch.manual_seed(seed)
    return vitprune.load(ARCH, model_args=MODEL_ARGS)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0,
          batch: int = 32, lr: float = 1e-3) -> None:
    """AdamW, cosine schedule with one warm-up epoch, random shifts of up to 2 pixels as augmentation."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            xb, yb = x[order[i:i + batch]], y[order[i:i + batch]]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """Top-1 accuracy in eval mode (seeded, so random token selection is repeatable)."""
    model.eval()
    torch.manual_seed(seed)
    correct = sum(int((model(x[i:i + 256]).argmax(-1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
    return correct / len(x)


def vitprune_cli(*args: str) -> str:
    """Run the ``vitprune`` command line in a subprocess, as a user would; returns its stdout."""
    return vitprune_cli_many([list(args)])[0]


def vitprune_cli_many(commands: list[list[str]]) -> list[str]:
    """Run several ``vitprune`` commands side by side (each its own process, as a user's shell would);
    returns their stdouts in order. Most of a short command is starting Python and importing torch,
    which two cores do twice as fast in parallel."""
    procs = []
    for args in commands:
        print("$ vitprune " + " ".join(args), flush=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "vitprune", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"vitprune failed ({proc.returncode}): {err.strip()}")
        outs.append(out)
    return outs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--out", default="examples/out", help="folder for the models and results")
    parser.add_argument("--write-folders", metavar="DIR", help="only write the digits as ImageFolder trees "
                        "DIR/train and DIR/val (PNG) for `vitprune finetune` / `vitprune eval`, then exit")
    args = parser.parse_args(argv)
    if args.write_folders:
        counts = write_image_folders(args.write_folders)
        print(f"wrote {counts['train']} train and {counts['val']} val images under {args.write_folders}")
        return counts
    import vitprune
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x_train, y_train, x_test, y_test = digits_split()

    model = build_model()
    start = time.perf_counter()
    train(model, x_train, y_train, args.epochs, batch=args.batch, lr=args.lr)
    base_acc = accuracy(model, x_test, y_test)
    print(f"trained {ARCH} {MODEL_ARGS} for {args.epochs} epochs in {time.perf_counter() - start:.0f} s: "
          f"test accuracy {base_acc:.4f} on {len(y_test)} digits")

    pickled, weights = out / "digits_vit.pt", out / "digits_vit.safetensors"
    torch.save(model, pickled)
    save_file(model.state_dict(), str(weights))
    arch_args = ["--arch", ARCH] + [a for k, v in MODEL_ARGS.items() for a in ("--model-arg", f"{k}={v}")]

    results = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "test_images": len(y_test), "original_accuracy": base_acc, "rewrites": {}}
    runs = {
        "keep_all_at_inference": [str(weights), *arch_args, "--keep-rate", "1.0", "--at-inference"],
        "keep_0.5_training_only": [str(pickled), "--trust-pickle", "--keep-rate", "0.5"],
        "keep_0.5_at_inference": [str(pickled), "--trust-pickle", "--keep-rate", "0.5", "--at-inference"],
        "keep_0.5_at_inference_magnitude": [str(pickled), "--trust-pickle", "--keep-rate", "0.5", "--at-inference",
                                            "--selection", "magnitude"],
    }
    inspected, *reports = vitprune_cli_many(
        [["inspect", str(pickled), "--trust-pickle"]]
        + [["rewrite", *run, "--method", "token-drop", "-o", str(out / f"digits_{name}"), "--overwrite", "--json"]
           for name, run in runs.items()])
    print(inspected)
    for (name, run), text in zip(runs.items(), reports):
        target = out / f"digits_{name}"
        report = json.loads(text)
        again = vitprune.load(target)  # reload from disk: no pickle, no timm code needed
        acc = accuracy(again, x_test, y_test)
        results["rewrites"][name] = {
            "accuracy": acc,
            "flops_ratio": report["flops_ratio"],
            "flops_before": report["flops_before"],
            "flops_after": report["flops_after"],
            "keep_all_max_abs_diff": report["keep_all_max_abs_diff"],
            "keep_count": report["decisions"]["keep_count"],
        }
        print(f"{name:<24} accuracy {acc:.4f}  FLOPs x{report['flops_ratio']:.3f}  "
              f"keep-all diff {report['keep_all_max_abs_diff']:.1e}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
