"""Top-1 / top-5 accuracy of a model on a labelled image folder, at chosen inference keep rates.

For a model with ``TokenDrop`` modules (token-drop rewrites; PatchDropout arXiv 2208.07220, PSS
arXiv 2208.09520) each keep rate ``r`` is one row: every ``TokenDrop`` drops tokens in eval mode too
(``at_inference=True``) and keeps ``max(1, int(num_patches * r))`` patch tokens, with its own
``selection`` (random: seeded, so rows are repeatable; magnitude: deterministic); ``r = 1.0`` keeps
every token. A model without ``TokenDrop`` (unrewritten, importance-mask) gives one row, as it is.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitprune.device import autocast, dtype_name, resolve_device, resolve_dtype
from vitprune.errors import VitpruneError
from vitprune.io.preprocess import resolve_preprocessing
from vitprune.train.keep_rate_schedule import keep_count
from vitprune.train.progress import Progress
from vitprune.ops.modules import TokenDrop

MODEL_SUBDIR = "model"  # where `vitprune finetune -o OUT` puts the model: OUT/model


def resolve_model_path(source: Any) -> Any:
    """``OUT/model`` for a ``vitprune finetune`` output folder ``OUT``; ``source`` unchanged otherwise."""
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith("timm:"):
        path = Path(source)
        if path.is_dir() and not (path / "graph.json").is_file() and (path / MODEL_SUBDIR / "graph.json").is_file():
            return path / MODEL_SUBDIR
    return source


def token_drops(model: nn.Module) -> list[TokenDrop]:
    """The ``TokenDrop`` modules of ``model`` (PatchDropout/PSS token drops), in registration order."""
    return [m for m in model.modules() if isinstance(m, TokenDrop)]


@contextlib.contextmanager
def inference_keep_rate(model: nn.Module, rate: float | None) -> Iterator[None]:
    """Within the block every ``TokenDrop`` keeps ``max(1, int(P * rate))`` patch tokens in eval mode too.

    ``rate=None`` leaves the model as it is. The modules' ``keep_count`` and ``at_inference`` are restored.

    Raises:
        VitpruneError: ``rate`` outside ``(0, 1]``.
    """
    mods = token_drops(model) if rate is not None else []
    saved = [(m.keep_count, m.at_inference) for m in mods]
    counts = [keep_count(m.num_patches, rate) for m in mods]
    try:
        for m, k in zip(mods, counts):
            m.keep_count, m.at_inference = k, True
        yield
    finally:
        for m, (k, at) in zip(mods, saved):
            m.keep_count, m.at_inference = k, at


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else CPU (:func:`vitprune.device.resolve_device`).

    Raises:
        VitpruneError: a device torch does not know, or CUDA asked for without a GPU.
    """
    return resolve_device(device)


def fork_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU generator and, on CUDA, ``device``'s generator."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type="cuda")


def logits_of(out: Any) -> torch.Tensor:
    """The ``[B, K]`` class logits of a model output (a tensor).

    Raises:
        VitpruneError: the output is not a ``[B, K]`` tensor.
    """
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise VitpruneError(f"the model returns {shape}, not class logits [B, K]; vitprune trains classifiers only")
    return out


@torch.no_grad()
def check_classes(model: nn.Module, dataset, device: torch.device, option: str = "--data") -> int:
    """The model's number of outputs ``K``, after checking the dataset's classes fit (labels ``< K``).

    Runs one image in eval mode (random token selection consumes no global RNG state: forked).

    Raises:
        VitpruneError: more classes than outputs, an output that is not ``[B, K]`` logits, or a model that fails
            on the dataset's image size (``--input-size`` other than the model's).
    """
    from vitprune.io.origin import check_runs_on

    with fork_rng(device):
        outputs = logits_of(check_runs_on(model, dataset[0][0][None].to(device))).shape[1]
    if len(dataset.classes) > outputs:
        raise VitpruneError(f"{option} has {len(dataset.classes)} classes but the model has {outputs} outputs")
    return outputs


