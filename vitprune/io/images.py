"""Read images from disk into normalised ``[B, C, H, W]`` batches (PIL; resize shorter side, center crop)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from vitprune.errors import VitpruneError

DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)  # timm ViT normalisation
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image(
    path: str | os.PathLike,
    input_size: Sequence[int],
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> tuple[torch.Tensor, np.ndarray]:
    """Read an image as a model input and as a picture to draw on.

    The image is read with PIL (RGB, or greyscale for a 1-channel model), its shorter side resized
    (bicubic) so it covers ``H x W``, then center-cropped to ``H x W``, then normalised per channel:
    ``(pixel / 255 - mean) / std``.

    Args:
        path: image file (anything PIL reads: PNG, JPEG, ...).
        input_size: ``(C, H, W)`` the model takes (:func:`vitprune.io.origin.default_input_size`); ``C`` is 1 or 3.
        mean, std: per-channel normalisation, ``C`` values each (timm ViT: 0.5, 0.5, 0.5).

    Returns:
        ``(x, display)``: ``x`` float32 ``[1, C, H, W]`` normalised; ``display`` float ``[H, W, 3]`` in
        ``[0, 1]``, the same crop before normalisation.

    Raises:
        VitpruneError: the file is missing or not an image PIL can read; ``C`` is not 1 or 3; ``mean`` /
            ``std`` do not have ``C`` values, or a ``std`` is not positive.
    """
    from PIL import Image

    c, h, w, mean, std = check_normalisation(input_size, mean, std)
    path = Path(path)
    if not path.is_file():
        raise VitpruneError(f"no such image file: {path}")
    img = open_image(path, "RGB" if c == 3 else "L")

    scale = max(h / img.height, w / img.width)
    size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    img = img.crop((left, top, left + w, top + h))

    pixels = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, C] or [H, W]
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # [C, H, W]
    x = (x - torch.tensor(mean).view(c, 1, 1)) / torch.tensor(std).view(c, 1, 1)
    display = np.repeat(pixels, 3, axis=2) if c == 1 else pixels
    return x.unsqueeze(0).contiguous(), np.clip(display, 0.0, 1.0)


def check_normalisation(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]):
    """``(C, H, W, mean, std)`` as ints and float lists, after checking they fit together.

    Raises:
        VitpruneError: ``C`` is not 1 or 3; ``mean`` / ``std`` do not have ``C`` values; a ``std`` is not positive.
    """
    c, h, w = (int(v) for v in input_size)
    if c not in (1, 3):
        raise VitpruneError(f"the model takes {c}-channel images; vitprune reads 1- or 3-channel images only")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != c or len(std) != c:
        raise VitpruneError(f"--mean and --std need {c} values each for a {c}-channel model, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise VitpruneError(f"--std values must be positive, got {std}")
    return c, h, w, mean, std


def open_image(path: str | os.PathLike, mode: str = "RGB"):
    """An image file as a PIL image in ``mode`` (``"RGB"`` or ``"L"``), read fully.

    Raises:
        VitpruneError: the file is not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitpruneError(f"cannot read image {path}: {reason}") from exc


def is_path(value: Any) -> bool:
    """Whether ``value`` names a file or folder (``str``, ``bytes`` or ``os.PathLike``), not tensors: how a
    calibration argument that is a folder of images is told from an iterable of ``[B, C, H, W]`` batches."""
    return isinstance(value, (str, bytes)) or hasattr(value, "__fspath__")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted).

    Raises:
        VitpruneError: not a folder, or no image in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VitpruneError(f"no such folder of images: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise VitpruneError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def image_batches(folder: str | os.PathLike, input_size: tuple[int, int, int], batch: int = 16, limit: int | None = None,
                  mean=DEFAULT_MEAN, std=DEFAULT_STD) -> Iterator[torch.Tensor]:
    """``[B, C, H, W]`` batches of the images under ``folder`` (at most ``limit`` images), see :func:`load_image`."""
    files = image_files(folder)[:limit]
    for i in range(0, len(files), batch):
        yield torch.cat([load_image(f, input_size, mean, std)[0] for f in files[i:i + batch]])
