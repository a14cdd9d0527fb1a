"""Hugging Face vision models: load a ``save_pretrained`` folder through transformers' own classes.

``transformers`` is optional (``pip install -e '.[hf]'``). A folder holds ``config.json`` and
``model.safetensors`` (``save_pretrained``); the class is the one ``config.json`` names among
transformers' own classes (``architectures``), never code from the folder (``trust_remote_code`` stays
off), and nothing is downloaded (``local_files_only``). The image processor's mean/std
(``preprocessor_config.json``) and the config's image size become the model's ``pretrained_cfg``, the
timm convention the rest of vitprune reads.

Hugging Face models take ``pixel_values`` and return a ``ModelOutput``; :class:`HFImageModel` calls the
model with the image and returns one tensor: ``logits`` when the model has a head, else
``pooler_output`` (the pooled CLS feature: DINOv2, CLIP vision). transformers 5.x has no fx tracer, so
these models are captured with ``torch.export`` (:mod:`vitprune.frontends.export`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.errors import LoadError, first_line
from vitprune.io.preprocess import checked_normalisation
from vitprune.io.sizes import check_fits

#: ``ModelOutput`` fields a ViT's served output is taken from, in order of preference.
OUTPUT_FIELDS = ("logits", "pooler_output")


class HFImageModel(nn.Module):
    """A Hugging Face vision model as ``[B, C, H, W] -> one tensor`` (``logits`` or ``pooler_output``)."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        if output not in OUTPUT_FIELDS:
            raise ValueError(f"output must be one of {OUTPUT_FIELDS}, got {output!r}")
        self.model, self.output = model, output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values), self.output)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder ``save_pretrained`` wrote: ``config.json`` naming a transformers model type."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def wrap(model: nn.Module, image_size: tuple[int, int, int] | None = None,
         mean: Any = None, std: Any = None) -> HFImageModel:
    """:class:`HFImageModel` around an already-built transformers model (Python users holding one).

    The output field is chosen by running the model once on a zero image of its configured size.

    Raises:
        LoadError: the model does not read ``pixel_values`` (a text model), does not run on its configured
            image size, returns none of :data:`OUTPUT_FIELDS`, or ``mean`` / ``std`` are not numbers.
        CaptureError: its forward needs more than the image (:func:`~vitprune.frontends.capture.require_one_image_input`).
    """
    from vitprune.frontends.capture import require_one_image_input

    config = getattr(model, "config", None)
    takes = getattr(model, "main_input_name", None)  # transformers' own word for what the model reads
    if takes != "pixel_values":
        raise LoadError(f"{type(model).__name__} reads {takes or 'no declared input'}, not images (pixel_values): "
                        "vitprune rewrites vision models")
    require_one_image_input(model)  # NaFlex (Siglip2VisionModel): patchified pixels, a patch mask, grid shapes
    try:
        size = image_size or (int(getattr(config, "num_channels", 3)), *_pair(getattr(config, "image_size", 224)))
    except (TypeError, ValueError, IndexError):
        given = {k: getattr(config, k, None) for k in ("image_size", "num_channels")}
        raise LoadError(f"{type(model).__name__}'s config gives no image size ({given})") from None
    check_fits([1, *size], f"{type(model).__name__}'s configured image")
    model.eval()
    try:
        with torch.no_grad():
            out = model(pixel_values=torch.zeros(1, *size))
    except Exception as exc:  # a config the model's own code refuses at run time
        raise LoadError(f"{type(model).__name__} does not run on a [1, {', '.join(map(str, size))}] image: "
                        f"{first_line(exc)}") from None
    field = next((f for f in OUTPUT_FIELDS if getattr(out, f, None) is not None), None)
    if field is None:
        raise LoadError(f"{type(model).__name__} returns none of {', '.join(OUTPUT_FIELDS)}: vitprune serves "
                        "a classification or pooled-feature output")
    wrapped = HFImageModel(model, field).eval()
    cfg: dict[str, Any] = {"input_size": tuple(size)}
    if mean is not None and std is not None:
        mean, std = checked_normalisation(mean, std, "the Hugging Face preprocessor_config.json")
        cfg.update(mean=mean, std=std, source="Hugging Face preprocessor_config.json")
    wrapped.pretrained_cfg = cfg  # the timm convention: vitprune.io.origin.default_input_size and preprocess read it
    return wrapped


def load_folder(path: str | os.PathLike) -> HFImageModel:
    """Build the model a ``save_pretrained`` folder holds (module docstring).

    Raises:
        LoadError: transformers is not installed (names the extra), the config names architectures of
            which none is a transformers model class, the weights do not load, or :func:`wrap` refuses
            the model (not a vision model, bad ``image_mean`` / ``image_std``).
    """
    try:
        import transformers
    except ImportError:
        raise LoadError(f"{path} is a Hugging Face model folder: install the extra with "
                        "pip install -e '.[hf]' (transformers)") from None
    path = Path(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError / ValueError / KeyError for bad configs
        raise LoadError(f"cannot read {path / 'config.json'}: {first_line(exc)}") from exc
    named = getattr(config, "architectures", None) or []
    names = [n for n in (named if isinstance(named, list) else [named])
             if isinstance(n, str) and n.isidentifier() and not n.startswith("_")]
    classes = [getattr(transformers, n, None) for n in names]  # transformers' own (lazily imported) classes
    cls = next((c for c in classes if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)), None)
    if cls is None and named:  # a class this transformers lacks: AutoModel would build another model
        raise LoadError(f"{path / 'config.json'} names the architectures {str(named)[:80]}: none is a model class "
                        f"of transformers {transformers.__version__}")
    cls = cls or transformers.AutoModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # no load report or progress bar: vitprune says what matters
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                          output_loading_info=True)
    except Exception as exc:
        raise LoadError(f"cannot load the Hugging Face model in {path}: {first_line(exc)}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise LoadError(f"{path} lacks weights of {cls.__name__} ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}): they would be random")
    mean = std = None
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        try:
            doc = json.loads(processor.read_text(encoding="utf-8"))
            if isinstance(doc, dict):
                mean, std = doc.get("image_mean"), doc.get("image_std")
        except (OSError, ValueError, RecursionError):
            pass  # no usable processor config: the default normalisation applies (and is printed)
        if mean is not None and std is not None:  # refused naming the file, not only "the processor config"
            mean, std = checked_normalisation(mean, std, str(processor))
    return wrap(model, mean=mean, std=std)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))

