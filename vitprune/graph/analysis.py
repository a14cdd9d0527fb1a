"""Analyse a captured graph into a description of the ViT it computes.

Everything here is found from ops and data flow on the neutral op graph
(:mod:`vitprune.graph.opgraph`, built by a frontend from a ``torch.fx`` or ``torch.export`` graph, with
shapes propagated from one example input); no class or attribute name of the model is read:

- **attention ops**: ``scaled_dot_product_attention`` calls, ``softmax`` over a ``[B, H, N, M]``
  score tensor (matmul attention), or an ``nn.MultiheadAttention`` leaf;
- **residual stream**: ``add(a, b)`` of two ``[B, N, C]`` image-dependent tensors where ``a`` is an
  ancestor of ``b`` (``b`` is the branch); consecutive residual adds form the stream;
- **attention blocks**: a residual add whose branch holds an attention op opens a block, the
  following branch-without-attention adds (the MLP) belong to it; a branch with several attentions none of
  which reads another's output is a parallel block (their outputs summed, ViT-22B / timm's
  ``ParallelThingsBlock``): one block, ``parallel`` listing the attentions after the first. A matmul
  attention's q, k and scale are read back from its softmax through ``q @ kᵀ · scale`` (BLIP's fused qkv);
- **embedding**: walking back from the first block's input through per-token ops: the position
  embedding add (an add of an image-independent tensor), the prefix-token concat (a ``cat`` on the
  token axis of image-independent tokens and the patch tokens), down to the patch tokens;
- **readout**: from the last residual add through per-token ops (final norm) to the ops that remove
  the token axis: a token index (``x[:, 0]``), a mean over a token range, attention pooling (an attention after
  the last block whose keys are the tokens and whose queries are not: SigLIP's MAP head); or, for a dense model, readers
  that take every token in place (the token sequence as an output, a grid reshape for a segmentation or
  depth head): kind ``"tokens"``, for which a pass puts dropped tokens back (:mod:`vitprune.passes.token_restore`);
- **token-indexed tensors**: image-independent tensors one of whose axes meets a token axis of the stream
  after the point where tokens can be dropped (relative position bias, RoPE tables), by data flow
  (:mod:`vitprune.graph.token_axes`), never by a size: a token pass must gather them;
- **other readers of the token stream**: every node after the drop point that reads the stream yet
  neither flows back into it (a block's branch, the chain between blocks) nor is the readout or after
  it: a second output that reads an intermediate block's tokens, a grid reshape for a dense head, a
  fixed token index (``x[:, 40]``). A pass that drops tokens restores every token in place before such a
  reader (``restorable``); token-axis indexing *inside* a block that reaches past the prefix tokens cannot be
  restored, so passes refuse it by name.

A graph that does not fit gets :class:`~vitprune.errors.AnalysisError` with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

from vitprune.errors import AnalysisError
from vitprune.frontends.fx import to_opgraph
from vitprune.graph.opgraph import OpGraph


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
    # a parallel block (several attention ops summed into one residual branch, timm's ParallelThingsBlock,
    # arXiv 2203.09795): the other attention ops, each {"attention_node", "query_node", "key_node", "heads",
    # "head_dim", "attention_scale"}; `attention_node` & co. describe the first. Empty for an ordinary block
    parallel: list[dict[str, Any]] = field(default_factory=list)

    @property
    def attentions(self) -> list[dict[str, Any]]:
        """Every attention op of the block (the first, then the parallel ones), as ``parallel`` lists them."""
        first = {"attention_node": self.attention_node, "query_node": self.query_node, "key_node": self.key_node,
                 "heads": self.heads, "head_dim": self.head_dim, "attention_scale": self.attention_scale}
        return [first, *self.parallel]

    @property
    def attention_heads(self) -> int:
        """Heads summed over the block's attention ops (``heads`` for an ordinary block): what its
        ``4 · heads · head_dim · N²`` attention FLOPs count."""
        return sum(a["heads"] for a in self.attentions)


@dataclass
class Readout:
    """How the head reads the token axis: one or more token indices, a mean over a range, or every token in place."""

    kind: str  # "token" | "mean" | "token+mean" (token indices and a mean) | "attention-pool" | "tokens" (dense)
    token_indices: list[int] = field(default_factory=list)
    mean_start: int | None = None  # mean over tokens [mean_start:mean_stop]
    mean_stop: int | None = None
    nodes: list[str] = field(default_factory=list)
    pool: str = "mean"  # the reduction over the token range: "mean" | "max" | "mean+max" (timm's avgmax)
    # FLOPs per token the readout spends on each token it reads (an attention pool's key/value projections
    # and attention; 0 for an index or a mean): the readout's share of what pruning saves
    flops_per_token: int = 0

    def describe(self, num_prefix_tokens: int) -> str:
        if self.kind == "tokens":
            return f"every token in place (dense: read by {', '.join(repr(n) for n in self.nodes[:3])})"
        if self.kind == "attention-pool":
            return "attention pooling over all tokens (a query that is not a token attends to every token)"
        tokens = "token " + ", ".join(f"x[:, {i}]" for i in self.token_indices)
        if self.kind == "token":
            return tokens
        if self.kind == "token+mean":
            return f"{tokens} and the " + Readout("mean", mean_start=self.mean_start, mean_stop=self.mean_stop,
                                                   pool=self.pool).describe(num_prefix_tokens)
        start = self.mean_start or 0
        what = "patch tokens" if start == num_prefix_tokens and start > 0 else "all tokens"
        if start not in (0, num_prefix_tokens):
            what = f"tokens [{start}:]"
        return f"{self.pool.replace('+', ' and ')} over {what}"


def plain_params(params: Any) -> str:
    """``{"keep_count": 32, "selection": "random"}`` as ``keep_count 32, selection random`` (nested dicts as
    ``{0: 12, 1: 12}`` -> ``0:12 1:12``), for the one-line summaries of ``inspect`` and ``rewrite``."""
    if not isinstance(params, dict):
        return str(params)

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return " ".join(f"{k}:{value(x)}" for k, x in v.items()) or "none"
        if isinstance(v, (list, tuple)):
            return ",".join(value(x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k} {value(v)}" for k, v in params.items() if v is not None)


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
    stream_readers: list[dict[str, Any]] = field(default_factory=list)  # readers outside the blocks and readout

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``vitprune inspect --json``)."""
        d = asdict(self)
        for b in d["blocks"]:
            if not b["parallel"]:
                del b["parallel"]  # ordinary blocks read as they always have
        if not d["readout"]["flops_per_token"]:
            del d["readout"]["flops_per_token"]  # so do readouts whose cost does not grow with the tokens
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
                + (f"  ({len(b.attentions)} parallel attentions)" if b.parallel else "")
            )
        for op in self.token_ops:
            lines.append(f"token op         {op['module']} before block {op['before_block']}: {plain_params(op['config'])}")
        for t in self.token_indexed:
            lines.append(f"token-indexed    {t['node']} {t['shape']} used by {t['used_by']}")
        for r in self.stream_readers:
            lines.append(f"other reader     {r['node']} ({r['op']}) {r['what']}")
        return "\n".join(lines)



