"""Save and load rewritten models without pickle.

A saved model is a directory: ``graph.json`` (the fx graph, the leaf modules' configurations and the
recipe: source model, passes with their parameters and decisions, input shape, rewrite report) and
``tensors.safetensors`` (every weight and buffer). See :mod:`vitprune.serialize`. Loading rebuilds
the exact graph; it needs neither the model's Python code nor unpickling.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from vitprune.capture import capture
from vitprune.errors import LoadError, SaveError
from vitprune.load import source_of
from vitprune.serialize import load_graph_module, save_graph_module

GRAPH_FILE = "graph.json"


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save`."""
    return (Path(path) / GRAPH_FILE).is_file()


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    outs = []
    for m in (a, b):
        was = m.training
        m.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(m(x))
        m.train(was)
    return torch.equal(outs[0], outs[1])


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
         report: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (a rewritten GraphModule, or any model fx can capture) to the directory ``path``.

    The directory is written next to its destination and renamed into place (atomic on one file
    system), after reloading it and checking that it gives the same eval-mode output on the example
    input shape the model was verified with.

    Raises:
        SaveError: ``path`` exists and ``overwrite`` is false, or exists and is not a saved vitprune
            model (never replaced), its parent folder is missing, the graph calls something that
            cannot be saved without pickle, or the reloaded model differs.
    """
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise SaveError(f"{path} exists; pass --overwrite (Python: overwrite=True) to replace it")
        if not is_saved_model(path):
            raise SaveError(f"{path} exists and is not a model saved by vitprune; refusing to replace it")
    if not path.parent.is_dir():
        raise SaveError(f"the folder {path.parent} does not exist")
    gm = model if isinstance(model, fx.GraphModule) else capture(model)
    meta = dict(getattr(gm, "meta", {}).get("vitprune") or {"source": source_of(model), "recipe": []})
    if report is not None:
        meta["report"] = report
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_graph_module(gm, tmp, metadata=meta)
        if meta.get("input_shape"):
            again, _ = load_graph_module(tmp)
            x = torch.randn(*meta["input_shape"], generator=torch.Generator().manual_seed(0))
            if not _same_outputs(gm, again, x):
                raise SaveError("the saved model does not reproduce the model's output; nothing was written")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_saved(path: str | os.PathLike) -> fx.GraphModule:
    """Load a directory written by :func:`save`; ``gm.meta["vitprune"]`` holds its recipe.

    Raises:
        LoadError: not a saved model, or its files are corrupt.
    """
    path = Path(path)
    if not is_saved_model(path):
        raise LoadError(f"{path} is a folder but not a model saved by vitprune (no {GRAPH_FILE})")
    gm, meta = load_graph_module(path)
    gm.meta["vitprune"] = meta
    return gm
