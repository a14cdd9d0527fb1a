"""Save a ``torch.fx.GraphModule`` to a directory without pickle, and load it back.

A saved directory holds ``graph.json`` (format name and version, the nodes in graph order, one spec
per ``call_module`` target as ``module:qualname`` plus constructor config, an index of every tensor,
each module's ``training`` flag, the caller's metadata) and ``tensors.safetensors`` (every parameter,
buffer and ``get_attr`` tensor constant, keyed by dotted path).

``graph.json`` is data. Every function, tensor method, ``getattr`` attribute and module class it
names must be on the closed allowlist of :mod:`vitprune.io.allowlist` (exact names of pure tensor
operations, enumerated from what capture and vitprune's passes produce); a name is looked up in a
fixed table, never imported or walked from the file, so nothing with file, process, network or
storage effects can be named by any spelling. ``get_attr`` reads only tensors, methods are called only
on node values, and every string fx pastes into the generated ``forward`` source is checked. Loading
checks all of that before it reads a tensor or builds a module, so a tampered file fails with
:class:`~vitprune.errors.LoadError` before anything runs. Tensors are data: they are copied out of
``tensors.safetensors`` (nothing maps the file). Saving a graph that uses anything else raises
:class:`~vitprune.errors.SaveError` naming it.
"""

from __future__ import annotations

import builtins
import inspect
import json
import keyword
import math
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn

from vitprune.io import allowlist
from vitprune.errors import LoadError, SaveError
from vitprune.ops.modules import LEAF_MODULES

FORMAT_NAME, FORMAT_VERSION = "vitprune.fx-graph", 1
GRAPH_FILE, TENSOR_FILE = "graph.json", "tensors.safetensors"


def _function_name(fn: object) -> str:
    """The allowlisted name of a call_function target. Raises SaveError if it has none."""
    try:
        return allowlist.function_names()[fn]
    except (KeyError, TypeError):  # TypeError: an unhashable callable object
        pass
    module = getattr(fn, "__module__", None)
    name = f"{'operator' if module == '_operator' else module}.{getattr(fn, '__name__', fn)}"
    raise SaveError(f"the graph calls {name}, which is not on vitprune's allowlist of pure tensor operations, "
                    "so it cannot be saved")


def _check_call(op: str, target: object, args: tuple, error: type[Exception]) -> None:
    """Raise ``error`` for a method or getattr attribute outside the allowlist, or a method on a non-node."""
    # getattr(x, "shape") is fine; "__class__", "untyped_storage" (or a name built at run time) are not.
    if target is builtins.getattr and (len(args) != 2 or args[1] not in allowlist.ATTRIBUTES):
        raise error(f"the graph reads attribute {args[1:2]!r} with getattr, which is not on vitprune's allowlist")
    if op == "call_method" and target not in allowlist.METHODS:
        raise error(f"the graph calls method {target!r}, which is not on vitprune's allowlist of tensor methods")
    if op == "call_method" and not (args and isinstance(args[0], fx.Node)):  # never a method of a literal
        raise error(f"the graph calls method {target!r} on {args[:1]!r}, which is not the value of a node")


def _check_identifier(name: object, what: str) -> str:
    # fx pastes placeholder targets and kwarg names verbatim into the forward source it exec()s.
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise LoadError(f"graph.json has an invalid {what} {name!r}")
    return name


_PATH = re.compile(r"(?!__)\w+(\.(?!__)\w+)*", re.ASCII)


def _check_path(path: object) -> str:
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        raise LoadError(f"graph.json names an invalid attribute path {path!r}")
    return path


# Argument values <-> JSON: lists, str, int, bool, None and finite floats as they are, the rest as a
# one-key object {tag: value}. Dicts are always tagged, so a tag is never confused with a dict.
_ENUMS = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}


def _encode(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or type(v) in (bool, int, str) or (type(v) is float and math.isfinite(v)):
        return v
    if type(v) is float:
        return {"float": repr(v)}  # JSON has no inf/nan
    if type(v) in (tuple, torch.Size):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):  # fx's immutable_list too
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {"dict": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if type(v) is slice:
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": None}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    for tag, kind in _ENUMS.items():
        if isinstance(v, kind):
            return {tag: str(v).removeprefix("torch.")}
    raise SaveError(f"the graph holds a value of type {type(v).__name__}, which vitprune cannot save without pickle")


def _decode(v: Any, env: dict[str, fx.Node]) -> Any:
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, list):
        return [_decode(x, env) for x in v]
    tag, x = next(iter(v.items())) if isinstance(v, dict) and len(v) == 1 else (None, None)
    if tag == "node" and x in env:
        return env[x]
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag in ("tuple", "slice") and isinstance(x, list):
        return tuple(_decode(e, env) for e in x) if tag == "tuple" else slice(*(_decode(e, env) for e in x))
    if tag == "dict" and isinstance(x, list):
        return {_decode(k, env): _decode(e, env) for k, e in x}
    if tag == "ellipsis":
        return Ellipsis
    if tag == "device" and isinstance(x, str):
        return torch.device(x)
    if tag in _ENUMS and isinstance(x, str) and not x.startswith("_") and isinstance(vars(torch).get(x), _ENUMS[tag]):
        return vars(torch)[x]
    raise LoadError(f"graph.json holds an unreadable value {v!r} (unknown node or tag)")


