"""FLOPs of an ONNX graph, counted with the conventions of ``torch.utils.flop_counter`` (1 MAC = 2 FLOPs).

vitprune verifies a rewrite by comparing FLOPs, and an ONNX model is compared with the torch model it was
exported from (:func:`vitprune.graph.flops.count_flops`): the two counts agree only if every ONNX op is
counted exactly as torch counts the aten ops it came from. torch counts matrix products, convolutions and
attention, and nothing else; so does this module. From the tensor shapes of one run:

* ``MatMul`` (and ``com.microsoft`` ``FusedMatMul``): ``2 · prod(broadcast batch dims) · M · K · N``, as
  ``aten.mm``/``aten.bmm`` after ``torch.matmul`` folds or broadcasts. A 1-D *left* operand counts as
  ``[1, K]`` (torch unsqueezes it into an ``mm``); a 1-D *right* operand counts 0, because torch runs
  ``aten.mv``/``aten.dot`` there, which its flop counter has no formula for.
* ``Gemm`` (and ``com.microsoft`` ``FusedGemm``): ``2 · M · K · N`` after ``transA``/``transB``; the bias
  ``C`` counts 0, as torch's ``addmm`` counts only its ``mm``.
* ``Conv`` (and ``com.microsoft`` ``FusedConv``): ``2 · prod(Y) · (C_in / group) · prod(kernel)``;
  ``ConvTranspose``: ``2 · prod(X) · (C_out / group) · prod(kernel)`` (torch's ``conv_flop_count``, which
  counts the bias as nothing, and counts a transposed convolution per *input* element).
* ``Attention`` (ai.onnx, opset 23+): torch's ``sdpa_flop_count``, the two batched products ``q·kᵀ`` and
  ``attn·v``: ``2 · B · H_q · S · T · (d + d_v)``, with ``T`` the past plus the new key length. The mask,
  softcap, scaling and softmax count 0, and a causal or masked attention counts in full, as in torch.
* ``com.microsoft`` ``Attention`` (onnxruntime contrib op): the fused Q/K/V projection
  ``2 · B · S · C_in · (hidden_q + hidden_k + hidden_v)`` plus the attention as above (the projection is a
  ``Linear`` in the torch model, so it must be counted here); ``com.microsoft`` ``MultiHeadAttention``: the
  attention only (its projections stay separate ``MatMul`` nodes; its ``bias`` input is an add).
* ``Einsum`` with two operands: the ``bmm`` torch's ``einsum`` runs, ``2 · prod(output index sizes) ·
  prod(contracted index sizes)``; 0 when no index is contracted (torch multiplies elementwise then). One
  operand (a transpose, a sum, a diagonal) counts 0, as in torch. Three or more operands count 0 with a
  :class:`UserWarning`: torch contracts them pairwise in an order that depends on whether ``opt_einsum``
  is installed, so no single count matches it.

Everything else counts 0 (elementwise ops, ``Softmax``, ``LayerNormalization``, reductions, ``Gather``,
``Reshape``, unknown custom ops ...), as torch's flop counter has no formula for them. A few ops that do
matrix products but have no formula here (recurrent, quantized and the other fused attention ops,
:data:`_NO_FORMULA`) raise ``ValueError`` rather than silently count 0, and so do counted ops inside
control flow (``If``/``Loop``/``Scan``) or model-local functions, whose tensors have no shapes in one run's
shape map. Assumptions on the contrib ops follow the schemas onnxruntime 1.32 registers
(``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()``).
"""

from __future__ import annotations

import warnings
from math import prod
from typing import Callable, Mapping, Sequence

import onnx

_Shapes = Mapping[str, Sequence[int]]
_CONTRIB = "com.microsoft"

#: ops that do matrix products but that no formula here counts: refusing beats under-counting silently
_NO_FORMULA: frozenset[tuple[str, str]] = frozenset(
    [("", op) for op in ("RNN", "LSTM", "GRU", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
                         "DeformConv")]
    + [(_CONTRIB, op) for op in ("GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
                                 "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention",
                                 "DecoderAttention", "SparseAttention", "LongformerAttention", "QAttention",
                                 "QOrderedAttention", "QOrderedLongformerAttention", "QOrderedMatMul",
                                 "MatMulNBits", "MatMulBnb4", "MatMulFpQ4", "MatMulIntegerToFloat",
                                 "DynamicQuantizeMatMul", "NhwcConv", "QLinearConv", "ConvTransposeWithDynamicPads")]
    # onnxruntime's blocked-layout Conv (graphs saved at its highest optimization level): weights re-laid out
    + [("com.microsoft.nchwc", "Conv")]
)


