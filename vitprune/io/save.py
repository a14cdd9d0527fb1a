"""Save and load rewritten models without pickle.

A saved model is a directory: ``graph.json`` (the fx graph, the leaf modules' configurations and the
recipe: source model, passes with their parameters and decisions, input shape, rewrite report),
``tensors.safetensors`` (every weight and buffer) and ``vitprune.json``, the marker save writes itself
(format name and the files it wrote): only a folder with the marker and nothing but those files is ever
replaced (``overwrite=True``). See :mod:`vitprune.io.serialize`. Loading rebuilds
the exact graph; it needs neither the model's Python code nor unpickling.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from vitprune.frontends.capture import capture
from vitprune.errors import LoadError, SaveError, VitpruneError
from vitprune.io.origin import source_of
from vitprune.io.serialize import load_graph_module, save_graph_module

GRAPH_FILE, TENSOR_FILE = "graph.json", "tensors.safetensors"  # the two files serialize writes

#: the marker file :func:`save` writes into every model folder (format, and the files it wrote).
MARKER = "vitprune.json"
MARKER_FORMAT = "vitprune-model"


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory that holds a saved graph (``graph.json``; its format is checked on load)."""
    return (Path(path) / GRAPH_FILE).is_file()


def written_files(path: str | os.PathLike) -> set[str] | None:
    """The files :func:`save` wrote into the folder ``path`` (from its marker), or None without a valid marker."""
    try:
        doc = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT or not isinstance(doc.get("files"), list):
        return None
    files = {f for f in doc["files"] if isinstance(f, str) and f and "/" not in f and f not in (".", "..")}
    return files | {MARKER}


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    outs = []
    for m in (a, b):
        was = m.training
        m.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(m(x))
        m.train(was)
    # a model may return several outputs (a dense head's extra grid, Hugging Face's output classes)
    leaves = [torch.utils._pytree.tree_flatten(o) for o in outs]
    return leaves[0][1] == leaves[1][1] and all(
        torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(leaves[0][0], leaves[1][0]))


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
    from vitprune.io.outputs import check_writable_folder, clean_stale_temporaries, refuse_unless_replaceable

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise SaveError(f"{path} exists; pass --overwrite (Python: overwrite=True) to replace it")
        refuse_unless_replaceable(path, SaveError)
    if not path.parent.is_dir():
        raise SaveError(f"the folder {path.parent} does not exist")
    check_writable_folder(path.parent, "the saved model", SaveError)
    clean_stale_temporaries(path)
    if isinstance(model, fx.GraphModule):
        gm = model
    else:  # an example input lets capture fall back to torch.export (Hugging Face models)
        from vitprune.io.origin import example_input

        try:
            x = example_input(model)
        except VitpruneError:
            x = None
        gm = capture(model, x)
    meta = dict(getattr(gm, "meta", {}).get("vitprune") or {"source": source_of(model), "recipe": []})
    if report is not None:
        meta["report"] = report
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as exc:
        raise SaveError(f"cannot write to the folder {path.parent}: {exc.strerror or exc}") from None
    try:
        save_graph_module(gm, tmp, metadata=meta)
        (tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1,
                                              "files": sorted([GRAPH_FILE, TENSOR_FILE, MARKER])}, indent=1) + "\n",
                                  encoding="utf-8")
        if meta.get("input_shape"):
            again, _ = load_graph_module(tmp)
            x = torch.randn(*meta["input_shape"], generator=torch.Generator().manual_seed(0))
            if not _same_outputs(gm, again, x):
                raise SaveError("the saved model does not reproduce the model's output; nothing was written")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it a new folder's usual mode
        if path.exists():
            refuse_unless_replaceable(path, SaveError)  # again, just before replacing it
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"could not write {path}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
