"""ONNX builders of vitprune's token ops (onnx-graphsurgeon): what :mod:`vitprune.ops.token_ops` computes
in torch, as ONNX nodes, for the ONNX frontend's lowering.

Every count is a Python int baked in as a constant, so each op has a static token count and only the
batch stays dynamic. Gathers are ``GatherND(batch_dims=1)`` on ``[B, K, 1]`` indices: no ``Shape`` /
``Range`` arithmetic for the batch, and measured fastest in ONNX Runtime (``shared/DESIGN.md``: GatherND
6.2 ms, flat Gather 6.8 ms, TopK + Expand + GatherElements 15.2 ms). Ops whose signature changed across
opsets (the reductions took ``axes`` as an attribute before opset 18) are written for the host graph's
opset; opsets below 13 are refused (``Squeeze``/``Unsqueeze`` took attributes, ``Softmax`` flattened).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from vitprune.errors import PassError
from vitprune.ops.token_ops import RANK_RESOLUTION

MIN_OPSET = 13
INT64_MAX = 2 ** 63 - 1


class Builder:
    """Adds nodes to ``graph`` under a name prefix no existing tensor or node uses.

    Args:
        graph: the graphsurgeon graph being rewritten.
        opset: the graph's default-domain opset.
        prefix: a readable scope for the new names (``vitprune/importance_topk_0``).

    Raises:
        PassError: ``opset`` below :data:`MIN_OPSET`.
    """

    def __init__(self, graph: gs.Graph, opset: int, prefix: str) -> None:
        if opset < MIN_OPSET:
            raise PassError(f"the ONNX graph uses opset {opset}; vitprune rewrites opset {MIN_OPSET} and newer "
                            "(convert it with onnx.version_converter)")
        self.graph, self.opset = graph, opset
        taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        base, i = prefix, 0
        while any(t.startswith(prefix + "/") for t in taken):
            i += 1
            prefix = f"{base}_{i}"
        self.prefix, self._count = prefix, 0

    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}/{what}_{self._count}"

    def const(self, value: Any, what: str = "const", dtype: Any = np.int64) -> gs.Constant:
        return gs.Constant(self.name(what), np.asarray(value, dtype=dtype))

    def op(self, op: str, inputs: Sequence[Any], attrs: dict[str, Any] | None = None, outputs: int = 1,
           dtype: Any = None) -> Any:
        outs = [gs.Variable(self.name(f"{op}_out"), dtype=dtype) for _ in range(outputs)]
        self.graph.nodes.append(gs.Node(op, name=self.name(op), attrs=attrs or {}, inputs=list(inputs), outputs=outs))
        return outs[0] if outputs == 1 else outs

    # ---- opset-dependent helpers

    def reduce(self, op: str, x: gs.Tensor, axes: Sequence[int], keepdims: bool) -> gs.Variable:
        """``ReduceMean`` / ``ReduceL1`` / ``ReduceSum`` over ``axes`` (attribute before opset 18, input after;
        ``ReduceSum`` took the input from opset 13)."""
        takes_input = self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13)
        if takes_input:
            return self.op(op, [x, self.const(list(axes), "axes")], {"keepdims": int(keepdims)})
        return self.op(op, [x], {"axes": list(axes), "keepdims": int(keepdims)})

    def slice(self, x: gs.Tensor, start: int, stop: int | None, axis: int) -> gs.Variable:
        return self.op("Slice", [x, self.const([start], "starts"), self.const([INT64_MAX if stop is None else stop], "ends"),
                                 self.const([axis], "axes")])

    def unsqueeze(self, x: gs.Tensor, axis: int) -> gs.Variable:
        return self.op("Unsqueeze", [x, self.const([axis], "axes")])

    def scalar(self, value: float) -> gs.Constant:
        return self.const(np.float32(value), "scalar", dtype=np.float32)


# --------------------------------------------------------------------------------------------
# token ops (the torch twins are in vitprune.ops.token_ops)


def top_patch_indices(b: Builder, scores: gs.Tensor, keep_count: int) -> gs.Variable:
    """``[B, P]`` scores -> ``[B, keep_count]`` int64 indices of the highest, ascending (original order)."""
    _, top = b.op("TopK", [scores, b.const([keep_count], "k")], {"axis": 1, "largest": 1, "sorted": 0}, outputs=2)
    return sort_indices(b, top, keep_count)


def sort_indices(b: Builder, indices: gs.Tensor, count: int) -> gs.Variable:
    """``[B, K]`` int64 indices sorted ascending (TopK of the indices themselves)."""
    ascending, _ = b.op("TopK", [indices, b.const([count], "k")], {"axis": 1, "largest": 0, "sorted": 1}, outputs=2)
    return ascending


def keep_patch_tokens(b: Builder, x: gs.Tensor, num_prefix_tokens: int, kept: gs.Tensor) -> gs.Variable:
    """``x [B, prefix + P, C]``, ``kept [B, K]`` (indices into the patches) -> ``[B, prefix + K, C]``:
    prefix tokens, then the kept patches in ``kept``'s order."""
    patches = b.slice(x, num_prefix_tokens, None, axis=1) if num_prefix_tokens else x
    gathered = b.op("GatherND", [patches, b.unsqueeze(kept, -1)], {"batch_dims": 1})
    if not num_prefix_tokens:
        return gathered
    return b.op("Concat", [b.slice(x, 0, num_prefix_tokens, axis=1), gathered], {"axis": 1})


