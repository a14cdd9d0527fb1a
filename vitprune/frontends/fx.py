"""torch.fx frontend: a captured ``GraphModule`` -> the neutral :class:`~vitprune.graph.opgraph.OpGraph`.

Shapes come from ``ShapeProp`` on one example input (eval mode, no grad). Both graph levels map here:
torch-level graphs from symbolic trace (``torch.cat``, ``F.scaled_dot_product_attention``, ``nn.Linear``
modules, ``x[:, 0]``) and aten-level graphs from ``torch.export`` (``aten.cat.default``,
``aten.select.int``, ``aten.linear.default``); each op lands on the kind the analysis reads, with its
attributes normalised (an index becomes ``{axis: int | slice}`` whichever way it was written).
"""

from __future__ import annotations

import contextlib
import io
import operator
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from vitprune.errors import AnalysisError
from vitprune.graph.opgraph import OpGraph
from vitprune.ops.modules import LEAF_MODULES, TokenModule

aten = torch.ops.aten

_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.iadd: "add", operator.mul: "mul", torch.mul: "mul",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    F.linear: "linear", F.conv2d: "conv", torch.conv2d: "conv", F.conv_transpose2d: "conv_transpose",
    F.embedding: "embedding",
    F.scaled_dot_product_attention: "sdpa",
    torch.softmax: "softmax", F.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    operator.getitem: "index", torch.select: "index", torch.narrow: "index",
    torch.mean: "mean", torch.amax: "max", F.layer_norm: "norm",
    torch.reshape: "reshape", torch.flatten: "reshape", torch.permute: "permute", torch.transpose: "permute",
}
_METHODS = {"add": "add", "mul": "mul", "matmul": "matmul", "softmax": "softmax", "mean": "mean", "amax": "max",
            "select": "index", "narrow": "index", "view": "reshape", "reshape": "reshape", "flatten": "reshape",
            "transpose": "permute", "permute": "permute"}
# aten-level (torch.export) ops, by overload packet
_ATEN: dict[Any, str] = {
    aten.add: "add", aten.mul: "mul", aten.matmul: "matmul", aten.bmm: "matmul", aten.mm: "matmul",
    aten.linear: "linear", aten.addmm: "linear", aten.conv2d: "conv", aten.convolution: "conv",
    aten.conv_transpose2d: "conv_transpose", aten.embedding: "embedding",
    aten.scaled_dot_product_attention: "sdpa", aten._scaled_dot_product_flash_attention_for_cpu: "sdpa",
    aten._softmax: "softmax", aten.softmax: "softmax", aten.cat: "cat",
    aten.select: "index", aten.slice: "index", aten.narrow: "index",
    aten.mean: "mean", aten.amax: "max", aten.layer_norm: "norm", aten.native_layer_norm: "norm",
    aten.view: "reshape", aten.reshape: "reshape", aten._unsafe_view: "reshape", aten.flatten: "reshape",
    aten.permute: "permute", aten.transpose: "permute",
}


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in meta.shape) if isinstance(meta, TensorMetadata) else None


def _is_tensor_valued(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return True
    return isinstance(meta, (tuple, list)) and any(isinstance(m, TensorMetadata) for m in meta)


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "constant"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) in LEAF_MODULES.values():
            return "token_op"
        for cls, kind in ((nn.MultiheadAttention, "mha"), (nn.Linear, "linear"), (nn.Conv2d, "conv"),
                          (nn.ConvTranspose2d, "conv_transpose"), (nn.Embedding, "embedding"),
                          (nn.Softmax, "softmax"), (nn.LayerNorm, "norm")):
            if isinstance(mod, cls):
                return kind
        return "other"
    if node.op == "call_method":
        return _METHODS.get(node.target, "other")
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        return _ATEN.get(packet, "other")
    try:
        return _FUNCTIONS.get(node.target, "other")
    except TypeError:  # unhashable target
        return "other"