@torch.no_grad()
def accuracy_counts(model: nn.Module, loader, device: torch.device, dtype: torch.dtype = torch.float32,
                    progress=None) -> torch.Tensor:
    """Sums over ``loader`` in eval mode: ``float64 [4]`` = (cross-entropy sum, top-1 hits, top-5 hits, images);
    the forward runs under autocast to ``dtype`` (:func:`vitprune.device.autocast`; logits compared in float32).

    Top-5 is top-``min(5, K)`` for ``K`` classes. Sums (not means) so ranks can all-reduce them. ``progress``: a
    :class:`vitprune.train.progress.Progress` updated once per batch.
    """
    sums = torch.zeros(4, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, dtype):
            logits = logits_of(model(images)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.tensor([float(F.cross_entropy(logits, labels, reduction="sum")), float(hits[:, 0].sum()),
                              float(hits.any(dim=1).sum()), len(labels)], dtype=torch.float64)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(top1=f"{float(sums[1] / sums[3]):.4f}")
    model.train(was_training)
    return sums


def all_reduce_sum(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """``t`` summed over the ``world`` ranks of the default process group (``t`` itself when alone); on CPU."""
    if world > 1:
        import torch.distributed as dist

        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def sharded_accuracy(model: nn.Module, dataset, batch_size: int, rank: int, world: int, device: torch.device,
                     dtype: torch.dtype = torch.float32, seed: int = 0, num_workers: int = 0, prefix: str = "",
                     progress=None) -> dict[str, Any]:
    """Eval-mode ``{loss, top1, top5, images}`` (keys prefixed) on ``dataset``, under autocast to ``dtype``; rank
    ``r`` of ``world`` evaluates images ``r, r + world, ...`` and the sums are all-reduced, so every rank returns
    the whole dataset's numbers.
    Random token selection is seeded with ``seed`` (global RNG state is left as it was). ``progress``: as
    :func:`accuracy_counts`."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=list(range(rank, len(dataset), world)),
                                         num_workers=num_workers)
    with fork_rng(device):
        torch.manual_seed(seed)
        loss, top1, top5, n = all_reduce_sum(accuracy_counts(model, loader, device, dtype, progress), world,
                                             device).tolist()
    return {f"{prefix}loss": loss / n, f"{prefix}top1": top1 / n,
            f"{prefix}top5": top5 / n if len(dataset.classes) >= 5 else None, f"{prefix}images": int(n)}


def evaluate(
    model: nn.Module | str | os.PathLike,
    data: str | os.PathLike,
    *,
    keep_rates: Sequence[float] | None = None,
    batch_size: int = 64,
    input_size: tuple[int, int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of ``model`` on the ImageFolder ``data``, one row per inference keep rate.

    Args:
        model: a module, or anything :func:`vitprune.load` reads (a ``vitprune finetune`` output folder too).
        data: ImageFolder layout (:mod:`vitprune.train.data`); images preprocessed for evaluation (resize,
            center crop, normalise) at the model's input size; ``mean``/``std`` default to the model's own
            (:func:`vitprune.io.preprocess.resolve_preprocessing`).
        keep_rates: inference keep rates in ``(0, 1]``, for models with ``TokenDrop`` modules only;
            ``None``: one row, the model as it is.
        device: ``cpu``, ``cuda``, ``cuda:N``; default CUDA when available (the module is moved there).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``: the forward runs under autocast to it (the
            weights stay float32; :mod:`vitprune.device`).
        seed: seeds random token selection, so each row is repeatable.
        progress: on stderr per keep rate, a tqdm bar on a terminal, else a plain line every 10 s and at the end
            (:class:`vitprune.train.progress.Progress`).

    Returns:
        ``{"data", "images", "classes", "input_size", "device", "dtype", "preprocessing": {"mean", "std", "source"},
        "rows": [{"keep_rate", "keep_counts", "top1", "images",
        "top5", "loss", "images_per_s"}]}``; accuracies are fractions in ``[0, 1]``; ``top5`` is None
        with fewer than 5 classes; ``loss`` is the mean cross-entropy (nats).

    Raises:
        VitpruneError: bad data folder, more classes than the model's outputs, ``keep_rates`` for a
            model without ``TokenDrop``, a rate outside ``(0, 1]``, unreadable model, a bad device or dtype.
    """
    from vitprune.train.data import eval_transform, image_folder, match_classes, recorded_classes
    from vitprune.io.load import load
    from vitprune.io.origin import default_input_size

    if not isinstance(model, nn.Module):
        model = load(resolve_model_path(model))
    if batch_size < 1:
        raise VitpruneError(f"--batch-size must be at least 1, got {batch_size}")
    drops = token_drops(model)
    if keep_rates is not None:
        keep_rates = [float(r) for r in keep_rates]
        if not drops:
            raise VitpruneError("--keep-rate applies to token-drop models; this model has no TokenDrop module")
        for r in keep_rates:
            keep_count(drops[0].num_patches, r)  # raises on a rate outside (0, 1]
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    size = tuple(input_size or default_input_size(model))
    prep = resolve_preprocessing(model, mean, std, channels=size[0])
    dataset = image_folder(data, eval_transform(size, prep.mean, prep.std), "--data")
    was_training = model.training
    model.to(dev).eval()
    rows = []
    try:
        match_classes(dataset, recorded_classes(model), check_classes(model, dataset, dev))
        for rate in keep_rates if keep_rates is not None else [None]:
            with inference_keep_rate(model, rate):
                start = time.perf_counter()
                bar = Progress(total=math.ceil(len(dataset) / batch_size), unit="batches", enabled=progress,
                               desc="eval" + (f" keep rate {rate:g}" if rate is not None else ""))
                row = sharded_accuracy(model, dataset, batch_size, 0, 1, dev, dt, seed, num_workers, progress=bar)
                bar.close()
                seconds = time.perf_counter() - start
                counts = [m.keep_count if m.at_inference else m.num_patches for m in drops]
            rows.append({"keep_rate": rate, "keep_counts": counts, **row, "images_per_s": row["images"] / seconds})
    finally:
        model.train(was_training)
    return {"data": str(data), "images": len(dataset), "classes": len(dataset.classes), "input_size": list(size),
            "device": str(dev), "dtype": dtype_name(dt),
            "preprocessing": prep.to_dict(), "rows": rows}