def magnitude_scores(b: Builder, x: gs.Tensor, num_prefix_tokens: int, norm: str = "ReduceL1") -> gs.Variable:
    """L1 (PSS, arXiv 2208.09520 §3.2) or, with ``norm="ReduceL2"``, L2 norm over channels of each patch token
    ``[B, P]``."""
    patches = b.slice(x, num_prefix_tokens, None, axis=1) if num_prefix_tokens else x
    return b.reduce(norm, patches, [2], keepdims=False)


def distinct_scores(b: Builder, x: gs.Tensor, num_prefix_tokens: int) -> gs.Variable:
    """``1 - max cosine similarity`` of each patch token to any other ``[B, P]``
    (:func:`vitprune.ops.token_ops.distinct_scores`; the diagonal is masked with ``EyeLike``, so the count
    follows the stream)."""
    patches = b.slice(x, num_prefix_tokens, None, axis=1) if num_prefix_tokens else x
    norm = b.op("Max", [b.reduce("ReduceL2", patches, [2], keepdims=True), b.scalar(1e-12)])  # F.normalize's eps
    unit = b.op("Div", [patches, norm])
    sim = b.op("MatMul", [unit, b.op("Transpose", [unit], {"perm": [0, 2, 1]})])
    sim = b.op("Div", [b.op("Add", [sim, b.op("Transpose", [sim], {"perm": [0, 2, 1]})]), b.scalar(2.0)])
    eye = b.op("EyeLike", [b.op("Gather", [sim, b.const(0, "image")], {"axis": 0})])  # [P, P]
    masked = b.op("Sub", [sim, b.op("Mul", [eye, b.scalar(3.0)])])
    scores = b.op("Sub", [b.scalar(1.0), b.reduce("ReduceMax", masked, [2], keepdims=False)])
    # token_ops.ranked: round(score / resolution) · P + (P - 1 - i), P and i read from the identity
    ones = b.reduce("ReduceMax", eye, [1], keepdims=False)  # [P]
    count = b.reduce("ReduceSum", ones, [0], keepdims=True)  # [1]: P
    later = b.op("Sub", [count, b.op("CumSum", [ones, b.const(0, "axis")])])  # P - 1 - i
    return b.op("Add", [b.op("Mul", [b.op("Round", [b.op("Div", [scores, b.scalar(RANK_RESOLUTION)])]), count]), later])


def random_scores(b: Builder, x: gs.Tensor, num_prefix_tokens: int) -> gs.Variable:
    """Uniform noise ``[B, P]``, one value per patch token (PatchDropout, arXiv 2208.07220 §3)."""
    patches = b.slice(x, num_prefix_tokens, None, axis=1) if num_prefix_tokens else x
    template = b.op("Gather", [patches, b.const(0, "channel")], {"axis": 2})  # [B, P]
    return b.op("RandomUniformLike", [template], {"dtype": 1, "low": 0.0, "high": 1.0})


