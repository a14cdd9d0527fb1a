"""Labelled image folders for fine-tuning and evaluation (torchvision ``ImageFolder`` layout).

A data folder holds one sub-folder per class, named by the class, with the class's images inside
(PNG, JPEG, ... anything PIL reads); classes are numbered in sorted name order, as torchvision does.

Preprocessing (``C, H, W`` from the model: :func:`vitprune.load.default_input_size`):

- evaluation: resize the shorter side to ``max(H, W)`` (bicubic), center-crop ``H x W``, scale to
  ``[0, 1]``, normalise ``(x - mean) / std`` (timm ViT: 0.5, 0.5, 0.5), as :mod:`vitprune.images` does;
- training: ``RandomResizedCrop(H x W, scale=(0.6, 1))`` (bicubic; a random 60-100 % of the area, aspect
  3/4-4/3), horizontal flip only when asked (off by default: digits and text are not flip-invariant),
  then the same scaling and normalisation.

One-channel models get greyscale images, three-channel models RGB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from vitprune.errors import VitpruneError
from vitprune.images import DEFAULT_MEAN, DEFAULT_STD, IMAGE_SUFFIXES, check_normalisation, open_image

DEFAULT_SCALE = (0.6, 1.0)


def eval_transform(input_size: Sequence[int], mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
    """PIL image -> float32 ``[C, H, W]``: resize shorter side, center crop, normalise (module docstring)."""
    from torchvision import transforms as T

    c, h, w, mean, std = check_normalisation(input_size, mean, std)
    steps = [T.Grayscale(1)] if c == 1 else []
    steps += [T.Resize(max(h, w), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop((h, w)),
              T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def train_transform(input_size: Sequence[int], mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                    scale: Sequence[float] = DEFAULT_SCALE, hflip: bool = False):
    """PIL image -> float32 ``[C, H, W]``: random resized crop, optional flip, normalise (module docstring).

    Raises:
        VitpruneError: ``scale`` is not ``(lo, hi)`` with ``0 < lo <= hi <= 1``; bad ``mean``/``std``.
    """
    from torchvision import transforms as T

    c, h, w, mean, std = check_normalisation(input_size, mean, std)
    lo, hi = (float(v) for v in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise VitpruneError(f"--scale must be MIN,MAX with 0 < MIN <= MAX <= 1, got {lo},{hi}")
    steps = [T.Grayscale(1)] if c == 1 else []
    steps.append(T.RandomResizedCrop((h, w), scale=(lo, hi), interpolation=T.InterpolationMode.BICUBIC))
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def is_image_file(path: str) -> bool:
    """Whether ``path`` has an image suffix vitprune reads (:data:`vitprune.images.IMAGE_SUFFIXES`)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def check_image_folder(path: str | os.PathLike, option: str = "--data") -> list[str]:
    """The class names of the ImageFolder at ``path`` (sorted), after checking it is usable.

    Raises:
        VitpruneError: ``path`` is not a folder, has no class sub-folders, or a class folder has no image.
    """
    path = Path(path)
    if not path.is_dir():
        raise VitpruneError(f"{option}: no such folder: {path}")
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise VitpruneError(f"{option}: {path} has no class sub-folders (expected {path}/CLASS/IMAGE.png, one folder a class)")
    for name in classes:
        if not any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in (path / name).rglob("*")):
            raise VitpruneError(f"{option}: the class folder {path / name} has no images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes


def image_folder(path: str | os.PathLike, transform, option: str = "--data"):
    """A ``torchvision.datasets.ImageFolder`` over ``path`` (checked with :func:`check_image_folder`).

    Items are ``(image [C, H, W] float32, class index)``.

    Raises:
        VitpruneError: see :func:`check_image_folder`.
    """
    from torchvision.datasets import ImageFolder

    check_image_folder(path, option)
    try:
        return ImageFolder(str(path), transform=transform, loader=open_image, is_valid_file=is_image_file)
    except (FileNotFoundError, OSError) as exc:
        raise VitpruneError(f"{option}: cannot read {path}: {str(exc).splitlines()[0]}") from exc


def train_val_folders(data, val, input_size, mean=DEFAULT_MEAN, std=DEFAULT_STD, scale=DEFAULT_SCALE, hflip=False):
    """``(train, val)`` ImageFolders with the training / evaluation transforms (``val`` None when not given).

    Raises:
        VitpruneError: see :func:`check_image_folder`; ``val``'s classes differ from ``data``'s.
    """
    train_ds = image_folder(data, train_transform(input_size, mean, std, scale, hflip), "--data")
    val_ds = image_folder(val, eval_transform(input_size, mean, std), "--val") if val else None
    if val_ds is not None and val_ds.classes != train_ds.classes:
        raise VitpruneError(f"--val's classes {val_ds.classes[:4]}... differ from --data's {train_ds.classes[:4]}...")
    return train_ds, val_ds


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(torch.initial_seed() % 2**32)  # the worker's torch seed comes from the loader's generator
    np.random.seed(torch.initial_seed() % 2**32)


def seeded_loader(dataset, batch_size: int, sampler, num_workers: int, seed: int, pin_memory: bool = False):
    """A DataLoader whose worker seeds (torch, numpy, random) derive from ``seed`` alone."""
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed),
                                       pin_memory=pin_memory)