# --------------------------------------------------------------------------------------------
# the analysis, on the op graph (node names are the frontend's)


def _attention_ops(g: OpGraph) -> list[tuple[str, str]]:
    ops = []
    for n in g.nodes:
        kind = g.kind(n)
        if kind == "sdpa":
            ops.append((n, "sdpa"))
        elif kind == "softmax" and g.is_data(n):
            shape = g.shape(n)
            if shape is not None and len(shape) == 4:
                ops.append((n, "matmul-softmax"))
        elif kind == "mha":
            ops.append((n, "multihead-module"))
    return ops


def attention_tokens(g: OpGraph) -> list[tuple[str, int]]:
    """``(node, query tokens)`` of every attention op of ``g`` in graph order (the ops :func:`analyse_opgraph`
    reads as blocks), for a graph the analysis cannot take whole: one vitprune already rewrote."""
    return [(n, _attention_geometry(g, n, kind)[3]) for n, kind in _attention_ops(g)]


def _folded_attention_reason(g: OpGraph) -> str | None:
    """Why a graph with softmax-over-``q·kᵀ`` attention in another layout is not a plain ViT, or None.

    Attention vitprune reads has ``[B, H, N, M]`` scores on a ``[B, N, C]`` stream. Scores ``[B·k, N, M]``
    (a rank-3 softmax over a matmul, the batch folded with the heads or with windows and heads) over a stream
    that is a ``[B, h, w, C]`` token grid is windowed or grid attention (VitDet, arXiv 2203.16527): windows
    partition the grid, so no token can be dropped from one without reshaping every window."""
    for n in g.named("softmax"):
        scores = g.shape(n)
        src = g.inputs(n)[0] if g.inputs(n) else None
        if not g.is_data(n) or scores is None or len(scores) != 3 or g.kind(src) != "matmul":
            continue
        if scores[0] % g.batch or scores[0] == g.batch:
            continue
        grids = [a for a in g.named("add") if g.is_data(a) and len(g.shape(a) or ()) == 4
                 and g.shape(a)[0] == g.batch and all(g.is_data(i) for i in g.inputs(a)[:2] if i is not None)]
        grid = g.shape(grids[0]) if grids else None
        where = ""
        if grid is not None:
            tokens = grid[1] * grid[2]
            what = (f"windows of {scores[2]} of the {tokens} tokens of the {grid[1]}x{grid[2]} token grid: windowed "
                    "attention" if scores[2] < tokens else f"all {tokens} tokens of the {grid[1]}x{grid[2]} token grid")
            where = (f", over {what}, and the residual stream ({grids[0]!r}) is a [B, h, w, C] grid, not [B, N, C] "
                     "tokens")
        return (f"softmax {n!r} runs over q·kᵀ scores {list(scores)} whose first axis folds the batch of {g.batch} "
                f"with heads or windows{where}: windowed / grid attention, not a plain ViT (vitprune reads "
                "attention as [B, H, N, M] scores on a [B, N, C] token stream)")
    return None


def _class_attention_reason(g: OpGraph, n: str, kind: str, stream_end: str) -> str | None:
    """Why attention op ``n`` after the last block is class attention (CaiT, arXiv 2103.17239 §3.2), or None:
    its queries are a few tokens (the class tokens) and its keys the stream's tokens concatenated with them, and
    what it computes is a separate residual stream of those few tokens."""
    if n not in g.descendants(stream_end):
        return None
    if kind == "sdpa":
        q, k = (g.shape(i) for i in g.inputs(n)[:2])
    else:
        q = k = g.shape(n)
        q, k = (q[:3], q[:2] + q[3:]) if q and len(q) == 4 else (None, None)
    tokens = g.shape(stream_end)[1]
    if not q or not k or len(q) != 4 or q[2] >= k[2] or k[2] <= tokens:
        return None
    joined = [c for c in g.ancestors(n) & g.descendants(stream_end) if g.kind(c) == "cat" and g.attrs(c)["dim"] == 1]
    if not joined:
        return None
    return (f"attention {n!r} after the last block is class attention: its queries are {q[2]} token(s) that are not "
            f"on the residual stream (a class token), its keys the {tokens} tokens concatenated with them at "
            f"{sorted(joined, key=g.order)[0]!r} ({k[2]} in all): class-attention blocks (CaiT) are not a plain ViT "
            "readout vitprune can follow")