# nn.MultiheadAttention keeps neither `bias` nor `add_bias_kv` as attributes, only the tensors they
# create, so the generic walk would fall back to their defaults. (nn.LayerNorm needs no special case:
# its `bias` attribute is a Parameter or None, which the generic rule reads.)
_SPECIAL_CONFIG: dict[type, Callable[[nn.Module], dict[str, Any]]] = {
    nn.MultiheadAttention: lambda m: {"bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None},
}


def _resolve_class(spec: object) -> type[nn.Module] | None:
    """The allowlisted module class stored as ``spec`` (``module:qualname``), or None."""
    if not isinstance(spec, str):
        return None
    return allowlist.module_classes().get(spec) or allowlist.legacy_module_classes().get(spec)


def _module_config(mod: nn.Module, path: str) -> dict[str, Any]:
    """Constructor kwargs of a leaf (its config()) or torch.nn module (read off its attributes)."""
    cls = type(mod)
    if _resolve_class(allowlist.class_name(cls)) is not cls:
        raise SaveError(f"the graph calls module {path} ({allowlist.class_name(cls)}), which is not on vitprune's "
                        "allowlist of module classes, so it cannot be saved")
    if cls in LEAF_MODULES.values():
        return mod.config()
    config = _SPECIAL_CONFIG.get(cls, lambda m: {})(mod)
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype", *config):
            continue
        if hasattr(mod, p.name):
            value = getattr(mod, p.name)
            if (value is None or isinstance(value, torch.Tensor)) and isinstance(p.default, bool):
                value = value is not None  # `bias=True` leaves a Parameter, `bias=False` leaves None
            config[p.name] = value
        elif p.default is p.empty:
            raise SaveError(f"cannot save module {path} ({cls.__name__}): argument {p.name!r} is not an attribute")
    # Rebuild on the meta device (no memory, no init) to catch a wrong config now rather than at load.
    try:
        with torch.device("meta"):
            again = cls(**config)
    except Exception as exc:  # any constructor error means the derived config is wrong
        raise SaveError(f"module {path} ({cls.__name__}) cannot be rebuilt from its attributes: {exc}") from exc
    layout = lambda m: {k: (tuple(t.shape), t.is_floating_point()) for k, t in m.state_dict().items()}
    if layout(again) != layout(mod):
        raise SaveError(f"module {path} ({cls.__name__}) rebuilt from its attributes has other weights")
    return config


def _build_module(path: str, spec: dict, tensors: dict[str, torch.Tensor], index: dict) -> nn.Module:
    cls = _resolve_class(spec["class"])  # allowlisted: load_graph_module checked every class first
    try:
        with torch.device("meta"):  # the weights come from the file: skip random init
            mod = cls(**{_check_identifier(k, "argument"): _decode(v, {}) for k, v in spec["config"].items()})
        prefix = f"{path}."
        local = {k[len(prefix):]: tensors[k] for k in index if k.startswith(prefix)}
        loose = {k: local.pop(k) for k in list(local) if index[prefix + k].get("persistent") is False}
        mod.load_state_dict(local, strict=True, assign=True)  # assign: keep the saved dtype
        for name, t in loose.items():  # non-persistent buffers are outside the state dict
            owner, _, field = name.rpartition(".")
            mod.get_submodule(owner).register_buffer(field, t, persistent=False)
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())
        raise LoadError(f"module {path} ({cls.__name__}) cannot be rebuilt from the saved files: {reason}") from exc
    if any(t.is_meta for t in [*mod.parameters(), *mod.buffers()]):
        raise LoadError(f"module {path} ({cls.__name__}) has tensors missing from {TENSOR_FILE}")
    return mod


def _tensor_entry(gm: fx.GraphModule, path: str, t: torch.Tensor) -> dict[str, Any]:
    owner_path, _, field = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if field in owner._parameters:
        return {**entry, "kind": "parameter", "requires_grad": t.requires_grad}
    if field in owner._buffers:
        return {**entry, "kind": "buffer", "persistent": field not in owner._non_persistent_buffers_set}
    return {**entry, "kind": "constant"}


