"""Labelled image folders for fine-tuning and evaluation (torchvision ``ImageFolder`` layout).

A data folder holds one sub-folder per class, named by the class, with the class's images inside
(PNG, JPEG, ... anything PIL reads); classes are numbered in sorted name order, as torchvision does.

Preprocessing (``C, H, W`` from the model: :func:`vitprune.io.origin.default_input_size`):

- evaluation: resize the shorter side to ``max(H, W)`` (bicubic), center-crop ``H x W``, scale to
  ``[0, 1]``, normalise ``(x - mean) / std`` (timm ViT: 0.5, 0.5, 0.5), as :mod:`vitprune.io.images` does;
- training: ``RandomResizedCrop(H x W, scale=(0.6, 1))`` (bicubic; a random 60-100 % of the area, aspect
  3/4-4/3), horizontal flip only when asked (off by default: digits and text are not flip-invariant),
  then the same scaling and normalisation.

One-channel models get greyscale images, three-channel models RGB.

Label-free fine-tuning (``vitprune finetune --no-labels``) reads any folder of images instead
(:class:`ImageFiles`): every image file at any depth, in sorted path order, sub-folder names ignored,
with the same transforms.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from vitprune.errors import VitpruneError
from vitprune.io.images import DEFAULT_MEAN, DEFAULT_STD, IMAGE_SUFFIXES, check_normalisation, open_image

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
    """Whether ``path`` has an image suffix vitprune reads (:data:`vitprune.io.images.IMAGE_SUFFIXES`)."""
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


class ImageFiles:
    """Every image file under ``root`` at any depth, sorted by path (hidden files and folders skipped): the
    unlabelled data of label-free fine-tuning. Items are ``(image [C, H, W] float32, -1)`` (no label); ``samples``
    is ``[(path, -1), ...]`` and ``classes`` is empty, as an ImageFolder's would be without classes.

    Raises:
        VitpruneError: ``root`` is not a folder or holds no image file.
    """

    def __init__(self, root: str | os.PathLike, transform, option: str = "--data") -> None:
        root = Path(root)
        if not root.is_dir():
            raise VitpruneError(f"{option}: no such folder: {root}")
        files = sorted(p for p in root.rglob("*") if is_image_file(str(p)) and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise VitpruneError(f"{option}: {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) at any depth")
        self.root, self.transform, self.samples = root, transform, [(str(p), -1) for p in files]
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(open_image(path)), label


def train_val_folders(data, val, input_size, mean=DEFAULT_MEAN, std=DEFAULT_STD, scale=DEFAULT_SCALE, hflip=False,
                      labels=True):
    """``(train, val)`` ImageFolders with the training / evaluation transforms (``val`` None when not given);
    with ``labels=False``, :class:`ImageFiles` over any folders of images instead.

    Raises:
        VitpruneError: see :func:`check_image_folder` / :class:`ImageFiles`; ``val``'s classes differ from ``data``'s.
    """
    folder = image_folder if labels else ImageFiles
    train_ds = folder(data, train_transform(input_size, mean, std, scale, hflip), "--data")
    val_ds = folder(val, eval_transform(input_size, mean, std), "--val") if val else None
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


def recorded_classes(model) -> list[str] | None:
    """The class names ``model`` was fine-tuned on (``vitprune finetune`` records them), or None."""
    meta = getattr(model, "meta", None)
    names = meta.get("vitprune", {}).get("classes") if isinstance(meta, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def match_classes(dataset, recorded: Sequence[str] | None, outputs: int, option: str = "--data") -> None:
    """Check ``dataset``'s class folders against the model's recorded class names and its ``outputs`` logits;
    when the folders are some of the recorded classes, label each image with its class's index in ``recorded``
    (so a folder holding only classes 1, 2 and 7 is scored as 1, 2 and 7, not as 0, 1 and 2).

    Raises:
        VitpruneError: a class folder the model was not trained on, more class folders than outputs, or
            recorded names that do not fit the model's outputs.
    """
    classes = list(dataset.classes)
    if recorded is None:
        if len(classes) > outputs:
            raise VitpruneError(f"{option} has {len(classes)} classes but the model has {outputs} outputs")
        return
    recorded = list(recorded)
    if len(recorded) > outputs:  # fewer is fine: a 1000-way head fine-tuned on 10 classes uses outputs 0..9
        raise VitpruneError(f"the model records {len(recorded)} class names but has {outputs} outputs; "
                            "its metadata does not fit its head")
    unknown = [c for c in classes if c not in recorded]
    if unknown:
        shown = ", ".join(recorded[:6]) + (", ..." if len(recorded) > 6 else "")
        raise VitpruneError(f"{option}: the class folder{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(repr(c) for c in unknown[:3])} {'are' if len(unknown) > 1 else 'is'} not "
                            f"among the {len(recorded)} classes the model was fine-tuned on ({shown})")
    if classes != recorded:
        mapping = {i: recorded.index(c) for i, c in enumerate(classes)}
        dataset.target_transform = mapping.__getitem__  # a bound dict method: picklable for loader workers


def check_images_open(dataset, option: str = "--data") -> None:
    """Open every image of an ImageFolder or :class:`ImageFiles` (header only: cheap) so an unreadable file fails
    before a run starts.

    Raises:
        VitpruneError: a file PIL cannot identify as an image.
    """
    from PIL import Image

    for path, _label in dataset.samples:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018  (the header is parsed on open; nothing is decoded)
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VitpruneError(f"{option}: cannot read image {path}: {reason}") from None