def attention_row_scores(b: Builder, q: gs.Tensor, k: gs.Tensor, num_prefix_tokens: int, scale: float,
                         score: str, cls_index: int) -> gs.Variable:
    """``softmax(q_r · Kᵀ · scale)`` averaged over heads, patch keys only: ``[B, P]`` (EViT, arXiv 2202.07800 §3).

    ``q, k``: ``[B, H, N, d]``; ``score="cls"`` takes the row of query ``cls_index``, ``"mean-query"`` the mean
    query (:func:`vitprune.ops.token_ops.attention_patch_scores`), ``"attention-received"`` every row (the
    full map, averaged over queries too).
    """
    query = (b.slice(q, cls_index, cls_index + 1, axis=2) if score == "cls"
             else q if score == "attention-received" else b.reduce("ReduceMean", q, [2], keepdims=True))
    logits = b.op("MatMul", [query, b.op("Transpose", [k], {"perm": [0, 1, 3, 2]})])  # [B, H, 1 or N, N]
    attn = b.op("Softmax", [b.op("Mul", [logits, b.scalar(scale)])], {"axis": -1})
    mean = b.reduce("ReduceMean", attn, [1, 2], keepdims=False)  # [B, N]
    return b.slice(mean, num_prefix_tokens, None, axis=1)


def attention_map_scores(b: Builder, attn: gs.Tensor, num_prefix_tokens: int, score: str, cls_index: int) -> gs.Variable:
    """Patch scores ``[B, P]`` read from an explicit attention map ``[B, H, N, N]`` (rows averaged over heads)."""
    rows = b.slice(attn, cls_index, cls_index + 1, axis=2) if score == "cls" else attn
    mean = b.reduce("ReduceMean", rows, [1, 2], keepdims=False)
    return b.slice(mean, num_prefix_tokens, None, axis=1)


def static_select(b: Builder, x: gs.Tensor, token_index: list[int]) -> gs.Variable:
    """Constant token gather on the token axis: ``[B, N, C] -> [B, len(token_index), C]``."""
    return b.op("Gather", [x, b.const(token_index, "token_index")], {"axis": 1})