def save_graph_module(gm: fx.GraphModule, directory: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``gm`` as ``graph.json`` and ``tensors.safetensors`` into the existing ``directory``.

    Tensors are written on the CPU in their own dtype and shape. ``metadata`` must be plain JSON
    (str keys; str, int, finite float, bool, None, list, dict values); it comes back from
    :func:`load_graph_module` as written, tuples as lists. Other non-tensor attributes of ``gm`` and
    node ``meta``/type annotations are not saved; a tensor at two paths comes back as two copies.

    Raises:
        SaveError: ``directory`` does not exist; the graph calls a function, method or module class
            outside the allowlist, holds an argument of an unsupported type, reads a non-tensor
            attribute, uses a custom fx code generator; or ``metadata`` is not plain JSON.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SaveError(f"the folder {directory} does not exist")
    if type(gm.graph._codegen) is not fx.graph.CodeGen:  # pytree codegen carries Python objects
        raise SaveError("the graph uses a custom fx code generator, which vitprune cannot save without pickle")
    nodes, modules, index, tensors = [], {}, {}, {}
    for path, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        index[path], tensors[path] = _tensor_entry(gm, path, t), t
    for node in gm.graph.nodes:
        target = node.target
        _check_call(node.op, target, node.args, SaveError)
        if node.op == "call_function":
            target = _function_name(target)
        elif node.op == "call_module" and target not in modules:
            mod = gm.get_submodule(target)
            config = {k: _encode(v) for k, v in _module_config(mod, target).items()}
            modules[target] = {"class": allowlist.class_name(type(mod)), "config": config}
        elif node.op == "get_attr" and target not in index:
            obj = operator.attrgetter(target)(gm)
            if not isinstance(obj, torch.Tensor):
                raise SaveError(f"the graph reads {target}, a {type(obj).__name__}; only tensor attributes can be saved")
            index[target], tensors[target] = _tensor_entry(gm, target, obj), obj
        nodes.append({"name": node.name, "op": node.op, "target": target, "args": [_encode(a) for a in node.args],
                      "kwargs": {k: _encode(v) for k, v in node.kwargs.items()}})
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "class_name": type(gm).__name__,
           "training": gm.training, "nodes": nodes, "modules": modules, "tensors": index,
           "module_training": {p: m.training for p, m in gm.named_modules(remove_duplicate=False)},
           "metadata": {} if metadata is None else metadata}
    try:
        text = json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SaveError(f"the metadata is not plain JSON: {exc}") from exc
    flat = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}  # no shared storage
    try:
        save_file(flat, str(directory / TENSOR_FILE))
    except Exception as exc:  # safetensors raises its own types (unsupported dtype, disk full)
        raise SaveError(f"could not write {directory / TENSOR_FILE}: {exc}") from exc
    (directory / GRAPH_FILE).write_text(text, encoding="utf-8")