def _attention_geometry(g: OpGraph, node: str, kind: str) -> tuple[int, int, int | None, int]:
    """(batch, heads, head_dim, query tokens) of an attention op."""
    if kind == "sdpa":
        q = g.shape(g.inputs(node)[0])
        if q is None or len(q) != 4:
            raise AnalysisError(f"attention {node!r} has a query of shape {q}; expected [B, H, N, d]")
        return q[0], q[1], q[3], q[2]
    if kind == "matmul-softmax":
        s = g.shape(node)
        return s[0], s[1], None, s[2]
    a = g.attrs(node)
    q = g.shape(g.inputs(node)[0])
    if a["batch_first"]:
        return q[0], a["heads"], a["head_dim"], q[1]
    return q[1], a["heads"], a["head_dim"], q[0]


def _residual_adds(g: OpGraph) -> list[tuple[str, str, str]]:
    """(add, stream input, branch output) for every residual add on a [B, N, C] stream."""
    found = []
    for n in g.named("add"):
        ins = g.inputs(n)
        if not g.is_data(n) or len(ins) < 2:
            continue
        a, b = ins[0], ins[1]
        if a is None or b is None or not (g.is_data(a) and g.is_data(b)):
            continue
        sa, sb = g.shape(a), g.shape(b)
        if sa is None or sa != sb or len(sa) != 3 or sa[0] != g.batch:
            continue
        if nx.has_path(g.g, a, b):
            found.append((n, a, b))
        elif nx.has_path(g.g, b, a):
            found.append((n, b, a))
    return found


def _main_stream(g: OpGraph, adds: list[tuple[str, str, str]]):
    """The longest chain of residual adds, each feeding the next through per-token/token ops."""
    by_node = {a[0]: a for a in adds}

    def root(n: str) -> str:
        # back from a stream input through single-data-input ops (norms, dropout, vitprune token ops)
        while n not in by_node:
            if g.kind(n) == "token_op" and g.attrs(n)["changes_tokens"]:
                n = g.inputs(n)[0]
                continue
            ins = g.data_inputs(n)
            if len(ins) != 1 or g.shape(n) is None or len(g.shape(n)) != 3:
                return n
            n = ins[0]
        return n

    prev = {a[0]: root(a[1]) for a in adds}
    chains: dict[str, list] = {}
    for add in adds:  # topological order
        p = prev[add[0]]
        chains[add[0]] = chains[p] + [add] if p in chains else [add]
    if not chains:
        return []
    return max(chains.values(), key=len)


def _branch_nodes(g: OpGraph, stream_in: str, branch_out: str) -> set[str]:
    """The residual branch: what ``branch_out`` depends on that depends on ``stream_in``."""
    return (g.ancestors(branch_out) | {branch_out}) & g.descendants(stream_in)


def _linear_flops_per_token(g: OpGraph, branch: set[str]) -> int:
    """2 · in · out summed over the linear layers of a residual branch (FLOPs per token)."""
    total = 0
    for n in branch:
        a = g.attrs(n)
        if g.kind(n) == "linear" and a:
            total += 2 * a["in_features"] * a["out_features"]
        elif g.kind(n) == "mha":
            # the projections inside the op: q, k, v and out (nn.MultiheadAttention), q, k, v (ONNX Runtime's
            # fused Attention, its out-projection a MatMul of its own) or none (MultiHeadAttention)
            total += 2 * a.get("projections", 4) * a["embed_dim"] * a["embed_dim"]
    return total


def _walk_embedding(g: OpGraph, start: str) -> dict[str, Any]:
    """Back from the first block's input to the patch tokens, through pos-add and prefix concat."""
    n = start
    result: dict[str, Any] = {"cat": None, "pos": None, "insert_after": None, "num_prefix": 0, "pos_order": []}
    resplice = None  # a concat that re-splices an earlier one's tokens: (its source, how many prefix tokens)
    while True:
        shape = g.shape(n)
        if g.kind(n) == "cat" and shape is not None and len(shape) == 3:
            if g.attrs(n)["dim"] != 1:
                raise AnalysisError(f"concat {n!r} before block 0 is not on the token axis")
            tensors = g.inputs(n)
            patches = _patch_operand(g, n)
            pos = tensors.index(patches)
            if pos != len(tensors) - 1:
                after = tensors[pos + 1:]
                raise AnalysisError(
                    f"concat {n!r} puts {sum(g.shape(t)[1] for t in after)} token(s) after the patch tokens (suffix "
                    f"tokens, from {', '.join(repr(t) for t in after)}; detection tokens in YOLOS): vitprune keeps "
                    "prefix tokens before the patches and cannot yet keep tokens at the other end")
            prefix = sum(g.shape(t)[1] for t in tensors[:pos])
            if resplice is not None and resplice == (n, prefix):
                pass  # the earlier concat whose prefix tokens the later one took apart and put back
            elif result["cat"] is not None:
                raise AnalysisError(f"two token concats before block 0 ({result['cat']!r}, {n!r})")
            else:
                result["cat"] = n
                result["num_prefix"] = prefix
                result["pos_order"].append("cat")
                result["insert_after"] = result["insert_after"] or n
            n = patches
            # Hugging Face DINOv2 with registers: cat([x[:, :1], registers, x[:, 1:]]) splits the CLS token off
            # an earlier cat([cls, patches]) (+ position embedding) and puts it back first: walk on through it
            sel = _token_axis_index(g, n)
            source = g.inputs(n)[0] if isinstance(sel, slice) else None
            if (source is not None and sel.step in (None, 1) and sel.stop is None and (sel.start or 0) > 0
                    and any(g.inputs(t) and g.inputs(t)[0] == source for t in tensors[:pos] if g.kind(t) == "index")):
                upstream = source
                while g.kind(upstream) != "cat" and (g.is_per_token(upstream) or g.kind(upstream) == "add"):
                    upstream = g.data_inputs(upstream)[0]
                resplice = (upstream, sel.start)
                n = source
            continue
        if g.kind(n) == "add" and shape is not None and len(shape) == 3:
            a, b = (g.inputs(n) + [None, None])[:2]
            const = a if g.is_constant_tensor(a) else b if g.is_constant_tensor(b) else None
            data = b if const is a else a
            if const is not None and g.is_data(data):
                cshape = g.shape(const)
                if len(cshape) >= 2 and cshape[-2] == shape[1] and result["pos"] is None:
                    result["pos"] = n
                    result["pos_order"].append("pos")
                    result["insert_after"] = result["insert_after"] or n
                    n = data
                    continue
        if g.is_per_token(n) or g.kind(n) == "token_op" and g.attrs(n)["changes_tokens"]:
            n = g.data_inputs(n)[0]
            continue
        break
    if shape is None or len(shape) != 3:
        raise AnalysisError(f"could not find the patch tokens [B, P, C] before block 0 (stopped at {n!r})")
    result["patch_tokens"] = n
    result["insert_after"] = result["insert_after"] or n
    return result


