"""Calibration images for :mod:`vitprune.search`, and output flattening for scoring."""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from vitprune.errors import SearchError, VitpruneError
from vitprune.io.images import is_path

_CALIBRATION_BATCH = 32  # images per scoring forward


# --------------------------------------------------------------------------------------------------------
# calibration data


def calibration_batches(calibration: Any, input_size: tuple[int, int, int], mean, std, limit: int, seed: int,
                         device: torch.device) -> tuple[list[torch.Tensor], str, int]:
    """``(batches, description, images)``: at most ``limit`` calibration images, sampled with ``seed`` when there
    are more (the same ones for the same seed), as ``[<=32, C, H, W]`` batches."""
    from vitprune.io.images import image_files, load_image

    if is_path(calibration):
        folder = os.fsdecode(calibration)
        try:
            files = image_files(folder)
        except VitpruneError as exc:
            raise SearchError(f"calibration: {exc}") from None
        if len(files) > limit:
            files = [files[i] for i in sorted(random.Random(seed).sample(range(len(files)), limit))]
        images = [load_image(f, input_size, mean, std)[0] for f in files]
        x, what = torch.cat(images), folder
    else:
        if isinstance(calibration, torch.Tensor):
            tensors = [calibration]
        else:
            try:
                tensors = list(calibration)
            except TypeError:
                raise SearchError("calibration must be a folder of images, a [N, C, H, W] tensor or an iterable of "
                                  "[B, C, H, W] tensors") from None
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[1:]) != tuple(input_size):
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise SearchError(f"calibration batches must be [B, {', '.join(map(str, input_size))}] tensors "
                                  f"(the model's input size), got {shape}")
        x = torch.cat([t.detach().float() for t in tensors]) if tensors else torch.empty(0, *input_size)
        if len(x) > limit:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
            x = x[order.sort().values]
        what = "<tensors>"
    if len(x) == 0:
        raise SearchError("the calibration data holds no images")
    return [b.to(device) for b in x.split(_CALIBRATION_BATCH)], what, len(x)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def flat_outputs(out: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([B, D] float64 of every output tensor, [B] top-1 or None)``."""
    leaves = [t for t in _tensors(out) if t.dim() >= 1 and t.shape[0] == batch]
    if not leaves:
        raise SearchError("the model's output holds no [B, ...] tensor to compare")
    flat = torch.cat([t.detach().reshape(batch, -1).double().cpu() for t in leaves], 1)
    top = leaves[0].argmax(-1).cpu() if len(leaves) == 1 and leaves[0].dim() == 2 and leaves[0].shape[1] > 1 else None
    return flat, top