def _read_doc(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise LoadError(f"{directory} does not exist or is not a folder")
    try:
        doc = json.loads((directory / GRAPH_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{directory} has no {GRAPH_FILE}, so it is not a saved vitprune graph") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise LoadError(f"{directory / GRAPH_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise LoadError(f"{directory / GRAPH_FILE} is not a vitprune graph (format {FORMAT_NAME!r})")
    if doc.get("version") != FORMAT_VERSION:
        raise LoadError(f"{directory / GRAPH_FILE} has format version {doc.get('version')!r}; "
                        f"this vitprune reads version {FORMAT_VERSION}")
    return doc


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(directory / TENSOR_FILE))
    except Exception as exc:  # missing, truncated, bad header: safetensors raises several types
        raise LoadError(f"{directory / TENSOR_FILE} is missing or corrupt: {exc}") from exc
    # Copies into fresh allocations: no tensor maps the file (so no op writes to it), and tensors read
    # from the file can be unaligned, which sends CPU GEMM kernels down a path whose rounding differs
    # (seen: 6e-8 at batch 1).
    return {k: v.clone() for k, v in tensors.items()}


def _container(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that holds ``path``'s last part, creating plain nn.Module containers on the way."""
    *parents, field = _check_path(path).split(".")
    mod = root
    for part in parents:
        if part not in mod._modules:
            if hasattr(mod, part):
                raise LoadError(f"path {path} clashes with attribute {part!r}")
            mod.add_module(part, nn.Module())
        mod = mod._modules[part]
    return mod, field


def _place(root: nn.Module, path: str, t: torch.Tensor, entry: dict[str, Any]) -> None:
    """Put ``t`` at ``path`` as a parameter, buffer (persistent or not) or plain attribute."""
    mod, field = _container(root, path)
    if field in mod._parameters or field in mod._buffers or isinstance(mod.__dict__.get(field), torch.Tensor):
        delattr(mod, field)  # GraphModule registers every plain tensor it copies as a buffer: undo that
    if hasattr(mod, field):
        raise LoadError(f"tensor path {path} clashes with an existing attribute")
    if entry["kind"] == "parameter":
        mod.register_parameter(field, nn.Parameter(t, requires_grad=bool(entry["requires_grad"])))
    elif entry["kind"] == "buffer":
        mod.register_buffer(field, t, persistent=bool(entry["persistent"]))
    else:
        setattr(mod, field, t)


def _build_graph(doc: dict[str, Any]) -> fx.Graph:
    graph, env = fx.Graph(), {}
    specs, index = doc["modules"], doc["tensors"]
    for rec in doc["nodes"]:
        op, target = rec["op"], rec["target"]
        if op == "call_function":
            target = allowlist.functions().get(target) if isinstance(target, str) else None
            if target is None:
                raise LoadError(f"graph.json calls {rec['target']!r}, which is not on vitprune's allowlist")
        elif op in ("call_module", "get_attr"):
            # get_attr reads a saved tensor, never a module: tensors are data, modules have methods
            if _check_path(target) not in (specs if op == "call_module" else index):
                raise LoadError(f"graph.json node {rec['name']!r} uses unknown {op} target {target!r}")
        elif op == "placeholder":
            _check_identifier(target, "input name")
        elif op not in ("call_method", "output") or (op == "output" and target != "output"):
            raise LoadError(f"graph.json has a node with unknown op {op!r} or target {target!r}")
        args = tuple(_decode(a, env) for a in rec["args"])
        kwargs = {_check_identifier(k, "keyword argument"): _decode(v, env) for k, v in rec["kwargs"].items()}
        _check_call(op, target, args, LoadError)
        node = graph.create_node(op, target, args, kwargs, name=rec["name"])
        if node.name != rec["name"]:
            raise LoadError(f"graph.json has a duplicate or invalid node name {rec['name']!r}")
        env[node.name] = node
    graph.lint()
    return graph


def load_graph_module(directory: str | os.PathLike) -> tuple[fx.GraphModule, dict]:
    """Load a directory written by :func:`save_graph_module`; returns ``(gm, metadata)``.

    ``gm`` has the saved node names and order, its tensors on the CPU in their saved dtype and shape,
    parameters (with ``requires_grad``), buffers and constants at the same dotted paths, and the
    saved ``training`` flag on itself and on every module.

    Raises:
        LoadError: the folder or ``graph.json`` is missing, the JSON is invalid, of another format or
            version, ``tensors.safetensors`` is missing, truncated or disagrees with the index
            (missing tensor, other shape or dtype), or the file names a function, method, module
            class or name outside the allowlist (it is then neither imported nor called).
    """
    directory = Path(directory)
    doc = _read_doc(directory)
    try:
        # Every class, call target, method and name is checked before a tensor is read or a module built.
        classes = allowlist.module_classes()
        for path, spec in doc["modules"].items():
            if not isinstance(spec["class"], str) or spec["class"] not in classes:
                raise LoadError(f"graph.json asks for module class {spec['class']!r} at {path}, "
                                "which is not on vitprune's allowlist")
        graph = _build_graph(doc)
        tensors = _read_tensors(directory)
        index, specs = doc["tensors"], doc["modules"]
        for path, entry in index.items():
            t = tensors.get(path)
            if t is None or list(t.shape) != entry["shape"] or str(t.dtype).removeprefix("torch.") != entry["dtype"]:
                raise LoadError(f"tensor {path} is missing from {TENSOR_FILE} or has another shape or dtype")
        root = nn.Module()
        for path in sorted(specs, key=lambda p: p.count(".")):  # parents before nested targets
            mod = _build_module(_check_path(path), specs[path], tensors, index)
            parent, field = _container(root, path)
            parent.add_module(field, mod)
        owned = tuple(f"{p}." for p in specs)  # loaded with their module above
        free = {p: e for p, e in index.items() if not p.startswith(owned)}
        for path, entry in free.items():
            _place(root, path, tensors[path], entry)
        class_name = doc["class_name"] if str(doc["class_name"]).isidentifier() else "GraphModule"
        gm = fx.GraphModule(root, graph, class_name=class_name)
        for path, entry in free.items():
            _place(gm, path, tensors[path], entry)
        for path, entry in index.items():
            if entry["kind"] == "parameter":
                gm.get_parameter(path).requires_grad_(bool(entry["requires_grad"]))
        gm.train(bool(doc["training"]))
        present = dict(gm.named_modules(remove_duplicate=False))
        for path, flag in doc["module_training"].items():
            if path in present:  # a container that held nothing the graph uses is not rebuilt
                present[path].training = bool(flag)
        gm.recompile()
    except LoadError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise LoadError(f"{directory / GRAPH_FILE} is malformed ({type(exc).__name__}: {exc})") from exc
    return gm, doc["metadata"]