def _fixed_token_part(g: OpGraph, n: str) -> bool:
    """Whether ``n`` takes a fixed part of a token axis (``x[:, :1]``, ``x[:, 0:k]``, ``x[:, -k:]``, ``x[:, 3]``):
    its size does not follow the token count, as :mod:`vitprune.graph.token_axes` reads a slice."""
    sel = _token_axis_index(g, n)
    source = g.inputs(n)[0] if sel is not None else None
    if sel is None or g.shape(source) is None:
        return False
    if isinstance(sel, int):
        return True
    start, stop, step = sel.indices(g.shape(source)[1])
    return step != 1 or (sel.start or 0) < 0 or stop < g.shape(source)[1]


def _patch_operand(g: OpGraph, cat: str) -> str:
    """The patch-token operand of the prefix concat, by data flow: the one image-dependent operand whose token
    axis follows the patch count. Every other operand is a prefix token block: an image-independent tensor (a
    learned CLS token, registers) or a fixed part of the image-dependent tokens (``x[:, :1]``, the CLS token
    split off an earlier concat), in any number and order.

    Raises:
        AnalysisError: no such operand, or more than one (the message names the concat).
    """
    data = [t for t in g.inputs(cat) if g.is_data(t) and not _fixed_token_part(g, t)]
    if len(data) != 1:
        raise AnalysisError(
            f"concat {cat!r} before block 0 joins {len(data)} image-dependent token inputs that follow the patch "
            "count; expected prefix tokens (learned, or a fixed part x[:, :k] of the tokens) and one patch-token tensor"
        )
    return data[0]


def _prefix_kinds(g: OpGraph, cat: str | None, num_prefix: int, readout: Readout) -> list[str]:
    """Per prefix token: ``"cls"``, ``"distillation"`` or ``"register"``, by data flow.

    - When the readout reads prefix tokens by index (``x[:, 0]``, DeiT's ``(x[:, 0] + x[:, 1]) / 2``), the first
      one it reads is the CLS token, the others it reads distillation tokens, the unread ones registers (timm's
      DINOv2 with registers: ``x[:, 0]`` read, 4 register tokens not).
    - When it reads none (a dense readout, a mean over patch tokens), which token a training head read is not in
      the graph; the prefix concat is: a CLS token is concatenated first as a learned token of its own
      (``[1, 1, C]``, expanded over the batch: ViT, DeiT, DINOv2 in timm and Hugging Face; or ``x[:, :1]`` split
      off an earlier concat, Hugging Face DINOv2 with registers), registers come as one block of learned tokens
      (``[1, R, C]``). So the first prefix token is ``cls`` when it is an operand of its
      own of the concat, every other unread token a register (a distillation token nothing reads cannot be told
      from a register, and holds none of the readout's information either).
    """
    read = readout.token_indices if readout.kind in ("token", "token+mean") else []
    kinds = []
    for i in range(num_prefix):
        if i in read:
            kinds.append("cls" if read.index(i) == 0 else "distillation")
        else:
            kinds.append("register")
    if cat is not None and num_prefix and not any(i < num_prefix for i in read):
        first = g.inputs(cat)[0]
        own = first is not None and (not g.is_data(first) or _fixed_token_part(g, first))  # x[:, :1]: re-spliced
        if own and (g.shape(first) or (0, 0))[1] == 1:
            kinds[0] = "cls"
    return kinds


def _patch_conv(g: OpGraph, patch_tokens: str) -> tuple[list[int] | None, list[int] | None]:
    """(grid, patch size) of the convolution that embeds the patches, if there is one."""
    for n in sorted(g.ancestors(patch_tokens), key=g.order, reverse=True):
        if g.kind(n) == "conv":
            out = g.shape(n)
            return ([out[2], out[3]] if out and len(out) == 4 else None), g.attrs(n)["stride"]
    return None, None


def _token_axis_index(g: OpGraph, n: str) -> int | slice | None:
    """What an index op takes on the token axis of a ``[B, N, C]`` tensor (only that axis), else None."""
    a = g.attrs(n)
    if g.kind(n) != "index" or a.get("opaque") or a["tensor_axes"] or set(a["axes"]) != {1}:
        return None
    return a["axes"][1]


