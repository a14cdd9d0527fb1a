"""The input normalisation a model expects, taken from the model, as timm and Hugging Face users expect.

Resolution order (:func:`resolve_preprocessing`), per value:

1. what the caller gives (``--mean`` / ``--std``);
2. what a vitprune model recorded when it was captured, rewritten or fine-tuned
   (``model.meta["vitprune"]["preprocessing"]``, saved in ``graph.json``'s metadata);
3. the model's timm data config (``model.pretrained_cfg["mean"/"std"]``, what
   ``timm.data.resolve_data_config`` reads: ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) for
   DeiT and DINOv2, (0.5, 0.5, 0.5) for the AugReg ViTs, OpenAI's for CLIP);
4. (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5), said so in ``source``.

Resizing stays vitprune's own (shorter side to the input size, center crop: :mod:`vitprune.train.data`); the
timm config's ``crop_pct`` and interpolation are recorded with the rest but not applied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn

from vitprune.errors import LoadError
from vitprune.io.images import DEFAULT_MEAN, DEFAULT_STD


@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation ``(pixel / 255 - mean) / std`` and where it came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # "--mean/--std" | "saved model" | "timm pretrained_cfg" | "default" (or a mix, per value)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def describe(self) -> str:
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return f"mean {fmt(self.mean)} std {fmt(self.std)} from {self.source}"


def checked_normalisation(mean: Any, std: Any, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from a file as float tuples: each a number (every channel) or a list of 1 to 4 finite
    numbers, every std > 0; anyone can write a config file, and a string or a zero std would fail (or divide
    by zero) only once images are normalised.

    Raises:
        LoadError: a value that is not such a number or list (one line, naming ``where``).
    """
    out = []
    for key, value in (("mean", mean), ("std", std)):
        values = value if isinstance(value, (list, tuple)) else [value]
        if not (1 <= len(values) <= 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in values)
                and (key == "mean" or all(v > 0 for v in values))):
            raise LoadError(f"{where}: the normalisation {key} is {str(value)[:60]!r}; expected a number or a "
                            f"list of 1 to 4 finite numbers{', each > 0' if key == 'std' else ''}")
        out.append(tuple(float(v) for v in values))
    return out[0], out[1]


def recorded(model: nn.Module) -> dict[str, Any]:
    """What ``model`` says of its own normalisation: ``{"mean", "std", "source"}``, possibly empty.

    Raises:
        LoadError: the recorded values are not numbers (:func:`checked_normalisation`).
    """
    meta = getattr(model, "meta", None)
    saved = meta.get("vitprune", {}).get("preprocessing") if isinstance(meta, dict) else None
    if isinstance(saved, dict) and saved.get("mean") and saved.get("std"):
        mean, std = checked_normalisation(saved["mean"], saved["std"], "the saved model's preprocessing metadata")
        return {"mean": mean, "std": std, "source": "saved model"}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        source = cfg.get("source", "timm pretrained_cfg")
        mean, std = checked_normalisation(cfg["mean"], cfg["std"], str(source))
        return {"mean": mean, "std": std, "source": source}
    return {}


def metadata(model: nn.Module) -> dict[str, Any] | None:
    """The normalisation to record in a captured / rewritten / saved model's metadata (plain JSON), or None."""
    own = recorded(model)
    return {"mean": list(own["mean"]), "std": list(own["std"]), "source": own["source"]} if own else None


def resolve_preprocessing(model: nn.Module, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None, channels: int | None = None) -> Preprocessing:
    """The normalisation to feed ``model`` with (module docstring); ``mean`` / ``std`` override.

    ``channels``: the model's input channels; a 3-value config for a 1-channel model is averaged.
    """
    own = recorded(model)
    sources = []
    values = []
    for given, key, default in ((mean, "mean", DEFAULT_MEAN), (std, "std", DEFAULT_STD)):
        if given is not None:
            values.append(tuple(float(v) for v in given))
            sources.append("--mean/--std")
        elif own:
            values.append(tuple(float(v) for v in own[key]))
            sources.append(own["source"])
        else:
            values.append(default)
            sources.append("default (the model records none)")
    if channels == 1:
        values = [(sum(v) / len(v),) if len(v) == 3 and given is None else v
                  for v, given in zip(values, (mean, std))]
    source = sources[0] if sources[0] == sources[1] else f"{sources[0]} (mean), {sources[1]} (std)"
    return Preprocessing(values[0], values[1], source)
