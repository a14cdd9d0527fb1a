"""Which axes of each ONNX tensor are token axes, ONNX op by op, for the lowering's shape operands.

The analysis reads token axes from the neutral op graph (:mod:`vitprune.graph.token_axes`, one propagation
for every frontend); the ONNX lowering also needs them on the shape arithmetic the exporters emit (``Reshape``
targets, ``Slice`` ends, ``Gemm`` on flattened ``[B·N, C]`` tensors), which the op graph does not model, so it
follows the same rules (and helpers) at the level of ONNX nodes here.

A token axis is described by its *multiplicity* ``m``: the axis' size is ``m · N`` plus a part that does
not depend on the token count ``N`` (``[B, N, C]``: ``m = 1`` on axis 1; an attention map
``[B, H, N, N]``: ``m = 1`` on axes 2 and 3; ``x[:, 1:]``: ``m = 1``, size ``N - 1``; the exporters' flattened
``[B·N, C]``: ``m = B``). When the stream keeps ``N'`` tokens, an axis of size ``s`` becomes
``s - m · (N - N')``. Starting from the stream tensor ``[B, N, C]`` (axis 1, ``m = 1``), every op maps its
inputs' token axes to its outputs' (broadcasting ops align from the right, ``MatMul`` keeps rows of the
left and columns of the right operand, ``Transpose`` permutes, ``Reshape`` aligns axes by their prefix
products, reductions and scalar ``Gather`` remove axes, ...). An op this module does not know, reading a
token axis, gets ``None`` ("unknown"): the lowering refuses to change the token count before it, naming
the node, instead of guessing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from vitprune.graph.token_axes import Axes, align_right as _align_right, merge as _merge, reshape_axes as _reshape

#: ops whose output 0 is computed element by element from broadcast inputs (token axes align right)
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater", "And", "Or", "Not",
    "Relu", "Erf", "Sqrt", "Cast", "Identity", "Neg", "Abs", "Exp", "Log", "Sigmoid", "Tanh", "Gelu", "Dropout",
    "Softmax", "LayerNormalization", "BiasGelu", "FastGelu", "QuickGelu", "Clip", "Reciprocal", "Mod", "Sin", "Cos",
    "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "HardSigmoid",
    "LeakyRelu", "Elu", "Selu", "Softplus", "Sign", "Floor", "Ceil", "Round", "IsNaN", "BiasAdd", "Trilu",
}
#: ops whose outputs never carry token axes (shape arithmetic)
SHAPE_ONLY = {"Shape", "Size", "ConstantOfShape", "Range", "NonZero"}



def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _const_ints(name: str, consts: dict[str, np.ndarray]) -> list[int] | None:
    v = consts.get(name)
    return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]


def propagate(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], start: str,
              consts: dict[str, np.ndarray]) -> tuple[dict[str, Axes], dict[str, str]]:
    """Token axes of every tensor downstream of ``start`` (a ``[B, N, C]`` stream tensor).

    Returns:
        ``(axes, unknown)``: tensor -> ``{axis: multiplicity}`` for tensors that hold token axes, and
        tensor -> the node (``"OpType name"``) that made its token axes unknown.
    """
    axes: dict[str, Axes] = {start: {1: 1}}
    unknown: dict[str, str] = {}
    for node in model.graph.node:
        ins = [i for i in node.input]
        known = {i: axes[i] for i in ins if i in axes}
        if not known and not any(i in unknown for i in ins):
            continue
        label = f"{node.op_type} {node.name}".strip()
        outs = [o for o in node.output if o]
        if any(i in unknown for i in ins):
            for o in outs:
                unknown[o] = unknown[next(i for i in ins if i in unknown)]
            continue
        result = _op_axes(node, known, ins, shapes, consts)
        for k, o in enumerate(node.output):
            if not o:
                continue  # an optional output the graph does not use
            r = (result[k] if k < len(result) else None) if isinstance(result, list) else result
            if r is None:
                unknown[o] = label
            elif r:
                axes[o] = r
    return axes, unknown


def _rank(name: str, shapes: dict[str, tuple[int, ...]]) -> int:
    return len(shapes.get(name, ()))


def _op_axes(node: onnx.NodeProto, known: dict[str, Axes], ins: list[str], shapes: dict[str, tuple[int, ...]],
             consts: dict[str, np.ndarray]) -> Axes | None | list[Axes | None]:
    op = node.op_type
    out = node.output[0]
    r_out = _rank(out, shapes)
    first = known.get(ins[0]) if ins else None
    if op in SHAPE_ONLY:
        return [{} for _ in node.output]
    if op in ELEMENTWISE:
        merged = _merge(*(_align_right(a, _rank(i, shapes), r_out) for i, a in known.items()))
        if op == "SkipLayerNormalization":  # outputs 0 and 3 (the sum) are [B, N, C]; 1, 2 are statistics
            return [merged if k in (0, 3) else {} for k in range(len(node.output))]
        return [merged] + [{} for _ in node.output[1:]]
    if op in ("MatMul", "FusedMatMul"):
        ra, rb = _rank(ins[0], shapes), _rank(ins[1], shapes)
        result: Axes = {}
        for a, m in known.get(ins[0], {}).items():
            if a == ra - 1:
                continue  # contracted
            result[a + r_out - ra] = m
        for b, m in known.get(ins[1], {}).items():
            if b == rb - 2 and rb >= 2:
                continue  # contracted
            result[r_out - 1 if b == rb - 1 else b + r_out - rb] = m
        return result
    if op == "Gemm":
        if ins[1] in known or (len(ins) > 2 and ins[2] in known):
            return None
        a = first or {}
        trans = int(_attr(node, "transA", 0))
        return {0: a[1]} if trans and 1 in a else {0: a[0]} if not trans and 0 in a else {}
    if op == "Transpose":
        perm = _attr(node, "perm") or list(reversed(range(r_out)))
        return {i: first[p] for i, p in enumerate(perm) if p in (first or {})}
    if op in ("Reshape", "Flatten"):
        if ins[0] not in known:
            return {}
        return _reshape(first, shapes[ins[0]], shapes[out])
    if op in ("Squeeze", "Unsqueeze"):
        if ins[0] not in known:
            return {}
        in_shape, out_shape = shapes[ins[0]], shapes[out]
        return _reshape(first, in_shape, out_shape)
    if op == "Slice":
        if ins[0] not in known:
            return {}
        rank = _rank(ins[0], shapes)
        starts, ends = _const_ints(ins[1], consts), _const_ints(ins[2], consts)
        sl_axes = _const_ints(ins[3], consts) if len(ins) > 3 and ins[3] else list(range(len(starts or [])))
        if starts is None or ends is None or sl_axes is None:
            return None if any(a in first for a in range(rank)) else {}
        result = dict(first)
        for s, e, a in zip(starts, ends, sl_axes):
            a %= rank
            if a not in first:
                continue
            size, new = shapes[ins[0]][a], shapes[out][a]
            if new == size:
                continue
            if e >= size and s >= 0:
                continue  # to the end: the part past the start still holds the tokens
            del result[a]  # a fixed part (the prefix tokens): no longer token-sized
        return result
    if op == "Gather":
        if ins[0] not in known:
            return None if ins[1] in known else {}
        rank = _rank(ins[0], shapes)
        axis = int(_attr(node, "axis", 0)) % rank
        idx_rank = _rank(ins[1], shapes)
        result = {}
        for a, m in first.items():
            if a < axis:
                result[a] = m
            elif a > axis:
                result[a + idx_rank - 1] = m
            elif consts.get(ins[1]) is None:
                return None  # a computed index on the token axis
        return result
    if op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
        if ins[0] not in known:
            return {}
        rank = _rank(ins[0], shapes)
        red = _attr(node, "axes")
        if red is None and len(ins) > 1 and ins[1]:
            red = _const_ints(ins[1], consts)
        if op in ("ArgMax", "ArgMin"):
            red = [int(_attr(node, "axis", 0))]
        red = set(range(rank)) if red is None else {int(a) % rank for a in red}
        keep = bool(_attr(node, "keepdims", 1))
        result = {}
        for a, m in first.items():
            if a in red:
                continue
            result[a - (0 if keep else sum(1 for r in red if r < a))] = m
        return result
    if op == "Concat":
        rank = r_out
        axis = int(_attr(node, "axis")) % rank
        result: Axes = {}
        for i in ins:
            for a, m in known.get(i, {}).items():
                result[a] = result.get(a, 0) + m if a == axis else max(result.get(a, 0), m)
        return result
    if op == "Split":
        axis = int(_attr(node, "axis", 0)) % _rank(ins[0], shapes)
        if axis in (first or {}):
            return None
        return [dict(first or {}) for _ in node.output]
    if op == "Expand":
        return _align_right(first or {}, _rank(ins[0], shapes), r_out) if ins[0] in known else None
    if op == "Attention" and node.domain in ("", "ai.onnx"):  # q [B, H, N, d] or [B, N, H·d]
        q = known.get(ins[0], {})
        return [{a: m for a, m in q.items() if a != _rank(ins[0], shapes) - 1}] + [None for _ in node.output[1:]]
    if node.domain == "com.microsoft" and op in ("Attention", "MultiHeadAttention"):
        q = known.get(ins[0], {})
        return [{a: m for a, m in q.items() if a == 1}] + [None for _ in node.output[1:]]
    return None