def _attention_pools(g: OpGraph, ops: list[tuple[str, str]], stream_end: str) -> set[str]:
    """Attention ops (``(node, kind)`` as :func:`_attention_ops` gives them) after the last block whose keys
    are the tokens and whose queries are not: attention pooling (SigLIP's MAP head, a learned latent query;
    CaiT's class attention), fused (SDPA) or not (softmax over q·kᵀ, scores ``[B, H, Nq, Nk]``). Over its
    keys and values an attention is permutation-invariant, so it pools whatever tokens are kept, as a mean
    pool does."""
    pools = set()
    after = g.descendants(stream_end)
    tokens = g.shape(stream_end)[1]
    for n, kind in ops:
        if n not in after:
            continue
        # the queries are not the tokens: fewer or more of them, or not computed from the stream at all (a learned
        # latent query, whatever its length: a rewrite that keeps one token leaves one key for SigLIP's one query)
        if kind == "sdpa":
            q_node = g.inputs(n)[0]
            q, k = (g.shape(i) for i in g.inputs(n)[:2])
            if q and k and len(q) == len(k) == 4 and k[2] == tokens and (q[2] != tokens or not g.is_data(q_node)):
                pools.add(n)
        elif kind == "matmul-softmax":
            scores, q_node = g.shape(n), _matmul_query_key(g, n)[0]
            if scores[3] == tokens and (scores[2] != tokens or q_node is not None and not g.is_data(q_node)):
                pools.add(n)
    return pools


def _walk_readout(g: OpGraph, stream_end: str, pools: set[str] = frozenset()) -> tuple[list[str], Readout]:
    """Forward from the last residual add through per-token ops to the token-axis readout (``pools``: the
    attention-pool ops of :func:`_attention_pools`, which read every kept token as a mean pool does)."""
    final_ops = []
    n = stream_end
    while True:
        users = [u for u in g.users(n) if g.is_data(u)]
        if len(users) == 1 and g.is_per_token(users[0]) and g.kind(users[0]) != "output":
            n = users[0]
            final_ops.append(n)
            continue
        break
    tokens = g.shape(n)[1]
    indices: list[int] = []
    means: list[tuple[int, int | None]] = []
    nodes: list[str] = []
    dense: list[str] = []
    pooled: list[str] = []
    kinds: set[str] = set()  # reductions over the token range: mean, max
    for u in [u for u in g.users(n) if g.is_data(u) or g.kind(u) == "output"]:
        sel = _token_axis_index(g, u)
        if isinstance(sel, int):
            indices.append(sel % tokens)
            nodes.append(u)
            continue
        if isinstance(sel, slice) and sel.step in (None, 1):
            reducers = [v for v in g.users(u) if _is_token_pool(g, v)]
            if reducers and len(reducers) == len(g.users(u)):
                means.append((sel.start or 0, sel.stop))
                kinds.update(g.kind(v) for v in reducers)
                nodes += [u] + reducers
                continue
        elif _is_token_pool(g, u):
            means.append((0, None))
            kinds.add(g.kind(u))
            nodes.append(u)
            continue
        if any(u == p or u in g.ancestors(p) for p in pools):
            pooled.append(u)  # keys and values of an attention pool
            continue
        dense.append(u)  # reads the tokens by position: a grid reshape, a token-sequence output, ...
    if dense:
        return final_ops, Readout("tokens", nodes=dense + nodes + pooled)
    if pooled:
        if indices or means:
            raise AnalysisError(f"the readout pools tokens by attention (node {pooled[0]!r}) and also reads them "
                                "otherwise: vitprune cannot analyse it")
        return final_ops, Readout("attention-pool", nodes=pooled)
    if len(set(means)) > 1:
        raise AnalysisError("the readout pools more than one token range; vitprune cannot analyse it")
    pool = "+".join(sorted(kinds))
    if indices and means:  # CLS concatenated with the patch mean (DINOv2's linear head)
        start, stop = means[0]
        return final_ops, Readout("token+mean", token_indices=sorted(set(indices)), mean_start=start,
                                  mean_stop=stop, nodes=nodes, pool=pool)
    if means:
        start, stop = means[0]
        return final_ops, Readout("mean", mean_start=start, mean_stop=stop, nodes=nodes, pool=pool)
    if not indices:
        raise AnalysisError(f"nothing reads the token axis after node {n!r}")  # e.g. only shapes are read
    return final_ops, Readout("token", token_indices=sorted(set(indices)), nodes=nodes)


def _is_token_pool(g: OpGraph, n: str) -> bool:
    """A mean or max over the token axis of a ``[B, N, C]`` tensor."""
    if g.kind(n) not in ("mean", "max"):
        return False
    source = g.inputs(n)[0] if g.inputs(n) else None
    rank = len(g.shape(source) or ())
    return rank == 3 and g.attrs(n)["dims"] == (1,)