def _attribute(attribute: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attribute)
    return value.decode() if isinstance(value, bytes) else value  # STRING attributes come back as bytes


class _Node:
    """One node with the shape map: its inputs' and outputs' shapes, attributes, and errors that name it."""

    def __init__(self, node: onnx.NodeProto, index: int, shapes: _Shapes) -> None:
        self.proto, self.shapes = node, shapes
        self.label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node #{index}"
        self.attrs = {a.name: _attribute(a) for a in node.attribute}

    def has_input(self, i: int) -> bool:
        return i < len(self.proto.input) and self.proto.input[i] != ""  # "" marks an omitted optional input

    def input(self, i: int) -> tuple[int, ...]:
        if not self.has_input(i):
            raise ValueError(f"{self.label} has no input {i}, which its FLOPs need.")
        return self._shape(self.proto.input[i])

    def output(self, i: int) -> tuple[int, ...]:
        return self._shape(self.proto.output[i])

    def fail(self, reason: str) -> ValueError:
        return ValueError(f"{self.label}: {reason}")

    def _shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise self.fail(f"no shape for tensor {name!r} (the shape map must hold every tensor of the run).")
        shape = tuple(self.shapes[name])
        if not all(hasattr(d, "__index__") for d in shape) or any(int(d) < 0 for d in shape):  # ints, numpy ints
            raise self.fail(f"tensor {name!r} has shape {shape}, not a concrete shape.")
        return tuple(int(d) for d in shape)


# ---------------------------------------------------------------------------------------------
# matrix products


def _matmul(node: _Node, a: Sequence[int], b: Sequence[int]) -> int:
    """numpy-matmul shapes ``a @ b`` -> ``2 · prod(broadcast batch) · M · K · N`` (torch's count)."""
    if len(b) == 1:
        return 0  # torch runs aten.mv / aten.dot, which torch.utils.flop_counter counts as 0
    a = (1, *a) if len(a) == 1 else tuple(a)  # torch: unsqueeze(0) then mm, counted
    (m, k), (k2, n) = a[-2:], b[-2:]
    if k != k2:
        raise node.fail(f"inner dimensions differ: {tuple(a)} @ {tuple(b)}.")
    return 2 * prod(_broadcast(node, a[:-2], b[:-2])) * m * k * n


