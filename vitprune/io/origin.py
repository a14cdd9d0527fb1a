"""What vitprune knows of a model besides its graph: where it came from, and the input it takes.

Kept apart from loading and saving so that capture, load and save need not import each other: capture
records a model's origin (:func:`source_of`) and input size (:func:`default_input_size`) on the graph,
load remembers them (:func:`remember_source`), save writes them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from vitprune.errors import VitpruneError, first_line
from vitprune.io.sizes import check_fits

_SOURCES: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def remember_source(model: nn.Module, info: dict[str, Any]) -> None:
    """Record how ``model`` was loaded (``{"kind": "timm", "arch": ...}``), for saved recipes."""
    _SOURCES[model] = info


def source_of(model: nn.Module) -> dict[str, Any]:
    """How ``model`` was loaded (recorded in saved recipes); ``{"kind": "module"}`` when unknown."""
    return dict(_SOURCES.get(model, {"kind": "module", "class": type(model).__qualname__}))


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model expects.

    From, in order: a saved vitprune model's recorded input; timm's data config (``pretrained_cfg``),
    with ``H, W`` taken from the patch embedding's ``img_size`` when the model was built with another
    size (timm does not update ``pretrained_cfg`` for ``img_size=``). This is load metadata, not graph
    analysis.

    Raises:
        VitpruneError: none of those is known (pass ``input_size``).
    """
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and "vitprune" in meta and meta["vitprune"].get("input_shape"):
        shape = meta["vitprune"]["input_shape"]  # from a file: checked, not trusted
        if not isinstance(shape, list) or len(shape) != 4:
            raise VitpruneError(f"the model's metadata gives the input shape {shape!r}, not [B, C, H, W]")
        return check_fits([1, *shape[1:]], "the input the model's metadata gives")[1:]
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        c, h, w = cfg["input_size"]
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(img_size):
            h, w = img_size
            if not all(isinstance(v, int) and v > 0 for v in img_size):  # timm < 1.0.31 builds img_size=-5
                shown = h if h == w else tuple(img_size)
                raise VitpruneError(f"the model was built with img_size={shown}: every size must be a positive integer")
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if isinstance(proj, nn.Conv2d):
            c = proj.in_channels
        return int(c), int(h), int(w)
    raise VitpruneError(
        f"cannot tell the input size of {type(model).__name__}: pass --input-size C,H,W (Python: input_size=(C, H, W))"
    )


def example_input(
    model: nn.Module, input_size: tuple[int, int, int] | None = None, batch: int = 2, seed: int = 0
) -> torch.Tensor:
    """A seeded standard-normal image batch ``[batch, C, H, W]`` for shape propagation and verification."""
    c, h, w = input_size or default_input_size(model)
    check_fits([batch, c, h, w], "the example input")
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    x = torch.randn(batch, c, h, w, generator=gen)
    return x.to(param.device) if param is not None else x


def check_runs_on(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode without gradients (training mode and RNG state restored), or one line naming the
    shape of ``x`` when the model refuses it (timm's patch embedding asserts on a size the patch does not divide).

    Raises:
        VitpruneError: the model fails on ``x`` (``--input-size`` other than the model's, most often).
    """
    was = model.training
    cuda = [x.device] if x.device.type == "cuda" else []
    try:  # random token selection draws from a forked generator: the caller's RNG state is left as it was
        with torch.no_grad(), torch.random.fork_rng(devices=cuda, device_type="cuda"):
            return model.eval()(x)
    except VitpruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own code: any error is the input's
        raise VitpruneError(f"the model fails on an input of shape {list(x.shape)} (check --input-size C,H,W): "
                            f"{first_line(exc)}") from None
    finally:
        model.train(was)