def _token_indexed(g: OpGraph, seeds: list[str], stop: list[str], num_prefix: int,
                   num_patches: int) -> list[dict[str, Any]]:
    """Image-independent tensors read against a token axis after the token-stream start (RoPE sin/cos tables,
    relative-position biases, position embeddings added late), found by data flow
    (:mod:`vitprune.graph.token_axes`: token axes propagated from the residual stream ``seeds``, not entering
    ``stop``, the readout and the readers whose tokens a pass restores). A tensor is token-indexed only where one
    of its axes meets a token axis: broadcast in an element-wise op, the rows/columns of attention scores (an
    SDPA mask), the contracted axis of a matmul. A layer's own weights never are, whatever their sizes.

    Each entry: ``node`` (the tensor), ``shape``, ``used_by`` (the op where it meets image data), ``rank`` (that
    op's image-dependent operand's rank: the tensor broadcasts against it, aligned right) and ``token_axes``: per
    token axis of the tensor, aligned to ``rank``, whether it indexes every token (prefix tokens first) or the
    patch tokens only; a table whose axis 0 meets the operand's batch axis with size ``B`` (per-image RoPE
    ``[B, N, 1, d]``, a bias plus a batch mask ``[B, H, N, N]``) is gathered per image like one of size 1.
    ``token_axes`` is empty when it cannot be gathered per image: a token-first tensor, or one read where the token axes are unknown (an op :mod:`~vitprune.graph.token_axes` cannot
    follow, then the tensor is reported when one of its axes has a token count: a pass refuses it by name).
    """
    from vitprune.graph.token_axes import LAYERS, constant_token_axes, propagate

    axes, unknown = propagate(g, seeds, stop)
    counts = {num_patches, num_prefix + num_patches}
    found = []
    for n in g.nodes:
        ins = g.data_inputs(n)
        if g.kind(n) in LAYERS or not any(i in axes or i in unknown for i in ins):
            continue
        for c in g.g.predecessors(n):
            shape = g.shape(c)
            if not g.is_constant_tensor(c) or shape is None or not shape:
                continue
            rank = max([len(g.shape(i) or ()) for i in ins] + [len(shape)])
            pad = rank - len(shape)
            if any(i in unknown for i in ins):
                hit = [a for a in range(len(shape)) if shape[a] in counts]
                if hit and g.kind(n) not in ("index", "reshape", "permute", "output"):
                    found.append({"node": c, "shape": list(shape), "used_by": n, "rank": rank, "token_axes": [],
                                  "unknown_at": unknown[next(i for i in ins if i in unknown)]})
                continue
            hit = constant_token_axes(g, n, c, axes)
            if not hit:
                continue
            token_axes = [{"axis": pad + a, "with_prefix": shape[a] != num_patches} for a in hit]
            if pad == 0 and shape[0] not in (1, g.batch) or any(t["axis"] == 0 for t in token_axes):
                token_axes = []  # a token-first tensor, or one whose first axis is not the batch: not gatherable
            found.append({"node": c, "shape": list(shape), "used_by": n, "rank": rank, "token_axes": token_axes})
    return found


def _describe_node(g: OpGraph, n: str) -> str:
    a = g.attrs(n)
    if g.kind(n) == "index" and not a.get("opaque") and not a["tensor_axes"]:
        rank = max([*a["axes"], 0]) + 1
        parts = [":"] * rank
        for axis, i in a["axes"].items():
            parts[axis] = (f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}"
                           if isinstance(i, slice) else repr(i))
        return f"x[{', '.join(parts)}]"
    return g.label(n)


def _indexes_past_prefix(g: OpGraph, n: str, num_prefix: int) -> bool:
    """Whether ``n`` indexes the token axis (dim 1 of a ``[B, N, ...]`` stream tensor) beyond the prefix
    tokens: an int index or a partial slice that reads patch tokens by position."""
    if g.kind(n) != "index":
        return False
    source = g.inputs(n)[0] if g.inputs(n) else None
    shape = g.shape(source)
    if shape is None or len(shape) < 3 or shape[0] != g.batch:
        return False
    a = g.attrs(n)
    if a.get("opaque") or 0 in a["axes"] or 0 in a["tensor_axes"]:
        return False  # not the token axis of a batch tensor (e.g. q, k, v = qkv[0], qkv[1], qkv[2])
    if 1 in a["tensor_axes"]:
        return True  # a tensor or list index on the token axis: which tokens it reads is not known
    if 1 not in a["axes"]:
        return False
    sel, tokens = a["axes"][1], shape[1]
    if isinstance(sel, int):
        return not -tokens <= sel < num_prefix - tokens and not 0 <= sel < num_prefix
    if sel.step not in (None, 1):
        return True
    start, stop, _ = sel.indices(tokens)
    return not (start, stop) == (0, tokens) and not stop <= num_prefix and not (start == num_prefix and stop == tokens)


def _stream_readers(g: OpGraph, start: str, stream_end: str, readout_nodes: list[str],
                    blocks: list[AttentionBlock], num_prefix: int) -> list[dict[str, Any]]:
    """Readers of the token stream after ``start`` that a token pass cannot follow (see module doc)."""
    after_readout = set(readout_nodes)
    for r in readout_nodes:
        after_readout |= g.descendants(r)
    feeds_stream = g.ancestors(stream_end) | {stream_end}
    after_start = g.descendants(start)
    block_starts = [g.order(b.residual_adds[0]) for b in blocks]
    # the residual stream's own values: a restored copy of one of them is exact (the canvas holds them)
    residual = {a for b in blocks for a in b.residual_adds} | {b.input_node for b in blocks}

    def after_block(n: str) -> int:
        return sum(1 for o in block_starts if o < g.order(n)) - 1

    def is_token_op(n: str) -> bool:
        return g.kind(n) == "token_op"

    found = []
    for n in g.nodes:
        if not g.is_data(n) or n in after_readout or g.kind(n) == "output" or n not in after_start:
            continue
        if not g.is_tensor(n):
            continue  # x.shape / x.size(): symbolic-trace graphs re-read shapes, so they follow the kept tokens
        if is_token_op(n):
            continue  # vitprune's own token ops (and their outputs below) follow the kept tokens
        if g.kind(n) == "index" and g.inputs(n) and g.inputs(n)[0] and is_token_op(g.inputs(n)[0]):
            continue
        if n in feeds_stream:
            if _indexes_past_prefix(g, n, num_prefix):
                found.append({"node": n, "op": _describe_node(g, n), "after_block": after_block(n),
                              "source": g.data_inputs(n)[0], "restorable": False,
                              "what": f"indexes the token axis by position inside block {after_block(n)}"})
            continue
        sources = [i for i in g.data_inputs(n) if i in feeds_stream]
        if not sources:
            continue  # downstream of another reader: that one is reported
        block = after_block(n)
        if sources[0] not in residual:  # e.g. a block's own norm, shared with a head (an exporter merged them)
            found.append({"node": n, "op": _describe_node(g, n), "after_block": block, "source": sources[0],
                          "restorable": False,
                          "what": f"reads {sources[0]!r}, an op inside block {block + 1} (not the residual stream)"})
            continue
        found.append({"node": n, "op": _describe_node(g, n), "after_block": block, "source": sources[0],
                      "restorable": True,
                      "what": f"reads the token stream ({sources[0]!r}, after block {block}) outside "
                              "the blocks and the readout"})
    return found