def _broadcast(node: _Node, a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    width = max(len(a), len(b))
    a, b = (1,) * (width - len(a)) + tuple(a), (1,) * (width - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise node.fail(f"batch dimensions {a} and {b} do not broadcast.")
    return tuple(x if y == 1 else y for x, y in zip(a, b))


def _matmul_node(node: _Node) -> int:
    return _matmul(node, node.input(0), node.input(1))


def _fused_matmul(node: _Node) -> int:
    """``com.microsoft`` FusedMatMul: MatMul with ``transA``/``transB`` on the last two dims (``alpha`` is a
    scale, 0); ``transBatchA``/``transBatchB`` move the batch dims and are refused."""
    if node.attrs.get("transBatchA", 0) or node.attrs.get("transBatchB", 0):
        raise node.fail("transBatchA/transBatchB are not supported.")
    a, b = node.input(0), node.input(1)
    if node.attrs.get("transA", 0) and len(a) >= 2:
        a = (*a[:-2], a[-1], a[-2])
    if node.attrs.get("transB", 0) and len(b) >= 2:
        b = (*b[:-2], b[-1], b[-2])
    return _matmul(node, a, b)


def _gemm(node: _Node) -> int:
    """``A [M, K]`` (``[K, M]`` if ``transA``), ``B [K, N]`` (``[N, K]`` if ``transB``): ``2 · M · K · N``."""
    a, b = node.input(0), node.input(1)
    if len(a) != 2 or len(b) != 2:
        raise node.fail(f"Gemm operands must be 2-D, got {a} and {b}.")
    (m, k) = a[::-1] if node.attrs.get("transA", 0) else a
    (k2, n) = b[::-1] if node.attrs.get("transB", 0) else b
    if k != k2:
        raise node.fail(f"inner dimensions differ: {a} and {b} (transA/transB applied).")
    return 2 * m * k * n


def _conv(node: _Node) -> int:
    """``W [M, C/group, k...]``, ``Y [N, M, out...]``: ``2 · prod(Y) · C/group · prod(k)``."""
    weight = node.input(1)
    return 2 * prod(node.output(0)) * weight[1] * prod(weight[2:])


def _conv_transpose(node: _Node) -> int:
    """``X [N, C, in...]``, ``W [C, M/group, k...]``: ``2 · prod(X) · M/group · prod(k)`` (per input element)."""
    weight = node.input(1)
    return 2 * prod(node.input(0)) * weight[1] * prod(weight[2:])


# ---------------------------------------------------------------------------------------------
# attention


def _sdpa(batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int, v_head_dim: int) -> int:
    """torch's ``sdpa_flop_count``: ``q·kᵀ`` ``[B·H, S, d] @ [B·H, d, T]`` plus ``attn·v``
    ``[B·H, S, T] @ [B·H, T, d_v]``."""
    return 2 * batch * heads * seq_q * seq_kv * head_dim + 2 * batch * heads * seq_q * seq_kv * v_head_dim


def _heads(node: _Node, attr: str) -> int:
    if attr not in node.attrs or node.attrs[attr] <= 0:
        raise node.fail(f"3-D inputs need a positive {attr} attribute.")
    return node.attrs[attr]


def _onnx_attention(node: _Node) -> int:
    """ai.onnx Attention: Q ``[B, H_q, S, d]`` or ``[B, S, H_q·d]`` (``q_num_heads``); K ``[B, H_kv, L, d]`` or
    ``[B, L, H_kv·d]`` (``kv_num_heads``); V likewise with ``d_v``; optional ``past_key`` ``[B, H_kv, P, d]``."""
    q, k, v = node.input(0), node.input(1), node.input(2)
    if len(q) == 4:
        batch, heads, seq_q, head_dim = q
    elif len(q) == 3:
        heads = _heads(node, "q_num_heads")
        batch, seq_q, head_dim = q[0], q[1], q[2] // heads
    else:
        raise node.fail(f"query must be 3-D or 4-D, got {q}.")
    if len(v) == 4:
        seq_kv, v_head_dim = v[2], v[3]
    elif len(v) == 3:
        seq_kv, v_head_dim = v[1], v[2] // _heads(node, "kv_num_heads")
    else:
        raise node.fail(f"value must be 3-D or 4-D, got {v}.")
    if (k[2] if len(k) == 4 else k[1]) != seq_kv:
        raise node.fail(f"key {k} and value {v} have different sequence lengths.")
    if node.has_input(4):  # past_key: the attended length is past + new
        seq_kv += node.input(4)[2]
    return _sdpa(batch, heads, seq_q, seq_kv, head_dim, v_head_dim)


def _contrib_attention(node: _Node) -> int:
    """com.microsoft Attention: input ``[B, S, C_in]``, weights ``[C_in, h_q + h_k + h_v]`` (``qkv_hidden_sizes``,
    else three equal parts), ``num_heads``; optional past ``[2, B, H, P, d]``. Projection plus attention."""
    x, weights = node.input(0), node.input(1)
    if len(x) != 3 or len(weights) != 2:
        raise node.fail(f"expected input [B, S, C_in] and weights [C_in, 3·hidden], got {x} and {weights}.")
    if node.attrs.get("past_present_share_buffer", 0):
        raise node.fail("past_present_share_buffer: the attended length is a runtime value, not a shape.")
    heads = _heads(node, "num_heads")
    sizes = list(node.attrs.get("qkv_hidden_sizes", [])) or [weights[1] // 3] * 3
    if sum(sizes) != weights[1]:
        raise node.fail(f"weights {weights} do not hold Q/K/V projections of sizes {sizes}.")
    batch, seq, _ = x
    seq_kv = seq + (node.input(4)[3] if node.has_input(4) else 0)
    projection = _matmul(node, x, weights)
    return projection + _sdpa(batch, heads, seq, seq_kv, sizes[0] // heads, sizes[2] // heads)


def _contrib_multi_head_attention(node: _Node) -> int:
    """com.microsoft MultiHeadAttention, ``num_heads`` H: query ``[B, S, H·d]`` with key/value ``[B, L, H·d]``,
    ``[B, H, L, d]`` or packed KV ``[B, L, H, 2, d]`` (no value), or packed QKV query ``[B, L, H, 3, d]`` (no
    key/value); optional ``past_key`` ``[B, H, P, d]``. Attention only: its projections are separate MatMuls."""
    heads, query = _heads(node, "num_heads"), node.input(0)
    if node.has_input(8):  # past_sequence_length: buffer sharing, the past length is a runtime value
        raise node.fail("past_sequence_length (buffer sharing): the attended length is not a shape.")
    if len(query) == 5:  # packed QKV
        batch, seq, _, _, head_dim = query
        return _sdpa(batch, heads, seq, seq, head_dim, head_dim)
    if len(query) != 3:
        raise node.fail(f"query must be [B, S, hidden] or packed [B, L, H, 3, d], got {query}.")
    batch, seq, hidden = query
    key = node.input(1)
    if len(key) == 5:  # packed KV
        seq_kv, v_head_dim = key[1], key[4]
    elif len(key) == 4:  # key/value already [B, H, L, d] (cross attention with a cached key)
        seq_kv, v_head_dim = key[2], node.input(2)[3]
    elif len(key) == 3:
        seq_kv, v_head_dim = key[1], node.input(2)[2] // heads
    else:
        raise node.fail(f"key must be 3-D, 4-D or packed 5-D, got {key}.")
    if len(key) == 3 and node.has_input(6):  # past_key
        seq_kv += node.input(6)[2]
    return _sdpa(batch, heads, seq, seq_kv, hidden // heads, v_head_dim)


# ---------------------------------------------------------------------------------------------
# einsum


def _einsum(node: _Node) -> int:
    """Two operands: the ``bmm`` torch's ``einsum`` runs (``sumproduct_pair``): indices that only one operand
    has and the output lacks are summed out first (no FLOPs); if no index is left to contract (in both
    operands with a size other than 1, not in the output), torch multiplies elementwise (0); otherwise
    ``2 · prod(output index sizes) · prod(contracted index sizes)``."""
    operands = [node.input(i) for i in range(len(node.proto.input))]
    if len(operands) == 1:
        return 0  # a transpose, diagonal or sum
    if len(operands) != 2:
        warnings.warn(f"{node.label}: an Einsum of {len(operands)} operands counts 0 (torch's pairwise order "
                      f"depends on opt_einsum).")
        return 0
    inputs, output = _einsum_terms(node, node.attrs["equation"], operands)
    sizes = _einsum_sizes(node, inputs, operands)
    left, right = (dict(zip(term, shape)) for term, shape in zip(inputs, operands))
    # torch contracts only the indices of size != 1 in both operands; an index of size 1 in one operand
    # (broadcast) is summed out of the other before the bmm, at no count
    contracted = [i for i in (left.keys() & right.keys()) - set(output) if left[i] != 1 and right[i] != 1]
    if not contracted:
        return 0
    return 2 * prod(sizes[i] for i in output) * prod(sizes[i] for i in contracted)


def _einsum_terms(node: _Node, equation: str, operands: list[tuple[int, ...]]) -> tuple[list[list[str]], list[str]]:
    """The index letters of each operand and of the output, with ``...`` expanded into one pseudo-index per
    broadcast dim (``'0'``, ``'1'``, ... counted from the right, so that they align as numpy broadcasting does)."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise node.fail(f"equation {equation!r} names {len(terms)} operands, the node has {len(operands)}.")
    width = max((len(shape) - len(term.replace("...", "")) for term, shape in zip(terms, operands)
                 if "..." in term), default=0)
    ellipsis = [str(d) for d in reversed(range(width))]

    def expand(term: str, rank: int | None) -> list[str]:
        head, dots, tail = term.partition("...")
        if not dots:
            return list(term)
        count = width if rank is None else rank - len(head) - len(tail)
        return [*head, *ellipsis[width - count:], *tail]

    inputs = [expand(term, len(shape)) for term, shape in zip(terms, operands)]
    if arrow:
        output = expand(rhs, None)
    else:  # implicit output: the broadcast dims, then every letter used once, alphabetically
        letters = [c for c in lhs.replace("...", "") if c.isalpha()]
        output = ellipsis + sorted(c for c in set(letters) if letters.count(c) == 1)
    return inputs, output


def _einsum_sizes(node: _Node, inputs: list[list[str]], operands: list[tuple[int, ...]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for term, shape in zip(inputs, operands):
        if len(term) != len(shape):
            raise node.fail(f"einsum term {''.join(term)!r} does not match an operand of shape {shape}.")
        for index, size in zip(term, shape):
            if sizes.get(index, 1) not in (1, size) and size != 1:
                raise node.fail(f"einsum index {index!r} has sizes {sizes[index]} and {size}.")
            sizes[index] = max(sizes.get(index, 1), size)
    return sizes


#: (domain, op type) -> formula; "" is the default ai.onnx domain
_FORMULAS: dict[tuple[str, str], Callable[[_Node], int]] = {
    ("", "MatMul"): _matmul_node,
    ("", "Gemm"): _gemm,
    ("", "Conv"): _conv,
    ("", "ConvTranspose"): _conv_transpose,
    ("", "Attention"): _onnx_attention,
    ("", "Einsum"): _einsum,
    (_CONTRIB, "FusedMatMul"): _fused_matmul,
    (_CONTRIB, "FusedGemm"): _gemm,
    (_CONTRIB, "FusedConv"): _conv,
    (_CONTRIB, "Attention"): _contrib_attention,
    (_CONTRIB, "MultiHeadAttention"): _contrib_multi_head_attention,
}


# ---------------------------------------------------------------------------------------------
# the graph


def _key(node: onnx.NodeProto) -> tuple[str, str]:
    return ("" if node.domain in ("", "ai.onnx") else node.domain), node.op_type


def _report_name(key: tuple[str, str]) -> str:
    domain, op_type = key
    return f"{domain}.{op_type}" if domain else op_type


def _refuse_hidden_work(node: onnx.NodeProto, label: str, functions: dict[tuple[str, str], onnx.FunctionProto],
                        seen: frozenset[tuple[str, str]] = frozenset()) -> None:
    """Raise if ``node`` runs a counted op whose tensors one run's shape map cannot hold: inside a subgraph
    (If/Loop/Scan: a branch or an iteration count is data) or a model-local function."""
    inner: list[onnx.NodeProto] = []
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        inner += [n for g in graphs for n in g.node]
    function = functions.get((node.domain, node.op_type))
    if function is not None and (node.domain, node.op_type) not in seen:
        inner += list(function.node)
        seen = seen | {(node.domain, node.op_type)}
    hint = " (inline it with onnx.inliner.inline_local_functions)" if function is not None else ""
    for child in inner:
        if _key(child) in _FORMULAS or _key(child) in _NO_FORMULA:
            raise ValueError(f"{label} contains a {child.op_type} node whose FLOPs cannot be counted from one "
                             f"run's shapes{hint}.")
        _refuse_hidden_work(child, label, functions, seen)


def onnx_flops_by_op(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """FLOPs of one run of ``model`` per counted op type (``"MatMul"``, ``"com.microsoft.Attention"``, ...),
    for reports; op types without a formula (those that count 0 by convention) are left out.

    ``shapes`` maps tensor names (graph inputs, initializers, node outputs) to their concrete shapes in that
    run; only the inputs and outputs of counted ops are read. Raises ``ValueError`` (naming the node and the
    tensor) when such a shape is missing or not concrete, when the shapes do not fit the op, for ops that do
    matrix products without a formula here, and for counted ops inside control flow or local functions.
    """
    functions = {(f.domain, f.name): f for f in model.functions}
    totals: dict[str, int] = {}
    for index, proto in enumerate(model.graph.node):
        node = _Node(proto, index, shapes)
        key = _key(proto)
        if key in _NO_FORMULA:
            raise node.fail("this op does matrix products but vitprune has no FLOP formula for it.")
        _refuse_hidden_work(proto, node.label, functions)
        formula = _FORMULAS.get(key)
        if formula is not None:
            name = _report_name(key)
            totals[name] = totals.get(name, 0) + formula(node)
    return totals


def count_onnx_flops(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """FLOPs of one run of ``model`` (the whole batch), from the tensor shapes of that run.

    ``shapes`` maps every tensor name (graph inputs, initializers, every node output) to its concrete shape,
    e.g. from an ONNX Runtime run with every node output exposed as a graph output. The count follows
    ``torch.utils.flop_counter`` (see the module docstring), so it equals
    :func:`vitprune.graph.flops.count_flops` of the torch model the graph was exported from, on the same input.
    Raises ``ValueError`` as :func:`onnx_flops_by_op` does.
    """
    return sum(onnx_flops_by_op(model, shapes).values())
