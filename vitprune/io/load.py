"""Load a model from what users have: a timm architecture, weights files, a pickled module, a saved model.

Sources (``vitprune.load(source, ...)``):

- ``"timm:NAME"``: ``timm.create_model(NAME, pretrained=False, **model_args)`` (random init; no hub),
  then ``weights`` (safetensors or a ``torch.save``-d state dict, read with ``weights_only=True``);
- a safetensors / state-dict file with ``arch="timm:NAME"``;
- a pickled module file (``torch.save(model)``) only with ``trust_pickle=True``: unpickling runs code;
- a directory written by :func:`vitprune.save` (no pickle at all);
- a Hugging Face folder (``config.json`` + safetensors, as ``save_pretrained`` writes it), built with
  transformers' own classes (:mod:`vitprune.io.hf`; the ``hf`` extra), never ``trust_remote_code``;
- a ``torch.export`` file (``.pt2``, ``torch.export.save``), as an aten-level graph
  (:mod:`vitprune.frontends.export`); without ``trust_pickle`` only an archive whose pickled members are
  weights-only loadable and which holds no native code or code-like expression (:mod:`vitprune.io.pt2_check`);
- an ONNX file (``.onnx``, external data beside it), as a :class:`~vitprune.frontends.onnx.OnnxModel` for
  the ONNX frontend (:func:`vitprune.rewrite_onnx`); read as ONNX, never unpickled;
- an ``nn.Module`` the caller already holds (returned as it is).
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.errors import LoadError, VitpruneError, first_line
from vitprune.io.origin import remember_source
from vitprune.io.hf import is_hf_folder
from vitprune.io.hf import load_folder as load_hf_folder

_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")


def parse_model_args(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["img_size=32", "global_pool=avg"]`` -> ``{"img_size": 32, "global_pool": "avg"}``.

    Values are Python literals when they parse as one (ints, floats, bools, tuples), else strings.

    Raises:
        LoadError: an item without ``=``.
    """
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise LoadError(f"--model-arg {pair!r} is not KEY=VALUE with a Python name as KEY (img_size=32)")
        try:
            args[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            args[key.strip()] = value.strip()
    return args


def _create_timm(name: str, model_args: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise LoadError(f"unknown timm architecture {name!r}")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=False, **model_args)
    except Exception as exc:  # bad --model-arg values: timm raises TypeError, ValueError, AssertionError, ...
        raise LoadError(f"timm could not build {name!r} with --model-arg {_args_text(model_args)}: "
                        f"{first_line(exc)}") from None


def _args_text(model_args: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in model_args.items()) or "(none)"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise LoadError(f"cannot read {path}: not a valid safetensors file ({first_line(exc)})") from exc
    obj = _torch_load(path, trust_pickle=False)
    if isinstance(obj, nn.Module):
        raise LoadError(f"{path} holds a whole module, not weights")
    return _as_state_dict(obj, path)


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise LoadError(f"{path} does not hold a state dict (a mapping of names to tensors)")



def _pickled_globals(path: Path) -> list[str] | None:
    """The classes and functions a pickle file references (read with pickletools: nothing is executed).

    Returns None when the file is not a readable pickle (or torch zip holding one).
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(str(arg))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return found
    except Exception:  # pickletools raises ValueError, zipfile BadZipFile, StopIteration, ...
        return None


def _quiet_torch_load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` without its warnings (pickle protocol, weights_only notices): the user gets one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return _quiet_torch_load(path, weights_only=True)
    except Exception as exc:  # torch raises many types on a corrupt file
        refs = _pickled_globals(path)
        if refs is None:
            raise LoadError(f"cannot read {path}: not a PyTorch file or corrupt ({first_line(exc)})") from exc
        objects = [r for r in refs if not r.startswith(("torch._utils.", "collections.OrderedDict", "torch."))]
        if not objects:
            raise LoadError(f"cannot read {path}: corrupt PyTorch file ({first_line(exc)})") from exc
        if not trust_pickle:
            raise LoadError(
                f"{path} holds a pickled Python object ({objects[0]}), and unpickling runs code from the file: "
                "pass --trust-pickle (Python: trust_pickle=True) only if you trust where it came from"
            ) from exc
    try:
        return _quiet_torch_load(path, weights_only=False)
    except Exception as exc:
        raise LoadError(f"cannot unpickle {path}: {first_line(exc)}") from exc


def load_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    """Load a safetensors or state-dict file into ``model`` (strict: every key must match).

    Raises:
        LoadError: missing or unreadable file, or keys / shapes that do not match the model.
    """
    path = Path(weights)
    if not path.is_file():
        raise LoadError(f"no such weights file: {path}")
    state = _read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise LoadError(f"weights in {path} do not match the architecture: {detail[:300]}") from exc


def load(
    source: str | os.PathLike | nn.Module,
    *,
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    model_args: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load a model; see the module docstring for the accepted sources.

    Args:
        source: ``"timm:NAME"``, a file or directory path, or an ``nn.Module``.
        arch: ``"timm:NAME"`` for a weights-only file.
        weights: weights to load into a ``timm:`` architecture.
        model_args: constructor arguments for a ``timm:`` architecture (``img_size``, ``depth``, ...).
        trust_pickle: allow unpickling a whole module (runs code from the file).

    Returns:
        The model in eval mode (saved vitprune models come back in the mode they were saved in).

    Raises:
        LoadError: missing / corrupt file, unknown architecture, weights that do not match, a pickled
            module without ``trust_pickle``, a weights-only file without ``arch``.
    """
    if isinstance(source, nn.Module):
        return source
    model_args = dict(model_args or {})
    text = str(source)
    if text.startswith("timm:"):
        model = _create_timm(text[len("timm:"):], model_args)
        if weights is not None:
            load_weights(model, weights)
        remember_source(model, {"kind": "timm", "arch": text, "model_args": model_args,
                           "weights": str(weights) if weights else None})
        return model.eval()
    path = Path(text)
    if not path.exists():
        raise LoadError(f"no such file or directory: {path}")
    if path.is_dir() and is_hf_folder(path):
        model = load_hf_folder(path)
        remember_source(model, {"kind": "huggingface", "path": str(path), "class": type(model.model).__name__})
        return model
    if path.suffix.lower() == ".onnx" and path.is_file():  # never a pickle: ONNX is read as ONNX
        from vitprune.frontends.onnx import OnnxModel, load_model

        try:
            return OnnxModel(load_model(path), str(path))  # type: ignore[return-value]
        except VitpruneError as exc:
            raise LoadError(str(exc)) from None
    if path.suffix == ".pt2":
        model = _load_pt2(path, trust_pickle)
        remember_source(model, {"kind": "torch.export", "path": str(path)})
        return model
    if path.is_dir():
        from vitprune.io.save import is_saved_model, load_saved

        if not is_saved_model(path) and is_saved_model(path / "model"):
            path = path / "model"  # a `vitprune finetune` output folder: model/ beside checkpoints/
        return load_saved(path)
    if arch is not None:
        if not arch.startswith("timm:"):
            raise LoadError(f"--arch must be timm:NAME, got {arch!r}")
        model = _create_timm(arch[len("timm:"):], model_args)
        load_weights(model, path)
        remember_source(model, {"kind": "timm", "arch": arch, "model_args": model_args, "weights": str(path)})
        return model.eval()
    if path.suffix == ".safetensors":
        _read_state_dict(path)  # a corrupt file is reported as corrupt, not as missing --arch
        raise LoadError(f"{path} holds only weights: pass --arch timm:NAME to say which architecture they belong to")
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        remember_source(obj, {"kind": "pickle", "path": str(path), "class": type(obj).__qualname__})
        return obj.eval()
    _as_state_dict(obj, path)
    raise LoadError(f"{path} holds only weights (a state dict): pass --arch timm:NAME to say which architecture")


def _load_pt2(path: Path, trust_pickle: bool = False) -> nn.Module:
    """A ``torch.export.save`` file as a plain GraphModule (:mod:`vitprune.frontends.export`); its input
    size is the program's example input. Masks that mask nothing are dropped as at capture. Without
    ``trust_pickle`` the archive is first checked to run no code (:mod:`vitprune.io.pt2_check`)."""
    from vitprune.frontends.export import drop_noop_attention_masks, plain_graph_module
    from vitprune.io.pt2_check import check_pt2_archive
    from vitprune.native_logs import quiet_python_loggers

    if not trust_pickle:
        check_pt2_archive(path)
    try:
        with warnings.catch_warnings(), quiet_python_loggers("torch.export", "torch._export"):
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as exc:  # corrupt archive, other torch version: several types
        raise LoadError(f"cannot read the torch.export file {path}: {first_line(exc)}") from exc
    inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(inputs) != 1:
        raise LoadError(f"{path} takes {len(inputs)} inputs; vitprune rewrites models that take one image")
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    shape = [int(v) if isinstance(v, int) or str(v).isdigit() else 2 for v in placeholder.meta["val"].shape]
    if len(shape) != 4:
        raise LoadError(f"{path} takes an input of shape {shape}; vitprune rewrites models that take [B, C, H, W]")
    gm = plain_graph_module(program, class_name="ExportedProgram")
    example = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0))
    drop_noop_attention_masks(gm, example)
    gm.meta["vitprune"] = {"source": {"kind": "torch.export", "path": str(path)}, "recipe": [],
                           "input_shape": [1, *shape[1:]]}
    return gm
