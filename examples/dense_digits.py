"""A dense-prediction ViT trained here: "dense digits" semantic segmentation on real handwritten scans.

Each 64x64 canvas holds 2-4 of scikit-learn's handwritten digits (real 8x8 scans, upsampled to 16-28 px,
at random positions) on a black background; every pixel is labelled 0 (background) or 1 + the digit
drawn there (strokes only, not the digit's box): 11 classes. The source digits are split 75/25
(stratified) first, so test canvases only hold digits no training canvas used. A small timm ViT (patch 4,
16x16 tokens) with a per-token linear head, upsampled bilinearly to 64x64, is trained from random init
(no hub) and scored by mean IoU over the test canvases.

    python examples/dense_digits.py --epochs 8 --out /tmp/dense_digits      # ~10 min on one core
    python examples/dense_digits.py --write-images /tmp/dense_digits_png    # only write the train canvases

Python (the benchmark): ``model = trained_model(epochs=8)`` trains once and then reloads from a
safetensors cache in ``/tmp``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CANVAS = 64
NUM_CLASSES = 11  # 0 = background, 1 + digit
ARCH = "vit_small_patch16_224"
MODEL_ARGS = {"img_size": CANVAS, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2,
              "num_classes": 0, "global_pool": ""}
TRAIN_IMAGES, TEST_IMAGES = 6000, 500
DIGIT_SIZES = (16, 28)  # inclusive range of a placed digit's side, pixels
DIGITS_PER_CANVAS = (2, 4)  # inclusive
STROKE_THRESHOLD = 0.35  # a pixel is the digit's stroke where its upsampled intensity > this x its max
NOISE_STD = 0.05  # Gaussian noise on the [0, 1] canvas, before clamping
DEFAULTS = {"epochs": 8, "batch_size": 8, "lr": 1e-3}


# --- data -----------------------------------------------------------------------------------------

def place_digits(digits: np.ndarray, classes: list[int], sizes: list[int], positions: list[tuple[int, int]],
                 canvas: int = CANVAS) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``digits`` on a black canvas, in order; a later digit covers earlier ones within its box.

    Args:
        digits: ``[K, 8, 8]`` scans, intensities 0..16 (scikit-learn's ``load_digits().images``).
        classes: ``K`` digit classes 0..9.
        sizes: ``K`` sides in pixels each digit is upsampled to (bilinear).
        positions: ``K`` ``(top, left)`` pixel offsets; the digit must fit in the canvas.

    Returns:
        ``(image [canvas, canvas] float in [0, 1], labels [canvas, canvas] long)``, no noise; label 0 is
        background, ``1 + class`` where that digit's upsampled intensity > ``STROKE_THRESHOLD`` x its max.
    """
    image = torch.zeros(canvas, canvas)
    labels = torch.zeros(canvas, canvas, dtype=torch.long)
    for scan, cls, size, (top, left) in zip(digits, classes, sizes, positions):
        ink = torch.as_tensor(np.asarray(scan), dtype=torch.float32)[None, None] / 16.0
        ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        stroke = ink > STROKE_THRESHOLD * ink.max()
        image[top:top + size, left:left + size] = ink
        labels[top:top + size, left:left + size] = torch.where(stroke, 1 + int(cls), 0)
    return image, labels