def _normalise_index(node: fx.Node, rank: int) -> dict[str, Any]:
    """``{"axes": {axis: int | slice}, "tensor_axes": [axis, ...]}`` for the non-trivial axes of an index op
    (``tensor_axes``: indexed by a tensor, a list or a computed value), or ``{"opaque": True}``."""
    target = node.target
    full = slice(None)
    if target is operator.getitem:
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is None for i in idx) or sum(i is Ellipsis for i in idx) > 1:
            return {"opaque": True}
        if Ellipsis in idx:  # x[..., :d]: the ellipsis stands for the axes the others leave
            at = idx.index(Ellipsis)
            idx = idx[:at] + (full,) * max(0, rank - len(idx) + 1) + idx[at + 1:]
        axes, tensor_axes = {}, []
        for axis, i in enumerate(idx):
            ok_slice = isinstance(i, slice) and all(isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step))
            if isinstance(i, bool) or not (isinstance(i, int) or ok_slice):
                tensor_axes.append(axis)  # a tensor, list or computed index: which positions is not known here
            elif i != full:
                axes[axis] = i
        return {"axes": axes, "tensor_axes": tensor_axes}
    packet = getattr(target, "overloadpacket", None)
    if target in (torch.select, "select") or packet is aten.select:
        dim, index = _arg(node, 1, "dim"), _arg(node, 2, "index")
        if not (isinstance(dim, int) and isinstance(index, int)):
            return {"opaque": True}
        return {"axes": {dim % rank: index}, "tensor_axes": []}
    if target in (torch.narrow, "narrow") or packet is aten.narrow:
        dim, start, length = _arg(node, 1, "dim"), _arg(node, 2, "start"), _arg(node, 3, "length")
        if not all(isinstance(v, int) for v in (dim, start, length)):
            return {"opaque": True}
        return {"axes": {dim % rank: slice(start, start + length)}, "tensor_axes": []}
    if packet is aten.slice:
        dim, start, end, step = (_arg(node, 1, "dim", 0), _arg(node, 2, "start"), _arg(node, 3, "end"),
                                 _arg(node, 4, "step", 1))
        if not all(isinstance(v, (int, type(None))) for v in (dim, start, end, step)):
            return {"opaque": True}
        end = None if end is not None and end >= 2 ** 62 else end  # aten spells "to the end" as INT64_MAX
        s = slice(start or None, end, None if step == 1 else step)
        return {"axes": {} if s == full else {dim % rank: s}, "tensor_axes": []}
    return {"opaque": True}


def _permutation(node: fx.Node, rank: int) -> dict[str, Any]:
    """``{"perm": [...]}`` of a permute or transpose (output axis i is input axis perm[i]), ``{}`` if not known."""
    name = getattr(node.target, "__name__", node.target)
    args = list(node.args[1:])
    if not rank or not all(isinstance(a, int) or isinstance(a, (tuple, list)) for a in args):
        return {}
    if "transpose" in str(name) and len(args) == 2 and all(isinstance(a, int) for a in args):
        perm = list(range(rank))
        a, b = args[0] % rank, args[1] % rank
        perm[a], perm[b] = perm[b], perm[a]
        return {"perm": perm}
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if "permute" in str(name) and len(dims) == rank and all(isinstance(d, int) for d in dims):
        return {"perm": [d % rank for d in dims]}
    return {}


_INSERTS = {"stack", "unsqueeze"}  # one new axis at ``dim`` (token axes are placed by it, not by sizes)
_REMOVES = {"squeeze", "unbind", "select"}


def _axis_change(node: fx.Node, rank: int, out_rank: int) -> dict[str, Any]:
    """``{"inserts_axis": d}`` (stack, unsqueeze) or ``{"removes_axis": d}`` (squeeze of one axis, unbind),
    ``d`` counted in the output / input frame; ``{}`` for other ops."""
    name = str(getattr(node.target, "__name__", node.target)).split(".")[0]
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(dim, int):
        return {}
    if name == "stack":
        inner = len(_shape(node.args[0][0]) or ()) if node.args and isinstance(node.args[0], (list, tuple)) \
            and node.args[0] and isinstance(node.args[0][0], fx.Node) else 0
        return {"inserts_axis": dim % (inner + 1)} if inner else {}
    if name == "unsqueeze" and rank:
        return {"inserts_axis": dim % (rank + 1)}
    if name in ("squeeze", "unbind") and rank and (name == "unbind" or len(node.args) > 1 or "dim" in node.kwargs):
        return {"removes_axis": dim % rank}
    return {}


def _split(node: fx.Node, rank: int) -> dict[str, Any]:
    """``{"split": {"dim": d, "sizes": [...]}}`` of ``torch.split`` / ``Tensor.split`` / ``aten.split`` /
    ``aten.split_with_sizes`` with literal sizes (an int size is expanded over the input's axis), ``{}``
    otherwise: the items are then placed by their shapes."""
    name = str(getattr(node.target, "__name__", node.target)).split(".")[0]
    if name not in ("split", "split_with_sizes") or not rank:
        return {}
    sizes, dim = _arg(node, 1, "split_size_or_sections", _arg(node, 1, "split_size")), _arg(node, 2, "dim", 0)
    shape = _shape(node.args[0])
    if not isinstance(dim, int) or shape is None:
        return {}
    dim %= rank
    if isinstance(sizes, int) and sizes > 0:
        sizes = [min(sizes, shape[dim] - start) for start in range(0, shape[dim], sizes)]
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(v, int) for v in sizes) or sum(sizes) != shape[dim]:
        return {}
    return {"split": {"dim": dim, "sizes": list(sizes)}}