def _pool_flops_per_token(g: OpGraph, stream_end: str, pools: set[str]) -> int:
    """FLOPs an attention-pool readout spends per token it reads: the linear layers between the stream and the
    pool (its key and value projections, ``2 · in · out``) and the pool's attention (``4 · heads · d · Nq`` for
    ``Nq`` queries: ``q·kᵀ`` and ``attn·v``, as the FLOPs counter counts SDPA). Whatever does not read the
    tokens (the queries, the pool's output MLP) is a fixed cost."""
    total, after = 0, g.descendants(stream_end)
    for pool in pools:
        per_token = {n for n in g.ancestors(pool) & after  # linear layers computed from the tokens (not the queries)
                     if g.kind(n) == "linear" and g.is_data(n)}
        total += _linear_flops_per_token(g, per_token)
        if g.kind(pool) == "sdpa":
            q = g.shape(g.inputs(pool)[0])
            total += 4 * q[1] * q[3] * q[2]
    return total


def _attention_fields(g: OpGraph, node: str, kind: str) -> dict[str, Any]:
    """An attention op's ``attention_node``, ``query_node``, ``key_node`` (sdpa: its q and k inputs), ``heads``,
    ``head_dim``, ``attention_scale`` and ``tokens`` (the queries' token count)."""
    _, heads, head_dim, tokens = _attention_geometry(g, node, kind)
    if kind == "sdpa":
        q, k, scale = g.inputs(node)[0], g.inputs(node)[1], g.attrs(node)["scale"] or head_dim ** -0.5
    elif kind == "matmul-softmax":
        q, k, scale = _matmul_query_key(g, node)
        head_dim = g.shape(q)[-1] if q is not None else None
    else:
        q = k = scale = None
    return {"attention_node": node, "query_node": q, "key_node": k, "heads": heads, "head_dim": head_dim,
            "attention_scale": scale, "tokens": tokens}


def _matmul_query_key(g: OpGraph, softmax: str) -> tuple[str | None, str | None, float | None]:
    """``(q, k, scale)`` of a matmul attention, by data flow back from its softmax: scores ``q @ kᵀ`` (``q
    [B, H, N, d]``, ``kᵀ`` a transpose of the last two axes of ``k [B, H, M, d]``), multiplied by Python
    numbers on the way (the scale; 1 when q was scaled before the matmul); BLIP's fused qkv, timm's
    ``fused_attn=False``. ``(None, None, None)`` when the chain has anything else (an additive mask, a scale
    computed from a tensor): the map itself is still there for the passes that read it."""
    n, scale = g.inputs(softmax)[0], 1.0
    while n is not None and g.kind(n) == "mul" and "scalar" in g.attrs(n) and len(g.data_inputs(n)) == 1:
        scale *= g.attrs(n)["scalar"]
        n = g.data_inputs(n)[0]
    if n is None or g.kind(n) != "matmul":
        return None, None, None
    q, kt = (g.inputs(n) + [None, None])[:2]
    if kt is None or g.kind(kt) != "permute" or g.shape(q) is None or len(g.shape(q)) != 4:
        return None, None, None
    perm = g.attrs(kt).get("perm")
    if perm != [0, 1, 3, 2] or len(g.data_inputs(kt)) != 1:
        return None, None, None
    return q, g.data_inputs(kt)[0], scale


def _check_parallel(g: OpGraph, add: str, stream_in: str, ops: list[str]) -> None:
    """Several attention ops in one residual branch are a parallel block (timm's ParallelThingsBlock: the
    branches' outputs summed, ``x + attn_1(x) + attn_2(x)``) when none of them reads another's output: each
    attends over the stream's tokens on its own, so a token op before the block serves them all. An attention
    that reads another's output (two attentions in sequence inside one branch) is refused."""
    for i, a in enumerate(ops):
        for b in ops[i + 1:]:
            if b in g.descendants(a):
                raise AnalysisError(f"residual branch ending at {add!r} holds attention {b!r} computed from attention "
                                    f"{a!r}: two attentions in sequence in one branch, not a ViT block")
    tokens = g.shape(stream_in)[1]
    for n in ops:
        if g.shape(n) is not None and len(g.shape(n)) == 4 and g.shape(n)[2] != tokens:
            raise AnalysisError(f"attention {n!r} in the residual branch ending at {add!r} attends over "
                                f"{g.shape(n)[2]} queries, not the stream's {tokens} tokens")


def analyse(gm: fx.GraphModule, example_input: torch.Tensor) -> ViTGraph:
    """Describe the ViT that ``gm`` computes.

    Args:
        gm: a captured model (:func:`vitprune.frontends.capture.capture`: symbolic trace or ``torch.export``).
        example_input: ``[B, C, H, W]`` image batch the model accepts (``B >= 2`` recommended so the
            batch axis is told apart from others); used for shape propagation in eval mode.

    Returns:
        The :class:`ViTGraph` description.

    Raises:
        AnalysisError: the graph is not a plain ViT (no attention, windowed attention, a readout or
            embedding vitprune cannot follow, ...); the message says why.
    """
    return analyse_opgraph(to_opgraph(gm, example_input), list(example_input.shape))


