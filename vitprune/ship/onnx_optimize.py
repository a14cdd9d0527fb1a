"""Graph optimisation, float16 conversion and int8 dynamic quantisation of an exported ONNX graph.

Each step maps a ``ModelProto`` to a new one. :mod:`vitprune.ship.export_onnx` folds, runs onnx's checker,
then :func:`finish` (optimise in float32 -> convert / quantise), and checks the result against PyTorch
before anything is written.

- ``optimize="basic"``: onnx-graphsurgeon constant folding + dead-node cleanup + toposort.
- ``optimize="ort"``: ``basic``, then ONNX Runtime's transformer optimizer
  (``onnxruntime.transformers.optimizer.optimize_model(model_type="vit")``: LayerNormalization,
  SkipLayerNormalization, Gelu/BiasGelu, and attention where its patterns match). Its symbolic shape
  inference passes an initializer's value to onnx's per-node inference only for ``Unsqueeze``, so an
  opset-18 reduction with an ``axes`` *input* and no ORT handler (``ReduceL2`` from ``F.normalize`` in
  token-merge's key similarity) gets an output of unknown rank and the whole inference fails with a
  ``TypeError`` (then no SkipLayerNormalization is fused). :func:`ort_compatible` rewrites those
  reductions into ops ORT's inference handles (``ReduceL2 = Sqrt(ReduceSum(x * x))``), and a graph it
  still cannot infer is refused naming the node.
- ``dtype="float16"``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with float32
  inputs/outputs (``keep_io_types``) and ORT's default op block list plus :data:`FLOAT32_OPS`.
- ``quantize="dynamic"``: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights of MatMul/Conv,
  activations quantised per batch at run time).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from pathlib import Path

from vitprune.errors import VitpruneError

OPTIMIZE_LEVELS = ("none", "basic", "ort")
DTYPES = ("float32", "float16")
QUANTIZE_MODES = ("none", "dynamic")

#: the op types whose counts show what ORT's optimizer fused (reported before / after)
FUSION_OPS = ("MatMul", "Softmax", "LayerNormalization", "SkipLayerNormalization", "Attention",
              "MultiHeadAttention", "BiasGelu")

#: kept float32 in a float16 export (besides ORT's default block list, which holds TopK and Range):
#: the token scores' reductions, so which tokens are kept does not flip on float16 rounding of near ties
FLOAT32_OPS = ("ReduceL2", "ReduceSum", "Abs")


def op_counts(proto) -> dict[str, int]:
    """How many nodes of each op type the top-level graph has (sorted by op type)."""
    return dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))


def fold_constants(proto):
    """Constant folding and dead-node cleanup with onnx-graphsurgeon; returns a new ModelProto."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup().toposort()
    return gs.export_onnx(graph)


def _reduction_axes(node) -> list[int] | None:
    """The constant ``axes`` of an opset-18 reduction node (graphsurgeon), or None when not constant."""
    import onnx_graphsurgeon as gs

    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    return [int(a) for a in node.inputs[1].values.reshape(-1)]