def random_canvases(digits: np.ndarray, classes: np.ndarray, count: int, rng: np.random.RandomState,
                    canvas: int = CANVAS) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` canvases of 2-4 digits drawn from ``digits [N, 8, 8]`` / ``classes [N]`` with ``rng``.

    Returns:
        ``(x [count, 3, canvas, canvas] float in [-1, 1], y [count, canvas, canvas] long)``.
    """
    xs, ys = torch.empty(count, canvas, canvas), torch.empty(count, canvas, canvas, dtype=torch.long)
    for i in range(count):
        k = rng.randint(DIGITS_PER_CANVAS[0], DIGITS_PER_CANVAS[1] + 1)
        pick = rng.randint(0, len(digits), size=k)
        sizes = [int(s) for s in rng.randint(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1, size=k)]
        positions = [(int(rng.randint(0, canvas - s + 1)), int(rng.randint(0, canvas - s + 1))) for s in sizes]
        image, ys[i] = place_digits(digits[pick], classes[pick].tolist(), sizes, positions, canvas)
        noise = torch.from_numpy(rng.standard_normal((canvas, canvas)).astype(np.float32)) * NOISE_STD
        xs[i] = (image + noise).clamp(0.0, 1.0)
    x = (xs * 2.0 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, ys


def source_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits split 75/25, stratified: ``(train [1347, 8, 8], train classes, test [450, 8, 8],
    test classes)``, intensities 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    a, b, ya, yb = train_test_split(digits.images, digits.target, test_size=0.25, random_state=seed,
                                    stratify=digits.target)
    return a, ya, b, yb


def dense_digits_split(seed: int = 0, canvas: int = CANVAS, train_images: int = TRAIN_IMAGES,
                       test_images: int = TEST_IMAGES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train [N, 3, canvas, canvas] in [-1, 1], y_train [N, canvas, canvas] long, x_test, y_test)``.

    Train canvases use only the train source digits, test canvases only the test ones
    (:func:`source_split`). Deterministic given ``seed``; the train and test canvases come from separate
    random streams, so changing one count leaves the other split's canvases as they were.
    """
    d_train, c_train, d_test, c_test = source_split(seed)
    x_train, y_train = random_canvases(d_train, c_train, train_images, np.random.RandomState([seed, 0]), canvas)
    x_test, y_test = random_canvases(d_test, c_test, test_images, np.random.RandomState([seed, 1]), canvas)
    return x_train, y_train, x_test, y_test


def write_images(out_dir: str | Path, seed: int = 0, train_images: int = TRAIN_IMAGES) -> int:
    """Write the train canvases as unlabelled 8-bit RGB PNGs ``out_dir/00000.png ...`` (flat folder,
    ``(x + 1) / 2 * 255``), for label-free fine-tuning. Returns the number written.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty (nothing is overwritten).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, _, _, _ = dense_digits_split(seed, train_images=train_images, test_images=0)
    pixels = ((x_train + 1.0) / 2.0 * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    for i, img in enumerate(pixels):
        Image.fromarray(img.numpy()).save(out_dir / f"{i:05d}.png")
    return len(pixels)


# --- model ----------------------------------------------------------------------------------------

def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``[size_out, size_in]`` matrix ``A`` with ``A @ v`` = ``F.interpolate`` of ``v`` (1-D linear,
    ``align_corners=False``); bilinear resizing of ``X [.., h, w]`` is ``A_h @ X @ A_w.T``."""
    eye = torch.eye(size_in).unsqueeze(1)  # [size_in, 1, size_in]: one unit impulse per row
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


class DenseViT(nn.Module):
    """A timm ViT with a per-token linear head, upsampled to per-pixel logits.

    ``forward(x [B, 3, 64, 64] in [-1, 1]) -> logits [B, 11, 64, 64]``. The 16x16 patch logits are resized
    bilinearly (``align_corners=False``: exactly ``F.interpolate``, checked in the tests) by two fixed matrix
    products (buffers of the cached weights).
    """

    def __init__(self, vit: nn.Module, num_classes: int = NUM_CLASSES, out_size: int = CANVAS):
        super().__init__()
        self.vit = vit
        self.grid = tuple(vit.patch_embed.grid_size)  # (h, w) tokens
        self.head = nn.Linear(vit.embed_dim, num_classes)
        self.num_classes = num_classes
        self.register_buffer("up_rows_t", bilinear_matrix(self.grid[0], out_size).T.contiguous())  # [h, 64]
        self.register_buffer("up_cols_t", bilinear_matrix(self.grid[1], out_size).T.contiguous())  # [w, 64]
        # what vitprune reads for the input size and normalisation (pixels / 255 - 0.5) / 0.5 = [-1, 1]
        self.pretrained_cfg = {"input_size": (3, out_size, out_size), "mean": (0.5, 0.5, 0.5),
                               "std": (0.5, 0.5, 0.5)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # [B, prefix + h*w, C], final norm applied
        patches = tokens[:, self.vit.num_prefix_tokens:]  # [B, h*w, C]
        logits = self.head(patches)  # [B, h*w, 11]
        logits = logits.reshape(x.shape[0], self.grid[0], self.grid[1], self.num_classes).permute(0, 3, 1, 2)
        # (tensor on the right of @ so fx records operator.matmul, which the serializer allows)
        rows = (logits.transpose(2, 3) @ self.up_rows_t).transpose(2, 3)  # [B, 11, 64, w]
        return rows @ self.up_cols_t  # [B, 11, 64, 64]


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """``[h * w, dim]`` 2-D sine-cosine position codes (MAE's): half the channels encode the row, half the
    column, each as sines and cosines of geometrically spaced frequencies."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim / 4]
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angle = pos[:, None].double() * freq[None]  # [h * w, dim / 4]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


def build_model(seed: int = 0) -> DenseViT:
    """The example's model (:data:`MODEL_ARGS`), randomly initialised from ``seed``; the patches' position
    embedding starts from 2-D sine-cosine codes (still learned; a 5-epoch pilot trained no differently
    from timm's random init, it is kept as the recipe the cached model was trained with)."""
    import timm

    torch.manual_seed(seed)
    model = DenseViT(timm.create_model(ARCH, pretrained=False, **MODEL_ARGS))
    vit = model.vit
    with torch.no_grad():
        start = 0 if vit.no_embed_class else vit.num_prefix_tokens
        vit.pos_embed[0, start:] = sincos_pos_embed(model.grid, vit.embed_dim)
    return model


# --- training and evaluation ----------------------------------------------------------------------

def class_weights(y: torch.Tensor, power: float = 0.25) -> torch.Tensor:
    """``[NUM_CLASSES]`` loss weights ``frequency ** -power``, mean 1 over the classes present (absent: 0)."""
    freq = torch.bincount(y.flatten(), minlength=NUM_CLASSES).double() / y.numel()
    w = torch.where(freq > 0, freq.clamp_min(1e-12) ** -power, torch.zeros_like(freq))
    return (w / w[freq > 0].mean()).float()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 8,
          lr: float = 1e-3, seed: int = 0, weight_power: float = 0.25, log: bool = False) -> None:
    """AdamW (weight decay 0.05), one warm-up epoch then cosine; per-pixel cross-entropy weighted by
    :func:`class_weights` (``weight_power`` 0: unweighted). ``x [N, 3, 64, 64]``, ``y [N, 64, 64]``."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total)))
    weight = class_weights(y, weight_power)
    model.train()
    for epoch in range(epochs):
        order, seen, start = torch.randperm(len(x)), 0.0, time.perf_counter()
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            seen += float(loss.detach()) * len(idx)
        if log:
            print(f"epoch {epoch + 1}/{epochs}: loss {seen / len(x):.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    model.eval()


def segmentation_miou(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> dict:
    """Mean IoU over one set of images (intersection and union summed over all of them, then per class).

    Args:
        pred: ``[N, H, W]`` predicted classes, or ``[N, num_classes, H, W]`` logits (argmax taken).
        labels: ``[N, H, W]`` true classes.

    Returns:
        ``{"miou": mean IoU over the classes with a non-zero union, "per_class": [num_classes] IoU
        (None where the union is zero: absent from both), "pixel_acc": fraction of pixels right,
        "intersection": [num_classes] pixel counts, "union": [num_classes] pixel counts}``.
    """
    if pred.dim() == labels.dim() + 1:
        pred = pred.argmax(1)
    pred, labels = pred.flatten().long(), labels.flatten().long()
    inter = torch.bincount(labels[pred == labels], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_true = torch.bincount(labels, minlength=num_classes)[:num_classes]
    union = area_pred + area_true - inter
    per_class = [int(i) / int(u) if u > 0 else None for i, u in zip(inter, union)]
    present = [v for v in per_class if v is not None]
    return {"miou": sum(present) / len(present) if present else float("nan"), "per_class": per_class,
            "pixel_acc": int(inter.sum()) / max(1, len(labels)),
            "intersection": inter.tolist(), "union": union.tolist()}


@torch.no_grad()
def evaluate_miou(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> dict:
    """:func:`segmentation_miou` of ``model`` (eval mode, no grad) on ``x [N, 3, 64, 64]`` vs ``y [N, 64, 64]``."""
    model.eval()
    pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return segmentation_miou(pred, y)


# --- cached training ------------------------------------------------------------------------------

def _save_weights(model: nn.Module, path: Path) -> None:
    """Safetensors, written to a temporary file beside ``path`` and renamed over it (atomic)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_path(epochs: int, seed: int = 0, cache_dir: str | Path = "/tmp", batch_size: int = DEFAULTS["batch_size"],
               lr: float = DEFAULTS["lr"]) -> Path:
    """Where :func:`trained_model` keeps the weights trained with these settings (a hash of every setting;
    bump ``version`` when the recipe changes otherwise: loss weights, initialisation, schedule)."""
    settings = {"version": 1, "arch": ARCH, "model_args": MODEL_ARGS, "epochs": epochs, "seed": seed,
                "batch_size": batch_size, "lr": lr, "train_images": TRAIN_IMAGES, "canvas": CANVAS,
                "digit_sizes": DIGIT_SIZES, "digits": DIGITS_PER_CANVAS, "threshold": STROKE_THRESHOLD,
                "noise": NOISE_STD}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"dense_digits_e{epochs}_s{seed}_{key}.safetensors"


def trained_model(epochs: int = DEFAULTS["epochs"], seed: int = 0, cache_dir: str | Path = "/tmp",
                  batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"], log: bool = False) -> DenseViT:
    """The model trained on :func:`dense_digits_split` ``(seed)`` with these settings, in eval mode: loaded
    from :func:`cache_path` when there, else trained (minutes) and cached."""
    from safetensors.torch import load_file

    path = cache_path(epochs, seed, cache_dir, batch_size, lr)
    model = build_model(seed)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        x_train, y_train, _, _ = dense_digits_split(seed, test_images=0)
        train(model, x_train, y_train, epochs, batch_size=batch_size, lr=lr, seed=seed, log=log)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        _save_weights(model, path)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch_size"], help="training batch size")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="AdamW peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="/tmp/dense_digits", help="folder for dense_digits.safetensors and results.json")
    parser.add_argument("--cache-dir", help="also keep the weights where trained_model(cache_dir=...) finds them")
    parser.add_argument("--write-images", metavar="DIR", help="only write the train canvases as unlabelled PNGs "
                        "into the flat folder DIR (for label-free fine-tuning), then exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.write_images:
        count = write_images(args.write_images, seed=args.seed)
        print(f"wrote {count} train canvases under {args.write_images}")
        return {"written": count}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = dense_digits_split(args.seed)
    model = build_model(args.seed)
    start = time.perf_counter()
    train(model, x_train, y_train, args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed, log=True)
    train_s = time.perf_counter() - start
    scores = evaluate_miou(model, x_test, y_test)
    per_class = " ".join(f"{'bg' if c == 0 else c - 1}:{v:.3f}" for c, v in enumerate(scores["per_class"])
                         if v is not None)
    print(f"trained {ARCH} {MODEL_ARGS} for {args.epochs} epochs in {train_s:.0f} s on {len(x_train)} canvases")
    print(f"test mIoU {scores['miou']:.4f}  pixel accuracy {scores['pixel_acc']:.4f}  ({len(x_test)} canvases)")
    print(f"per-class IoU {per_class}")
    _save_weights(model, out / "dense_digits.safetensors")
    if args.cache_dir:
        _save_weights(model, cache_path(args.epochs, args.seed, args.cache_dir, args.batch, args.lr))
    results = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
               "threads": args.threads, "train_seconds": train_s, "train_images": len(x_train),
               "test_images": len(x_test), **scores}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"weights in {out / 'dense_digits.safetensors'}, results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