def analyse_opgraph(g: OpGraph, input_shape: list[int]) -> ViTGraph:
    """:func:`analyse` on a frontend's op graph (``input_shape``: the example input's ``[B, C, H, W]``)."""
    attn = _attention_ops(g)
    if not attn:
        raise AnalysisError(_folded_attention_reason(g) or
                            "no attention op (scaled_dot_product_attention, softmax over q·kᵀ or nn.MultiheadAttention) "
                            "in the graph: not a ViT")
    for node, kind in attn:
        batch, _, _, tokens = _attention_geometry(g, node, kind)
        if batch != g.batch:
            raise AnalysisError(
                f"attention {node!r} runs over {tokens} tokens with batch {batch} for an input batch of "
                f"{g.batch}: windowed attention (Swin-like), not a plain ViT token stream"
            )
    stream = _main_stream(g, _residual_adds(g))
    if not stream:
        raise AnalysisError("no residual stream of [B, N, C] tokens found: not a plain ViT")

    blocks: list[AttentionBlock] = []
    attn_by_node = dict(attn)
    placed: set[str] = set()
    for add, stream_in, branch_out in stream:
        branch = _branch_nodes(g, stream_in, branch_out)
        ops = sorted((n for n in branch if n in attn_by_node), key=g.order)
        if len(ops) > 1:
            _check_parallel(g, add, stream_in, ops)
        if ops:
            found = [_attention_fields(g, node, attn_by_node[node]) for node in ops]
            placed.update(ops)
            first = found[0]
            blocks.append(AttentionBlock(
                index=len(blocks), attention=attn_by_node[ops[0]], heads=first["heads"], head_dim=first["head_dim"],
                dim=g.shape(add)[2], tokens=first.pop("tokens"), attention_node=first["attention_node"],
                query_node=first["query_node"], key_node=first["key_node"], residual_adds=[add],
                residual_branches=[branch_out], input_node=stream_in, attention_scale=first["attention_scale"],
                linear_flops_per_token=_linear_flops_per_token(g, branch),
                parallel=[{k: v for k, v in f.items() if k != "tokens"} for f in found[1:]],
            ))
        elif blocks:
            blocks[-1].residual_adds.append(add)
            blocks[-1].residual_branches.append(branch_out)
            blocks[-1].linear_flops_per_token += _linear_flops_per_token(g, branch)
        else:
            raise AnalysisError(f"residual add {add!r} comes before the first attention block")
    pools = _attention_pools(g, [(n, k) for n, k in attn if n not in placed], stream[-1][0])
    stray = [n for n, _ in attn if n not in placed and n not in pools]
    for n in stray:
        reason = _class_attention_reason(g, n, dict(attn)[n], stream[-1][0])
        if reason:
            raise AnalysisError(reason)
    if stray:
        raise AnalysisError(f"attention op(s) {stray} are not on the residual stream: not a plain ViT")

    first_in = stream[0][1]
    emb = _walk_embedding(g, first_in)
    patch_tokens = emb["patch_tokens"]
    num_patches = g.shape(patch_tokens)[1]
    num_prefix = emb["num_prefix"]
    if g.shape(emb["insert_after"])[1] != num_prefix + num_patches:
        raise AnalysisError("the token count after the embedding does not equal prefix tokens + patches")
    grid, patch_size = _patch_conv(g, patch_tokens)
    if emb["pos"] is None:
        pos_embed = "none"
    elif emb["cat"] is None:
        pos_embed = "patch_tokens_only"  # no prefix tokens
    else:
        # walking back, the op met first is the later one in the forward pass
        pos_embed = "after_prefix_concat" if emb["pos_order"][0] == "pos" else "before_prefix_concat"

    final_ops, readout = _walk_readout(g, stream[-1][0], pools)
    readout.flops_per_token = _pool_flops_per_token(g, stream[-1][0], pools)
    kinds = _prefix_kinds(g, emb["cat"], num_prefix, readout)

    token_ops = []
    for n in (n for n in g.named("token_op") if g.attrs(n)["changes_tokens"]):
        before = sum(1 for b in blocks if g.order(b.residual_adds[0]) < g.order(n))
        a = g.attrs(n)
        token_ops.append({"node": n, "module": a["module"], "before_block": before, "config": a["config"]})

    insert_after = emb["insert_after"]
    stream_end = final_ops[-1] if final_ops else stream[-1][0]
    readers = _stream_readers(g, insert_after, stream_end, readout.nodes, blocks, num_prefix)
    # token axes flow from the residual stream; the readout and the readers a pass restores take every token back
    seeds = [insert_after] + [n for b in blocks for n in (b.input_node, *b.residual_adds)]
    feeds_stream = g.ancestors(stream_end)
    stop = list(readout.nodes) + [r["node"] for r in readers if r["node"] not in feeds_stream]
    return ViTGraph(
        input_shape=list(input_shape),
        num_patches=num_patches,
        grid=grid,
        patch_size=patch_size,
        embed_dim=g.shape(first_in)[2],
        num_prefix_tokens=num_prefix,
        prefix_tokens=kinds,
        pos_embed=pos_embed,
        patch_tokens_node=patch_tokens,
        prefix_concat_node=emb["cat"],
        pos_embed_node=emb["pos"],
        token_stream_start=insert_after,
        blocks=blocks,
        readout=readout,
        final_ops=final_ops,
        token_indexed=_token_indexed(g, seeds, stop, num_prefix, num_patches),
        token_ops=token_ops,
        stream_readers=readers,
    )
