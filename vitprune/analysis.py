"""Analyse a captured graph into a description of the ViT it computes.

Everything here is found from ops and data flow on the ``torch.fx`` graph, with shapes propagated
from one example input; no class or attribute name of the model is read:

- **attention ops**: ``scaled_dot_product_attention`` calls, ``softmax`` over a ``[B, H, N, M]``
  score tensor (matmul attention), or an ``nn.MultiheadAttention`` leaf;
- **residual stream**: ``add(a, b)`` of two ``[B, N, C]`` image-dependent tensors where ``a`` is an
  ancestor of ``b`` (``b`` is the branch); consecutive residual adds form the stream;
- **attention blocks**: a residual add whose branch holds an attention op opens a block, the
  following branch-without-attention adds (the MLP) belong to it;
- **embedding**: walking back from the first block's input through per-token ops: the position
  embedding add (an add of an image-independent tensor), the prefix-token concat (a ``cat`` on the
  token axis of image-independent tokens and the patch tokens), down to the patch tokens;
- **readout**: from the last residual add through per-token ops (final norm) to the ops that remove
  the token axis: a token index (``x[:, 0]``) or a mean over a token range;
- **token-indexed tensors**: image-independent tensors with a token-sized axis used after the point
  where tokens can be dropped (relative position bias, RoPE tables): a token pass must gather them;
- **other readers of the token stream**: every node after the drop point that reads the stream yet
  neither flows back into it (a block's branch, the chain between blocks) nor is the readout or after
  it: a second output that reads an intermediate block's tokens, a grid reshape for a dense head, a
  fixed token index (``x[:, 40]``); also token-axis indexing inside a block that reaches past the prefix
  tokens. Dropping tokens would silently change what they read, so passes refuse them by name.

A graph that does not fit gets :class:`~vitprune.errors.AnalysisError` with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from vitprune.errors import AnalysisError
from vitprune.modules import LEAF_MODULES, TokenModule

_ADD_TARGETS = {operator.add, torch.add, operator.iadd}
_SOFTMAX_TARGETS = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
_SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention}
_CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}
_CONV_MODULES = (nn.Conv2d,)
_CONV_FUNCTIONS = {torch.nn.functional.conv2d, torch.conv2d}


@dataclass
class AttentionBlock:
    """One attention block of the residual stream."""

    index: int
    attention: str  # "sdpa" | "matmul-softmax" | "multihead-module"
    heads: int
    head_dim: int | None
    dim: int  # width C of the residual stream
    tokens: int  # tokens attended over in this block (with the example input's mode)
    attention_node: str
    query_node: str | None  # q [B, H, N, d] for sdpa / matmul attention
    key_node: str | None  # k [B, H, N, d]
    residual_adds: list[str]
    residual_branches: list[str]  # per residual add: the branch output it adds to the stream
    input_node: str  # the residual stream entering the block, [B, tokens, dim]
    attention_scale: float | None  # softmax scale of q·kᵀ (sdpa: its `scale`, default head_dim ** -0.5)
    linear_flops_per_token: int  # FLOPs of the block's linear layers per token (2 · in · out summed)


@dataclass
class Readout:
    """How the head reads the token axis: one or more token indices, or a mean over a range."""

    kind: str  # "token" | "mean"
    token_indices: list[int] = field(default_factory=list)
    mean_start: int | None = None  # mean over tokens [mean_start:mean_stop]
    mean_stop: int | None = None
    nodes: list[str] = field(default_factory=list)

    def describe(self, num_prefix_tokens: int) -> str:
        if self.kind == "token":
            return "token " + ", ".join(f"x[:, {i}]" for i in self.token_indices)
        start = self.mean_start or 0
        what = "patch tokens" if start == num_prefix_tokens and start > 0 else "all tokens"
        if start not in (0, num_prefix_tokens):
            what = f"tokens [{start}:]"
        return f"mean over {what}"


@dataclass
class ViTGraph:
    """What vitprune knows of a captured ViT. Node fields hold fx node names."""

    input_shape: list[int]  # [B, C, H, W] of the example input
    num_patches: int  # P: patch tokens entering block 0 (before any vitprune token op)
    grid: list[int] | None  # [h, w] of the patch embedding conv, when there is one
    patch_size: list[int] | None
    embed_dim: int
    num_prefix_tokens: int
    prefix_tokens: list[str]  # per prefix token: "cls" | "distillation" | "register"
    pos_embed: str  # "after_prefix_concat" | "before_prefix_concat" | "patch_tokens_only" | "none"
    patch_tokens_node: str
    prefix_concat_node: str | None
    pos_embed_node: str | None
    token_stream_start: str  # tokens may be dropped right after this node
    blocks: list[AttentionBlock]
    readout: Readout
    final_ops: list[str]  # per-token ops between the last block and the readout (final norm)
    token_indexed: list[dict[str, Any]]  # image-independent tensors with a token axis after the start
    token_ops: list[dict[str, Any]]  # vitprune token modules already in the graph
    stream_readers: list[dict[str, Any]] = field(default_factory=list)  # readers a pass cannot follow

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``vitprune inspect --json``)."""
        d = asdict(self)
        d["num_blocks"] = self.num_blocks
        d["num_tokens"] = self.num_tokens
        d["readout"]["description"] = self.readout.describe(self.num_prefix_tokens)
        return d

    def describe(self) -> str:
        """A readable multi-line summary (``vitprune inspect``)."""
        lines = [
            f"input            {list(self.input_shape)}",
            f"patch embedding  {self.num_patches} patches"
            + (f" ({self.grid[0]}x{self.grid[1]} grid, patch {self.patch_size[0]}x{self.patch_size[1]})"
               if self.grid and self.patch_size else "")
            + f", width {self.embed_dim}",
            f"prefix tokens    {self.num_prefix_tokens}"
            + (f" ({', '.join(self.prefix_tokens)})" if self.prefix_tokens else ""),
            f"position embed   {self.pos_embed.replace('_', ' ')}",
            f"token stream     starts after node {self.token_stream_start!r}",
            f"readout          {self.readout.describe(self.num_prefix_tokens)}",
            f"blocks           {self.num_blocks}",
        ]
        for b in self.blocks:
            lines.append(
                f"  block {b.index:>2}  {b.attention:<16} heads {b.heads:>2}  dim {b.dim:>4}  tokens {b.tokens}"
            )
        for op in self.token_ops:
            lines.append(f"token op         {op['module']} before block {op['before_block']}: {op['config']}")
        for t in self.token_indexed:
            lines.append(f"token-indexed    {t['node']} {t['shape']} used by {t['used_by']}")
        for r in self.stream_readers:
            lines.append(f"other reader     {r['node']} ({r['op']}) {r['what']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# graph helpers


def _meta(node: fx.Node) -> Any:
    return node.meta.get("tensor_meta")


def _shape(node: Any) -> tuple[int, ...] | None:
    """Shape of a node producing one tensor, else None."""
    if not isinstance(node, fx.Node):
        return None
    meta = _meta(node)
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _is_tensor_valued(node: fx.Node) -> bool:
    meta = _meta(node)
    if isinstance(meta, TensorMetadata):
        return True
    return isinstance(meta, (tuple, list)) and any(isinstance(m, TensorMetadata) for m in meta)


def _is_call(node: fx.Node, targets: set, method: str | None = None) -> bool:
    if node.op == "call_function" and node.target in targets:
        return True
    return method is not None and node.op == "call_method" and node.target == method


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Graph:
    """Shape-annotated graph with data-dependence and ancestor sets."""

    def __init__(self, gm: fx.GraphModule, example_input: torch.Tensor) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise AnalysisError(f"the graph takes {len(placeholders)} inputs; vitprune analyses one image input")
        self.image = placeholders[0]
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input)
        except Exception as exc:
            raise AnalysisError(
                f"the model fails on an example input of shape {list(example_input.shape)}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from exc
        finally:
            gm.train(was_training)
        self.batch = example_input.shape[0]
        # data: nodes whose tensor value depends on the image's values (not just on its shape).
        self.data: set[fx.Node] = {self.image}
        for n in self.nodes:
            if any(i in self.data and _is_tensor_valued(i) for i in n.all_input_nodes):
                self.data.add(n)
        self.ancestors: dict[fx.Node, set[fx.Node]] = {}
        for n in self.nodes:
            anc: set[fx.Node] = set()
            for i in n.all_input_nodes:
                anc.add(i)
                anc |= self.ancestors[i]
            self.ancestors[n] = anc

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [i for i in node.all_input_nodes if i in self.data and _is_tensor_valued(i)]

    def is_constant_tensor(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node not in self.data and _is_tensor_valued(node)

    def is_per_token(self, node: fx.Node) -> bool:
        """One data input of the same shape as the output: dropout, norm, identity, activation."""
        ins = self.data_inputs(node)
        return len(ins) == 1 and _shape(node) is not None and _shape(ins[0]) == _shape(node)


# --------------------------------------------------------------------------------------------
# the analysis


def _attention_ops(g: _Graph) -> list[tuple[fx.Node, str]]:
    ops = []
    for n in g.nodes:
        if _is_call(n, _SDPA_TARGETS):
            ops.append((n, "sdpa"))
        elif (_is_call(n, _SOFTMAX_TARGETS, "softmax") or isinstance(_module(g.gm, n), nn.Softmax)) and n in g.data:
            shape = _shape(n)
            if shape is not None and len(shape) == 4:
                ops.append((n, "matmul-softmax"))
        elif isinstance(_module(g.gm, n), nn.MultiheadAttention):
            ops.append((n, "multihead-module"))
    return ops


def _attention_geometry(g: _Graph, node: fx.Node, kind: str) -> tuple[int, int, int | None, int]:
    """(batch, heads, head_dim, query tokens) of an attention op."""
    if kind == "sdpa":
        q = _shape(node.args[0])
        if q is None or len(q) != 4:
            raise AnalysisError(f"attention {node.name!r} has a query of shape {q}; expected [B, H, N, d]")
        return q[0], q[1], q[3], q[2]
    if kind == "matmul-softmax":
        s = _shape(node)
        return s[0], s[1], None, s[2]
    mod = _module(g.gm, node)
    q = _shape(node.args[0])
    if mod.batch_first:
        return q[0], mod.num_heads, mod.head_dim, q[1]
    return q[1], mod.num_heads, mod.head_dim, q[0]


def _residual_adds(g: _Graph) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(add, stream input, branch output) for every residual add on a [B, N, C] stream."""
    found = []
    for n in g.nodes:
        if not (_is_call(n, _ADD_TARGETS, "add") and n in g.data and len(n.args) >= 2):
            continue
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if a not in g.data or b not in g.data:
            continue
        sa, sb = _shape(a), _shape(b)
        if sa is None or sa != sb or len(sa) != 3 or sa[0] != g.batch:
            continue
        if a in g.ancestors[b]:
            found.append((n, a, b))
        elif b in g.ancestors[a]:
            found.append((n, b, a))
    return found


def _main_stream(g: _Graph, adds: list[tuple[fx.Node, fx.Node, fx.Node]]):
    """The longest chain of residual adds, each feeding the next through per-token/token ops."""
    by_node = {a[0]: a for a in adds}

    def root(n: fx.Node) -> fx.Node:
        # back from a stream input through single-data-input ops (norms, dropout, vitprune token ops)
        while n not in by_node:
            if isinstance(_module(g.gm, n), TokenModule):
                n = n.args[0]
                continue
            ins = g.data_inputs(n)
            if len(ins) != 1 or _shape(n) is None or len(_shape(n)) != 3:
                return n
            n = ins[0]
        return n

    prev = {a[0]: root(a[1]) for a in adds}
    chains: dict[fx.Node, list] = {}
    for add in adds:  # topological order
        p = prev[add[0]]
        chains[add[0]] = chains[p] + [add] if p in chains else [add]
    if not chains:
        return []
    return max(chains.values(), key=len)


def _branch_nodes(g: _Graph, stream_in: fx.Node, branch_out: fx.Node) -> set[fx.Node]:
    return {n for n in g.ancestors[branch_out] | {branch_out} if stream_in in g.ancestors[n]}


def _linear_flops_per_token(g: _Graph, branch: set[fx.Node]) -> int:
    """2 · in · out summed over the linear layers of a residual branch (FLOPs per token)."""
    total = 0
    for n in branch:
        mod = _module(g.gm, n)
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * mod.out_features
        elif isinstance(mod, nn.MultiheadAttention):
            total += 2 * 4 * mod.embed_dim * mod.embed_dim  # in-projection (q, k, v) + out-projection
        elif _is_call(n, {torch.nn.functional.linear}):
            w = _shape(_arg(n, 1, "weight"))
            total += 2 * w[0] * w[1] if w else 0
    return total


def _cat_dim(node: fx.Node, rank: int) -> int:
    dim = _arg(node, 1, "dim", 0)
    return dim + rank if dim < 0 else dim


def _walk_embedding(g: _Graph, start: fx.Node) -> dict[str, Any]:
    """Back from the first block's input to the patch tokens, through pos-add and prefix concat."""
    n = start
    result: dict[str, Any] = {"cat": None, "pos": None, "insert_after": None, "num_prefix": 0, "pos_order": []}
    while True:
        shape = _shape(n)
        if _is_call(n, _CAT_TARGETS) and shape is not None and len(shape) == 3:
            tensors = list(n.args[0])
            if _cat_dim(n, 3) != 1:
                raise AnalysisError(f"concat {n.name!r} before block 0 is not on the token axis")
            data = [t for t in tensors if t in g.data]
            if len(data) != 1:
                raise AnalysisError(
                    f"concat {n.name!r} before block 0 joins {len(data)} image-dependent inputs; expected "
                    "prefix tokens and one patch-token tensor"
                )
            pos = tensors.index(data[0])
            if pos != len(tensors) - 1:
                raise AnalysisError(f"concat {n.name!r} puts tokens after the patch tokens; vitprune needs prefix tokens first")
            if result["cat"] is not None:
                raise AnalysisError(f"two token concats before block 0 ({result['cat'].name!r}, {n.name!r})")
            result["cat"] = n
            result["num_prefix"] = sum(_shape(t)[1] for t in tensors[:pos])
            result["pos_order"].append("cat")
            result["insert_after"] = result["insert_after"] or n
            n = data[0]
            continue
        if _is_call(n, _ADD_TARGETS, "add") and shape is not None and len(shape) == 3:
            a, b = n.args[0], n.args[1]
            const = a if g.is_constant_tensor(a) else b if g.is_constant_tensor(b) else None
            data = b if const is a else a
            if const is not None and isinstance(data, fx.Node) and data in g.data:
                cshape = _shape(const)
                if len(cshape) >= 2 and cshape[-2] == shape[1] and result["pos"] is None:
                    result["pos"] = n
                    result["pos_order"].append("pos")
                    result["insert_after"] = result["insert_after"] or n
                    n = data
                    continue
        if g.is_per_token(n) or isinstance(_module(g.gm, n), TokenModule):
            n = g.data_inputs(n)[0]
            continue
        break
    if shape is None or len(shape) != 3:
        raise AnalysisError(f"could not find the patch tokens [B, P, C] before block 0 (stopped at {n.name!r})")
    result["patch_tokens"] = n
    result["insert_after"] = result["insert_after"] or n
    return result


def _patch_conv(g: _Graph, patch_tokens: fx.Node) -> tuple[list[int] | None, list[int] | None]:
    """(grid, patch size) of the convolution that embeds the patches, if there is one."""
    for n in sorted(g.ancestors[patch_tokens], key=g.order.__getitem__, reverse=True):
        mod = _module(g.gm, n)
        if isinstance(mod, _CONV_MODULES) or _is_call(n, _CONV_FUNCTIONS):
            out = _shape(n)
            if mod is not None:
                stride = list(mod.stride)
            else:
                s = _arg(n, 3, "stride", 1)
                stride = list(s) if isinstance(s, (tuple, list)) else [s, s]
            return ([out[2], out[3]] if out and len(out) == 4 else None), stride
    return None, None


def _walk_readout(g: _Graph, stream_end: fx.Node) -> tuple[list[fx.Node], Readout]:
    """Forward from the last residual add through per-token ops to the token-axis readout."""
    final_ops = []
    n = stream_end
    while True:
        users = [u for u in n.users if u in g.data]
        if len(users) == 1 and g.is_per_token(users[0]):
            n = users[0]
            final_ops.append(n)
            continue
        break
    tokens = _shape(n)[1]
    indices: list[int] = []
    means: list[tuple[int, int | None]] = []
    nodes: list[str] = []
    for u in [u for u in n.users if u in g.data]:
        if u.op == "call_function" and u.target is operator.getitem:
            idx = u.args[1]
            if isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None):
                if isinstance(idx[1], int):
                    indices.append(idx[1] % tokens)
                    nodes.append(u.name)
                    continue
                if isinstance(idx[1], slice) and idx[1].step in (None, 1):
                    reducers = [v for v in u.users if _is_token_mean(v)]
                    if reducers and len(reducers) == len(u.users):
                        means.append((idx[1].start or 0, idx[1].stop))
                        nodes += [u.name] + [v.name for v in reducers]
                        continue
        elif _is_token_mean(u):
            means.append((0, None))
            nodes.append(u.name)
            continue
        elif u.op == "call_method" and u.target == "select" and _arg(u, 0, "dim") == 1:
            indices.append(_arg(u, 1, "index") % tokens)
            nodes.append(u.name)
            continue
        raise AnalysisError(
            f"the readout at node {u.name!r} ({u.op} {getattr(u.target, '__name__', u.target)}) is not a token "
            "index or a mean over tokens: vitprune cannot tell which tokens it reads"
        )
    if indices and means or len(means) > 1:
        raise AnalysisError("the readout mixes token indices and token means; vitprune cannot analyse it")
    if means:
        start, stop = means[0]
        return final_ops, Readout("mean", mean_start=start, mean_stop=stop, nodes=nodes)
    if not indices:
        raise AnalysisError(f"nothing reads the token axis after node {n.name!r}")
    return final_ops, Readout("token", token_indices=sorted(set(indices)), nodes=nodes)


def _is_token_mean(node: fx.Node) -> bool:
    if not _is_call(node, {torch.mean}, "mean"):
        return False
    dim = _arg(node, 1, "dim")
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    rank = len(node.all_input_nodes and _shape(node.all_input_nodes[0]) or ())
    return isinstance(dim, int) and rank == 3 and dim % 3 == 1


def _token_indexed(g: _Graph, start: fx.Node, counts: set[int]) -> list[dict[str, Any]]:
    """Image-independent tensors with a token-sized axis, consumed after ``start``."""
    found = []
    for n in g.nodes:
        if n not in g.data or start not in g.ancestors[n]:
            continue
        for c in n.all_input_nodes:
            shape = _shape(c)
            if not g.is_constant_tensor(c) or shape is None or len(shape) < 2:
                continue
            if any(s in counts for s in shape[:-1]):
                found.append({"node": c.name, "shape": list(shape), "used_by": n.name})
    return found


def _describe_node(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", node.target)
    if node.target is operator.getitem and isinstance(node.args[1], tuple):
        parts = []
        for i in node.args[1]:
            if isinstance(i, slice):
                parts.append(f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}")
            else:
                parts.append(repr(i))
        return f"x[{', '.join(parts)}]"
    return f"{node.op} {target}"


def _indexes_past_prefix(g: _Graph, node: fx.Node, num_prefix: int) -> bool:
    """Whether ``node`` indexes the token axis (dim 1 of a ``[B, N, ...]`` stream tensor) beyond the
    prefix tokens: an int index or a partial slice that reads patch tokens by position."""
    source = node.args[0] if node.args else None
    shape = _shape(source)
    if shape is None or len(shape) < 3 or shape[0] != g.batch:
        return False
    n = shape[1]
    if _is_call(node, {operator.getitem}):
        idx = node.args[1]
        if not (isinstance(idx, tuple) and len(idx) >= 2 and idx[0] == slice(None)):
            return False
        sel = idx[1]
    elif _is_call(node, {torch.select}, "select") or _is_call(node, {torch.narrow}, "narrow"):
        if _arg(node, 1, "dim") not in (1, 1 - len(shape)):
            return False
        start = _arg(node, 2, "index" if node.target in ("select", torch.select) else "start")
        sel = start if node.target in ("select", torch.select) else slice(start, start + _arg(node, 3, "length"))
    else:
        return False
    if isinstance(sel, int):
        return not -n <= sel < num_prefix - n and not 0 <= sel < num_prefix
    if isinstance(sel, slice):
        if sel.step not in (None, 1) or not all(isinstance(v, (int, type(None))) for v in (sel.start, sel.stop)):
            return True
        start, stop, _ = sel.indices(n)
        return not (start, stop) == (0, n) and not stop <= num_prefix and not (start == num_prefix and stop == n)
    return True  # a tensor or list index on the token axis


def _stream_readers(g: _Graph, start: fx.Node, stream_end: fx.Node, readout_nodes: list[fx.Node],
                    blocks: list[AttentionBlock], num_prefix: int) -> list[dict[str, Any]]:
    """Readers of the token stream after ``start`` that a token pass cannot follow (see module doc)."""
    by_name = {n.name: n for n in g.nodes}
    after_readout = set(readout_nodes)
    for n in g.nodes:  # topological order: everything downstream of the readout
        if any(i in after_readout for i in n.all_input_nodes):
            after_readout.add(n)
    feeds_stream = g.ancestors[stream_end] | {stream_end}
    block_starts = [g.order[by_name[b.residual_adds[0]]] for b in blocks]

    def after_block(n: fx.Node) -> int:
        return sum(1 for o in block_starts if o < g.order[n]) - 1

    found = []
    for n in g.nodes:
        if n not in g.data or n in after_readout or n.op == "output" or start not in g.ancestors[n]:
            continue
        if not _is_tensor_valued(n):
            continue  # x.shape / x.size(): symbolic-trace graphs re-read shapes, so they follow the kept tokens
        if type(_module(g.gm, n)) in LEAF_MODULES.values():
            continue  # vitprune's own token ops (and their outputs below) follow the kept tokens
        if n.target is operator.getitem and type(_module(g.gm, n.args[0])) in LEAF_MODULES.values():
            continue
        if n in feeds_stream:
            if _indexes_past_prefix(g, n, num_prefix):
                found.append({"node": n.name, "op": _describe_node(n), "after_block": after_block(n),
                              "what": f"indexes the token axis by position inside block {after_block(n)}"})
            continue
        sources = [i for i in g.data_inputs(n) if i in feeds_stream]
        if not sources:
            continue  # downstream of another reader: that one is reported
        block = after_block(n)
        found.append({"node": n.name, "op": _describe_node(n), "after_block": block,
                      "what": f"reads the token stream ({sources[0].name!r}, after block {block}) outside "
                              "the blocks and the readout"})
    return found


def analyse(gm: fx.GraphModule, example_input: torch.Tensor) -> ViTGraph:
    """Describe the ViT that ``gm`` computes.

    Args:
        gm: a captured model (:func:`vitprune.capture.capture`).
        example_input: ``[B, C, H, W]`` image batch the model accepts (``B >= 2`` recommended so the
            batch axis is told apart from others); used for shape propagation in eval mode.

    Returns:
        The :class:`ViTGraph` description.

    Raises:
        AnalysisError: the graph is not a plain ViT (no attention, windowed attention, a readout or
            embedding vitprune cannot follow, ...); the message says why.
    """
    g = _Graph(gm, example_input)
    attn = _attention_ops(g)
    if not attn:
        raise AnalysisError(
            "no attention op (scaled_dot_product_attention, softmax over q·kᵀ or nn.MultiheadAttention) "
            "in the graph: not a ViT"
        )
    for node, kind in attn:
        batch, _, _, tokens = _attention_geometry(g, node, kind)
        if batch != g.batch:
            raise AnalysisError(
                f"attention {node.name!r} runs over {tokens} tokens with batch {batch} for an input batch of "
                f"{g.batch}: windowed attention (Swin-like), not a plain ViT token stream"
            )
    stream = _main_stream(g, _residual_adds(g))
    if not stream:
        raise AnalysisError("no residual stream of [B, N, C] tokens found: not a plain ViT")

    blocks: list[AttentionBlock] = []
    attn_by_node = dict(attn)
    placed: set[fx.Node] = set()
    for add, stream_in, branch_out in stream:
        branch = _branch_nodes(g, stream_in, branch_out)
        ops = [n for n in branch if n in attn_by_node]
        if len(ops) > 1:
            raise AnalysisError(f"residual branch ending at {add.name!r} holds {len(ops)} attention ops")
        if ops:
            node, kind = ops[0], attn_by_node[ops[0]]
            placed.add(node)
            _, heads, head_dim, tokens = _attention_geometry(g, node, kind)
            q = node.args[0] if kind == "sdpa" else None
            k = node.args[1] if kind == "sdpa" else None
            scale = None
            if kind == "sdpa":
                scale = node.kwargs.get("scale") or head_dim ** -0.5
            blocks.append(AttentionBlock(
                index=len(blocks), attention=kind, heads=heads, head_dim=head_dim, dim=_shape(add)[2],
                tokens=tokens, attention_node=node.name, query_node=q.name if q is not None else None,
                key_node=k.name if k is not None else None, residual_adds=[add.name], residual_branches=[branch_out.name],
                input_node=stream_in.name,
                attention_scale=scale, linear_flops_per_token=_linear_flops_per_token(g, branch),
            ))
        elif blocks:
            blocks[-1].residual_adds.append(add.name)
            blocks[-1].residual_branches.append(branch_out.name)
            blocks[-1].linear_flops_per_token += _linear_flops_per_token(g, branch)
        else:
            raise AnalysisError(f"residual add {add.name!r} comes before the first attention block")
    stray = [n.name for n, _ in attn if n not in placed]
    if stray:
        raise AnalysisError(f"attention op(s) {stray} are not on the residual stream: not a plain ViT")

    first_in = stream[0][1]
    emb = _walk_embedding(g, first_in)
    patch_tokens = emb["patch_tokens"]
    num_patches = _shape(patch_tokens)[1]
    num_prefix = emb["num_prefix"]
    if _shape(emb["insert_after"])[1] != num_prefix + num_patches:
        raise AnalysisError("the token count after the embedding does not equal prefix tokens + patches")
    grid, patch_size = _patch_conv(g, patch_tokens)
    if emb["pos"] is None:
        pos_embed = "none"
    elif emb["cat"] is None:
        pos_embed = "patch_tokens_only"  # no prefix tokens
    else:
        # walking back, the op met first is the later one in the forward pass
        pos_embed = "after_prefix_concat" if emb["pos_order"][0] == "pos" else "before_prefix_concat"

    final_ops, readout = _walk_readout(g, stream[-1][0])
    kinds = []
    read = readout.token_indices if readout.kind == "token" else []
    for i in range(num_prefix):
        if i in read:
            kinds.append("cls" if read.index(i) == 0 else "distillation")
        else:
            kinds.append("register")

    token_ops = []
    order_of = {n.name: g.order[n] for n in g.nodes}
    for n in g.nodes:
        mod = _module(gm, n)
        if isinstance(mod, TokenModule):
            before = sum(1 for b in blocks if order_of[b.residual_adds[0]] < g.order[n])
            token_ops.append({"node": n.name, "module": type(mod).__name__, "before_block": before,
                              "config": mod.config()})

    insert_after = emb["insert_after"]
    stream_end = final_ops[-1] if final_ops else stream[-1][0]
    readout_nodes = [n for n in g.nodes if n.name in set(readout.nodes)]
    readers = _stream_readers(g, insert_after, stream_end, readout_nodes, blocks, num_prefix)
    return ViTGraph(
        input_shape=list(example_input.shape),
        num_patches=num_patches,
        grid=grid,
        patch_size=patch_size,
        embed_dim=_shape(first_in)[2],
        num_prefix_tokens=num_prefix,
        prefix_tokens=kinds,
        pos_embed=pos_embed,
        patch_tokens_node=patch_tokens.name,
        prefix_concat_node=emb["cat"].name if emb["cat"] is not None else None,
        pos_embed_node=emb["pos"].name if emb["pos"] is not None else None,
        token_stream_start=insert_after.name,
        blocks=blocks,
        readout=readout,
        final_ops=[n.name for n in final_ops],
        token_indexed=_token_indexed(g, insert_after, {num_patches, num_prefix + num_patches}),
        token_ops=token_ops,
        stream_readers=readers,
    )