def lifespan_order(b: Builder, scores: gs.Tensor, num_patches: int, first_block: int, num_blocks: int,
                   score_weight: float, bias: float) -> gs.Variable:
    """Life Regression's lives from the attention scores ``[B, P]``, and the patch order by life ``[B, P]``.

    ``life = k0 - ½ + (L - k0 + ½) · sigmoid(a · z + b)`` with ``z`` the per-image standardised log score
    (:meth:`vitprune.ops.modules.LifespanGather.lives`; its token MLP starts at zero, so it is left out here).
    """
    z = b.op("Log", [b.op("Max", [scores, b.scalar(1e-12)])])
    mean = b.reduce("ReduceMean", z, [1], keepdims=True)
    centred = b.op("Sub", [z, mean])
    var = b.op("Div", [b.reduce("ReduceSum", b.op("Mul", [centred, centred]), [1], keepdims=True),
                       b.scalar(max(num_patches - 1, 1))])  # torch.std is unbiased
    zs = b.op("Div", [centred, b.op("Add", [b.op("Sqrt", [var]), b.scalar(1e-6)])])
    logit = b.op("Add", [b.op("Mul", [zs, b.scalar(score_weight)]), b.scalar(bias)])
    low = first_block - 0.5
    lives = b.op("Add", [b.op("Mul", [b.op("Sigmoid", [logit]), b.scalar(num_blocks - low)]), b.scalar(low)])
    _, order = b.op("TopK", [lives, b.const([num_patches], "k")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    return order


def prefix_slice(b: Builder, x: gs.Tensor, count: int) -> gs.Variable:
    """The first ``count`` tokens: ``[B, N, C] -> [B, count, C]``."""
    return b.slice(x, 0, count, axis=1)


# --------------------------------------------------------------------------------------------
# following the kept tokens (the torch twins: token_ops.update_canvas, token_ops.restore_tokens)

def compose_positions(b: Builder, x: gs.Tensor, positions: gs.Tensor | None, kept: gs.Tensor | list[int] | int
                      ) -> gs.Variable:
    """Grid positions ``[B, K]`` of the patches a token op keeps, from the positions ``[B, K_in]`` of its input
    ``x``'s patches (``None`` at the first op: ``arange(P)``). ``kept``: per-image indices ``[B, K]``, one
    constant index list, or a count (the first ``K``: a prefix slice)."""
    if isinstance(kept, int):
        if positions is None:
            raise PassError("a prefix slice as the first token op: nothing says which patches it keeps")
        return b.slice(positions, 0, kept, axis=1)
    if isinstance(kept, list):
        if positions is None:  # [K] -> [B, K]: the batch read from x at run time
            batch = b.op("Slice", [b.op("Shape", [x]), b.const([0], "start"), b.const([1], "end")])
            return b.op("Expand", [b.const([kept], "kept"), b.op("Concat", [batch, b.const([len(kept)], "count")],
                                                                {"axis": 0})])
        return b.op("Gather", [positions, b.const(kept, "kept")], {"axis": 1})
    return kept if positions is None else b.op("GatherElements", [positions, kept], {"axis": 1})


def scatter_patches(b: Builder, canvas: gs.Tensor, positions: gs.Tensor, patches: gs.Tensor) -> gs.Variable:
    """``canvas [B, P, C]`` with ``patches [B, K, C]`` written at grid ``positions [B, K]``: ``ScatterElements``
    without a reduction (the positions are distinct), which ONNX Runtime and TensorRT run."""
    index = b.op("Expand", [b.unsqueeze(positions, -1), b.op("Shape", [patches])])
    return b.op("ScatterElements", [canvas, index, patches], {"axis": 1})


def nearest_fill(b: Builder, reference: gs.Tensor, positions: gs.Tensor, patches: gs.Tensor) -> gs.Variable:
    """``[B, P, C]``: every grid position takes the kept patch (of ``patches [B, K, C]``, at ``positions [B, K]``)
    most similar (cosine) to it in ``reference [B, P, C]`` (:func:`vitprune.ops.token_ops.nearest_kept`:
    ``F.normalize``'s eps, ``ArgMax`` taking the first maximum as ``torch.argmax`` does)."""
    norm = b.op("Max", [b.reduce("ReduceL2", reference, [2], keepdims=True), b.scalar(1e-12)])
    unit = b.op("Div", [reference, norm])
    index = b.op("Expand", [b.unsqueeze(positions, -1), b.op("Shape", [patches])])
    kept = b.op("GatherElements", [unit, index], {"axis": 1})  # [B, K, C]
    sim = b.op("MatMul", [unit, b.op("Transpose", [kept], {"perm": [0, 2, 1]})])  # [B, P, K]
    nearest = b.op("ArgMax", [sim], {"axis": 2, "keepdims": 0, "select_last_index": 0})  # [B, P]
    return b.op("GatherElements", [patches, b.op("Expand", [b.unsqueeze(nearest, -1), b.op("Shape", [reference])])],
                {"axis": 1})


def restore_tokens(b: Builder, x: gs.Tensor, num_prefix_tokens: int, canvas: gs.Tensor, positions: gs.Tensor,
                   rule: str = "last", reference: gs.Tensor | None = None) -> gs.Variable:
    """Every token back in its grid position ``[B, prefix + P, C]``: ``x``'s live patches at ``positions``, the
    dropped ones by ``rule`` (:func:`vitprune.ops.token_ops.restore_tokens`): their last features from ``canvas``
    (``"last"``) or their nearest kept patch in ``reference`` (``"nearest"``, :func:`nearest_fill`)."""
    patches = b.slice(x, num_prefix_tokens, None, axis=1) if num_prefix_tokens else x
    if rule == "nearest":
        canvas = nearest_fill(b, reference, positions, patches)
    restored = scatter_patches(b, canvas, positions, patches)
    if not num_prefix_tokens:
        return restored
    return b.op("Concat", [b.slice(x, 0, num_prefix_tokens, axis=1), restored], {"axis": 1})