def ort_compatible(proto):
    """``proto`` with the reductions ORT's symbolic shape inference cannot infer (module docstring) rewritten,
    exactly, into ops it has handlers for; a new ModelProto. ``ReduceL2(x) = Sqrt(ReduceSum(x * x))``,
    ``ReduceSumSquare(x) = ReduceSum(x * x)``, ``ReduceL1(x) = ReduceSum(Abs(x))``, and ``ReduceMax`` /
    ``ReduceMin`` over one constant axis (token-merge's best match per token) = ``TopK(k=1)`` values,
    squeezed unless ``keepdims``. Other reductions with an ``axes`` input are left for the refusal."""
    import numpy as np
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)

    def var(node, suffix, like):
        return gs.Variable(f"{node.name}/{suffix}", dtype=like.dtype)

    for node in list(graph.nodes):
        x, out, axes = node.inputs[0] if node.inputs else None, node.outputs[0] if node.outputs else None, None
        if node.op in ("ReduceL2", "ReduceSumSquare", "ReduceL1"):
            inner = var(node, "elementwise", x)
            graph.nodes.append(gs.Node("Abs", f"{node.name}/abs", inputs=[x], outputs=[inner]) if node.op == "ReduceL1"
                               else gs.Node("Mul", f"{node.name}/square", inputs=[x, x], outputs=[inner]))
            total = var(node, "sum", x) if node.op == "ReduceL2" else out
            graph.nodes.append(gs.Node("ReduceSum", f"{node.name}/reduce_sum", attrs=dict(node.attrs),
                                       inputs=[inner, *node.inputs[1:]], outputs=[total]))
            if node.op == "ReduceL2":
                graph.nodes.append(gs.Node("Sqrt", f"{node.name}/sqrt", inputs=[total], outputs=[out]))
        elif node.op in ("ReduceMax", "ReduceMin") and len(axes := _reduction_axes(node) or []) == 1:
            keep = bool(node.attrs.get("keepdims", 1))
            values = out if keep else var(node, "top1", x)
            k = gs.Constant(f"{node.name}/k", np.array([1], dtype=np.int64))
            graph.nodes.append(gs.Node("TopK", f"{node.name}/top1", inputs=[x, k],
                                       outputs=[values, gs.Variable(f"{node.name}/top1_index", dtype=np.int64)],
                                       attrs={"axis": axes[0], "largest": int(node.op == "ReduceMax"), "sorted": 1}))
            if not keep:
                graph.nodes.append(gs.Node("Squeeze", f"{node.name}/squeeze", inputs=[values, node.inputs[1]],
                                           outputs=[out]))
        else:
            continue
        node.outputs.clear()
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def _symbolic_shapes(proto):
    """ORT's symbolic shape inference of ``proto``, or a VitpruneError naming the first node whose output
    it could not infer."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_shape_from_type_proto

    # infer_shapes' own steps, on an instance we keep, so a failure can name the node it stopped at
    infer = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
    try:
        infer._preprocess(proto)
        complete = False
        while infer.run_:
            complete = infer._infer_impl()
        infer._update_output_from_vi()
        if not complete:
            raise ValueError("incomplete symbolic shape inference")
        return infer.out_mp_
    except Exception as exc:
        known = getattr(infer, "known_vi_", {})
        unknown = [node for node in proto.graph.node
                   if any(o in known and get_shape_from_type_proto(known[o].type) is None for o in node.output)]
        where = f" at {unknown[0].op_type} node {unknown[0].name!r} (output of unknown rank)" if unknown else ""
        raise VitpruneError(f"ONNX Runtime's symbolic shape inference fails on this graph{where}: "
                            f"{type(exc).__name__}: {exc}; export with --optimize basic") from exc


@contextlib.contextmanager
def _quiet_ort_tools():
    """ORT's optimizer and quantiser log progress and advice on the root logger; keep the CLI's stderr clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def ort_optimize(proto):
    """ONNX Runtime's transformer optimizer (``model_type="vit"``, heads and width read from the graph)
    on ``proto`` (constant-folded); returns ``(optimized ModelProto, FUSION_OPS counts before, after)``.

    Raises:
        VitpruneError: ORT's symbolic shape inference fails on the graph (naming the node).
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    proto = ort_compatible(proto)
    _symbolic_shapes(proto)  # what the optimizer would otherwise swallow, then fuse less
    before = op_counts(proto)
    with _quiet_ort_tools():
        optimized = optimize_model(proto, model_type="vit", num_heads=0, hidden_size=0, opt_level=0).model
    if not any(op.domain == "com.microsoft" for op in optimized.opset_import):  # its fused ops' domain
        optimized.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    after = op_counts(optimized)
    return optimized, {op: before.get(op, 0) for op in FUSION_OPS}, {op: after.get(op, 0) for op in FUSION_OPS}


def to_float16(proto):
    """``proto`` with float16 weights and compute, float32 inputs/outputs, :data:`FLOAT32_OPS` kept float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True,
                                    op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FLOAT32_OPS)))


def quantize_int8(proto):
    """``proto`` with int8 weights (``quantize_dynamic``, ``QInt8``, per tensor); a new ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="vitprune-quantize-") as tmp:
        out = Path(tmp) / "int8.onnx"
        with _quiet_ort_tools():
            quantize_dynamic(proto, out, weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def check_options(optimize: str, dtype: str, quantize: str) -> None:
    """Raise VitpruneError for an unknown value or a combination that is not built (float16 + int8)."""
    for value, allowed, name in ((optimize, OPTIMIZE_LEVELS, "optimize"), (dtype, DTYPES, "dtype"),
                                 (quantize, QUANTIZE_MODES, "quantize")):
        if value not in allowed:
            raise VitpruneError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
    if dtype == "float16" and quantize != "none":
        raise VitpruneError("--dtype float16 and --quantize dynamic do not combine (int8 dynamic quantisation "
                            "takes a float32 graph); pick one")


def finish(proto, optimize: str = "basic", dtype: str = "float32", quantize: str = "none"):
    """ORT's optimizer (``optimize="ort"``), then float16 conversion / int8 quantisation of ``proto``, which
    the caller has constant-folded already (:func:`fold_constants`: all that ``basic`` does) and checked
    (:func:`check_options`); returns ``(ModelProto, info)`` where ``info`` holds ``fused_before`` /
    ``fused_after`` (:data:`FUSION_OPS` counts) for ``optimize="ort"``.

    Raises:
        VitpruneError: ORT cannot infer the graph's shapes.
    """
    info: dict = {}
    if optimize == "ort":
        proto, info["fused_before"], info["fused_after"] = ort_optimize(proto)
    if dtype == "float16":
        proto = to_float16(proto)
    if quantize == "dynamic":
        proto = quantize_int8(proto)
    return proto, info