def _attrs(gm: fx.GraphModule, node: fx.Node, kind: str) -> dict[str, Any]:
    """Kind-specific, frontend-independent attributes (see :mod:`vitprune.graph.opgraph`)."""
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    first = node.args[0] if node.args else None
    rank = len(_shape(first) or ())
    if kind == "sdpa":
        return {"scale": node.kwargs.get("scale", _arg(node, 6, "scale") if node.op != "call_module" else None)}
    if kind == "softmax":
        return {"dim": mod.dim if mod is not None else _arg(node, 1, "dim")}
    if kind == "mha":
        return {"heads": mod.num_heads, "head_dim": mod.head_dim, "embed_dim": mod.embed_dim,
                "batch_first": bool(mod.batch_first)}
    if kind == "linear":
        if isinstance(mod, nn.Linear):
            return {"in_features": mod.in_features, "out_features": mod.out_features}
        weight = _shape(_arg(node, 2, "mat2") if getattr(node.target, "overloadpacket", None) is aten.addmm
                        else _arg(node, 1, "weight"))
        if getattr(node.target, "overloadpacket", None) is aten.addmm:  # addmm(bias, x, Wᵀ): Wᵀ is [in, out]
            return {"in_features": weight[0], "out_features": weight[1]} if weight else {}
        return {"in_features": weight[1], "out_features": weight[0]} if weight else {}
    if kind == "permute":
        return _permutation(node, rank)
    if kind == "mul" and len(node.args) == 2:  # a scale (q·kᵀ · d^-0.5): the analysis reads the softmax's scale
        c = next((a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)), None)
        return {} if c is None else {"scalar": float(c)}
    if kind == "conv":
        stride = list(mod.stride) if mod is not None else _arg(node, 3, "stride", 1)
        return {"stride": list(stride) if isinstance(stride, (tuple, list)) else [stride, stride]}
    if kind == "cat":
        dim = _arg(node, 1, "dim", 0)
        rank = len(_shape(node) or ())
        return {"dim": dim + rank if isinstance(dim, int) and dim < 0 else dim}
    if kind in ("mean", "max"):
        dim = _arg(node, 1, "dim")
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,) if dim is not None else ()
        return {"dims": tuple(d % rank if isinstance(d, int) and rank else d for d in dims)}
    if kind == "index":
        return _normalise_index(node, rank or 1)
    if kind == "other":
        return _split(node, rank) or _axis_change(node, rank, len(_shape(node) or ()))
    if kind == "token_op":  # changes_tokens: a TokenModule (drops/gathers), not a training-only gate
        return {"module": type(mod).__name__, "config": mod.config(), "changes_tokens": isinstance(mod, TokenModule)}
    return {}


def fx_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """The data flow of ``gm`` as a ``networkx.DiGraph`` over node names (an edge from each input to its user)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name)
        g.add_edges_from((i.name, node.name) for i in node.all_input_nodes)
    return g


class RecordValues(fx.Interpreter):
    """Runs the graph and keeps the values of the named nodes in :attr:`values`."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Run ``ShapeProp`` (eval, no grad), turning a failure into one ``AnalysisError`` line."""
    was_training = gm.training
    gm.eval()
    try:
        # ShapeProp prints the failing node's traceback itself; the user gets the one-line error below.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        cause = exc.__cause__ or exc  # ShapeProp wraps the model's own error (its message names the node)
        text = str(cause).strip() or str(exc).strip()
        raise AnalysisError(
            f"the model fails on an example input of shape {list(example_input.shape)} "
            f"(check --input-size C,H,W): {text.splitlines()[0] if text else type(cause).__name__}"
        ) from exc
    finally:
        gm.train(was_training)


def to_opgraph(gm: fx.GraphModule, example_input: torch.Tensor) -> OpGraph:
    """The neutral op graph of ``gm`` (one image input ``[B, C, H, W]``), node names kept.

    Raises:
        AnalysisError: the graph does not take exactly one input, or fails on ``example_input``.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise AnalysisError(f"the graph takes {len(placeholders)} inputs; vitprune analyses one image input")
    propagate_shapes(gm, example_input)
    og = OpGraph(batch=example_input.shape[0])
    for node in gm.graph.nodes:
        kind = _kind(gm, node)
        positional = [a if isinstance(a, fx.Node) else None for a in node.args]
        if kind == "cat":
            positional = [t if isinstance(t, fx.Node) else None for t in node.args[0]]
        extra = [i.name for i in node.all_input_nodes if i not in positional]
        tensor = node.op != "output" and _is_tensor_valued(node)
        label = f"{node.op} {getattr(node.target, '__name__', node.target)}"  # for messages
        og.add(node.name, kind, shape=_shape(node), tensor=tensor,
               inputs=[a.name if a is not None else None for a in positional], extra_inputs=extra,
               label=label, **_attrs(gm, node, kind))
    return og
