"""ONNX frontend: an ``.onnx`` ViT graph -> the neutral :class:`~vitprune.graph.opgraph.OpGraph`.

One op-graph node per ONNX *tensor* (named by the tensor), so a multi-output op (``Split`` into q, k, v,
``SkipLayerNormalization``'s normalised output and residual sum) gives each output its own kind. Shapes
come from one ONNX Runtime run on an example input with every intermediate tensor exposed
(:func:`run_values`): exact for the shapes the graph computes at run time, which static shape inference
can miss (``Reshape`` targets built from ``Shape`` ops).

Op kinds (what the analysis reads):

- ``MatMul`` with a constant 2-D right operand and ``Gemm`` -> ``linear``; other ``MatMul`` -> ``matmul``;
- ``Softmax`` -> ``softmax``; ``Attention`` (opset 23) -> ``sdpa``; ONNX Runtime's fused ``com.microsoft``
  ``Attention`` (QKV projection inside) and ``MultiHeadAttention`` -> ``mha``;
- ``LayerNormalization``, ``com.microsoft`` ``SkipLayerNormalization`` (output 0; its output 3, the residual
  sum, is an ``add``) and the decomposed LayerNorm of opset < 17 exporters
  (``ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> Add``) -> ``norm``: the
  decomposition's inner tensors are left out of the op graph, so the norm reads its input once, as in
  torch;
- ``Gather`` / ``Slice`` with constant indices on a data tensor -> ``index`` (``{axis: int | slice}``);
  ``Split`` outputs -> ``index`` slices; ``ReduceMean`` -> ``mean``; ``Concat`` -> ``cat``; ``Conv`` -> ``conv``;
  ``ConvTranspose`` -> ``conv_transpose`` (a layer: its weight is never token-indexed);
  ``Reshape``/``Flatten``/``Squeeze``/``Unsqueeze`` -> ``reshape``; ``Transpose`` -> ``permute`` (``perm``);
- ``Shape``/``Size`` outputs are not tensors of the image (``tensor=False``), so the shape arithmetic
  exporters emit (``Shape -> Gather -> Concat -> Reshape``) is image-independent, as ``x.shape`` is in fx.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from vitprune.errors import AnalysisError, VitpruneError
from vitprune.graph.opgraph import OpGraph
from vitprune.io.sizes import check_fits

INT64_MAX = 2 ** 63 - 1
MS_DOMAIN = "com.microsoft"

_SIMPLE_KINDS = {
    "Add": "add", "Mul": "mul", "Div": "mul", "Softmax": "softmax", "Concat": "cat", "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "ReduceMean": "mean", "LayerNormalization": "norm", "Reshape": "reshape", "Flatten": "reshape",
    "Squeeze": "reshape", "Unsqueeze": "reshape", "Transpose": "permute",
}


class OnnxModel:
    """An ONNX model vitprune loaded (``vitprune.load("model.onnx")``): the graph and where it came from.

    The ONNX frontend rewrites it without PyTorch code (:func:`vitprune.rewrite_onnx`); ``bench`` runs it in
    ONNX Runtime.
    """

    def __init__(self, proto: onnx.ModelProto, path: str | None = None) -> None:
        self.proto, self.path = proto, path

    def __repr__(self) -> str:
        return f"OnnxModel({self.path or '<ModelProto>'}, opset {opset_of(self.proto)}, {len(self.proto.graph.node)} nodes)"

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the image input when the graph fixes it, else None."""
        dims = image_input(self.proto).type.tensor_type.shape.dim
        size = tuple(d.dim_value for d in dims[1:]) if len(dims) == 4 else ()
        return size if len(size) == 3 and all(s > 0 for s in size) else None  # type: ignore[return-value]

    @property
    def params(self) -> int:
        """Elements in the graph's initializers."""
        return int(sum(np.prod(i.dims, dtype=np.int64) for i in self.proto.graph.initializer))


def load_model(source: Any) -> onnx.ModelProto:
    """An ONNX model from a path (external data beside it loads too) or a ``ModelProto``.

    Raises:
        VitpruneError: the file is not a readable ONNX model (one line, never a pickle fallback);
            AnalysisError: a graph no runtime can load (:func:`check_graph`).
    """
    if isinstance(source, onnx.ModelProto):
        check_graph(source)
        return source
    path = Path(os.fspath(source))
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf decode errors carry no useful text
        raise VitpruneError(f"cannot read {path}: not an ONNX model or corrupt ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'decode failed'})") from None
    check_graph(model)
    return model


#: operator domains ONNX Runtime implements besides ONNX's own (its contrib, layout and ATen ops)
ORT_DOMAINS = frozenset({MS_DOMAIN, "com.microsoft.nchwc", "com.microsoft.experimental", "com.microsoft.dml",
                         "com.ms.internal.nhwc", "org.pytorch.aten"})


@functools.lru_cache(maxsize=1)
def _onnx_domains() -> frozenset[str]:
    return frozenset(s.domain for s in onnx.defs.get_all_schemas_with_history())


def check_graph(model: onnx.ModelProto) -> None:
    """Refuse, naming the node, a graph ONNX Runtime could not load, before any session is built (ORT's own
    errors are multi-line C++ messages): an opset newer than this onnx knows, a node in an operator domain
    the file does not import or no runtime defines, an operator ONNX does not define, a cycle.

    Raises:
        AnalysisError: one of the above (the node's name and op, and the reason).
    """
    import networkx as nx

    newest = onnx.defs.onnx_opset_version()
    imported = {("" if imp.domain == "ai.onnx" else imp.domain): int(imp.version) for imp in model.opset_import}
    if imported.get("", 0) > newest:
        raise AnalysisError(f"the ONNX file imports opset {imported['']} of the default domain; onnx "
                            f"{onnx.__version__} knows opsets up to {newest}: export it at opset {newest} or lower")
    onnx_domains = _onnx_domains()
    local = {(f.domain, f.name) for f in model.functions}  # functions the file defines itself
    graph = nx.DiGraph()
    producer: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        domain = "" if node.domain == "ai.onnx" else node.domain
        what = f"node {node.name or (node.output[0] if node.output else str(i))!r} ({node.op_type})"
        if (domain, node.op_type) in local:
            pass
        elif domain not in imported:
            raise AnalysisError(f"{what} is in the operator domain {domain or 'ai.onnx'!r}, which the file does not "
                                "import")
        elif domain not in onnx_domains and domain not in ORT_DOMAINS:
            raise AnalysisError(f"{what} is in the operator domain {domain!r}, which neither ONNX nor ONNX Runtime "
                                "defines: no runtime can run it")
        elif domain in onnx_domains and not onnx.defs.has(node.op_type, domain):
            raise AnalysisError(f"{what} is not an operator of the domain {domain or 'ai.onnx'!r}")
        graph.add_node(i)
        producer.update((o, i) for o in node.output if o)
    for i, node in enumerate(model.graph.node):
        graph.add_edges_from((producer[t], i) for t in node.input if t in producer)
    if nx.is_directed_acyclic_graph(graph):  # a topological sort: linear (find_cycle walks every edge path)
        return
    cycle = nx.find_cycle(graph)
    names = [model.graph.node[a].name or model.graph.node[a].output[0] for a, _ in cycle]
    raise AnalysisError(f"the ONNX graph has a cycle through {len(names)} nodes ({' -> '.join(names[:4])}"
                        f"{' -> ...' if len(names) > 4 else ''}): not a valid ONNX graph")


def is_onnx_file(path: Any) -> bool:
    """Whether ``path`` names an ``.onnx`` file (by suffix; the loader checks the content)."""
    return isinstance(path, (str, os.PathLike)) and Path(os.fspath(path)).suffix.lower() == ".onnx"


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    """The opset version ``model`` imports for ``domain`` (``""``: the default ONNX domain)."""
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(imp.version)
    return 0


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph's one image input (initializers listed as inputs by old exporters are skipped).

    Raises:
        AnalysisError: the graph takes no input or more than one.
    """
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise AnalysisError(f"the ONNX graph takes {len(inputs)} inputs "
                            f"({', '.join(i.name for i in inputs)}); vitprune analyses one image input")
    return inputs[0]


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the graph's image input fixes (a TorchScript export without ``dynamic_axes`` keeps the
    example's batch, often 1), or None when the batch axis is symbolic."""
    dims = image_input(model).type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def analysis_batch(model: onnx.ModelProto, wanted: int = 2) -> int:
    """The batch vitprune analyses and verifies at: ``wanted`` (2 tells the batch axis apart from others) when the
    batch is dynamic, else the file's own (:func:`static_batch`): the graph runs at no other."""
    return static_batch(model) or wanted


def example_input(model: onnx.ModelProto, batch: int = 2, input_size: tuple[int, int, int] | None = None,
                  seed: int = 0) -> np.ndarray:
    """A seeded normal ``[batch, C, H, W]`` float32 batch at the graph's input size.

    Raises:
        AnalysisError: the input is not 4-D, or ``C, H, W`` are symbolic and no ``input_size`` is given.
        VitpruneError: the batch does not fit in the memory available now (the message gives the size needed).
    """
    dims = image_input(model).type.tensor_type.shape.dim
    if len(dims) != 4:
        raise AnalysisError(f"the ONNX graph's input has rank {len(dims)}; vitprune expects images [B, C, H, W]")
    size = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if input_size is not None:
        size = list(input_size)
    if any(s is None or s <= 0 for s in size):
        raise AnalysisError(f"the ONNX graph's input size is symbolic ({[d.dim_param or d.dim_value for d in dims]}); "
                            "give --input-size C,H,W")
    # the float64 draw and its float32 copy: refused before allocating when they cannot fit
    check_fits([batch, *size], "the ONNX graph's example input", bytes_per_element=12)
    return np.random.default_rng(seed).standard_normal((batch, *size)).astype(np.float32)


def session(model: onnx.ModelProto, threads: int | None = None):
    """An ONNX Runtime CPU session for ``model`` (graph optimisations off: values are the graph's own)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    data = model.SerializeToString() if model.ByteSize() < 2 ** 31 - 2 ** 20 else None
    try:
        if data is not None:
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vitprune-onnx-") as tmp:  # > 2 GB: ORT reads external data
            path = os.path.join(tmp, "model.onnx")                        # from a file (read at load)
            onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # what check_graph cannot see (an opset or operator this ORT lacks): its message
        raise AnalysisError(f"ONNX Runtime cannot load the graph: {_ort_message(exc)}") from None


def _ort_message(exc: Exception) -> str:
    """ORT's error on one line, without its ``[ONNXRuntimeError] : 1 : FAIL :`` prefix and C++ source paths."""
    import re

    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/\S*onnxruntime\S*\.(?:h|cc):\d+ [^:]*\) ", "", text)  # "path.cc:46 void f(...) "
    return text or type(exc).__name__


def run_values(model: onnx.ModelProto, x: np.ndarray, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` on ``x`` and return the value of every tensor in ``names`` (default: every node
    output) plus the graph outputs.

    Raises:
        AnalysisError: ONNX Runtime cannot run the graph on ``x`` (ORT's whole message, on one line).
    """
    produced = [o for n in model.graph.node for o in n.output if o]
    wanted = list(dict.fromkeys(produced if names is None else names))
    graph_outputs = [o.name for o in model.graph.output]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = set(graph_outputs)
    # an output needs no type for ONNX Runtime: it reports whatever the tensor holds
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in have)
    sess = session(probe)
    try:
        out = sess.run(None, {image_input(model).name: x})
    except Exception as exc:
        raise AnalysisError(f"ONNX Runtime cannot run the graph on an input of shape {list(x.shape)}: "
                            f"{_ort_message(exc)}") from None
    return {o.name: v for o, v in zip(sess.get_outputs(), out)}


# --------------------------------------------------------------------------------------------
# the op graph


class _Consts:
    """Constant tensors of a graph: initializers and ``Constant`` node outputs."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.values[n.output[0]] = numpy_helper.to_array(a.t)
                    elif a.name in ("value_int", "value_float", "value_ints", "value_floats"):
                        self.values[n.output[0]] = np.array(onnx.helper.get_attribute_value(a))

    def get(self, name: str) -> np.ndarray | None:
        return self.values.get(name) if name else None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ints(v: np.ndarray | None) -> list[int] | None:
    return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]


def _slice_axes(node: onnx.NodeProto, consts: _Consts, rank: int) -> dict[str, Any]:
    """``index`` attrs of a ``Slice`` with constant starts/ends/axes/steps."""
    ins = list(node.input) + [""] * (5 - len(node.input))
    starts, ends = _ints(consts.get(ins[1])), _ints(consts.get(ins[2]))
    axes = _ints(consts.get(ins[3])) if ins[3] else list(range(len(starts or [])))
    steps = _ints(consts.get(ins[4])) if ins[4] else [1] * len(starts or [])
    if starts is None or ends is None or axes is None or steps is None:
        return {"opaque": True}
    out: dict[int, slice] = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        e = None if e >= 2 ** 62 else e  # exporters spell "to the end" as INT64_MAX
        sl = slice(s or None, e, None if st == 1 else st)
        if sl != slice(None):
            out[a % rank] = sl
    return {"axes": out, "tensor_axes": []}


def _gather_axes(node: onnx.NodeProto, consts: _Consts, rank: int) -> dict[str, Any]:
    axis = int(_attr(node, "axis", 0)) % max(rank, 1)
    index = consts.get(node.input[1])
    if index is not None and index.ndim == 0:
        return {"axes": {axis: int(index)}, "tensor_axes": []}
    return {"axes": {}, "tensor_axes": [axis]}


def _layer_norm_decompositions(graph: onnx.GraphProto, consts: _Consts) -> dict[str, tuple[str, set[str]]]:
    """Decomposed LayerNorms: final tensor -> (normalised input, inner tensors to hide).

    Matches ``y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * w + b`` as the TorchScript exporter
    writes it below opset 17 (``ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div[, Mul][, Add]``).
    """
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    found = {}
    for div in (n for n in graph.node if n.op_type == "Div"):
        sub, sqrt = producer.get(div.input[0]), producer.get(div.input[1])
        if not (sub and sqrt and sub.op_type == "Sub" and sqrt.op_type == "Sqrt"):
            continue
        mean1 = producer.get(sub.input[1])
        add_eps = producer.get(sqrt.input[0])
        if not (mean1 and mean1.op_type == "ReduceMean" and mean1.input[0] == sub.input[0]
                and add_eps and add_eps.op_type == "Add"):
            continue
        mean2 = producer.get(add_eps.input[0]) or producer.get(add_eps.input[1])
        pow_ = producer.get(mean2.input[0]) if mean2 is not None and mean2.op_type == "ReduceMean" else None
        if pow_ is None or pow_.op_type not in ("Pow", "Mul") or pow_.input[0] != sub.output[0]:
            continue
        x = sub.input[0]
        inner = [mean1, sub, pow_, mean2, add_eps, sqrt, div]
        end = div
        for op in ("Mul", "Add"):  # the affine weight and bias, when they follow
            nxt = users.get(end.output[0], [])
            if len(nxt) == 1 and nxt[0].op_type == op and any(consts.get(i) is not None for i in nxt[0].input):
                inner.append(nxt[0])
                end = nxt[0]
        hidden = {o for n in inner for o in n.output if n is not end}
        hidden |= {o for n in inner for i in n.input for o in [i] if o in producer and producer[o].op_type == "Constant"}
        found[end.output[0]] = (x, hidden)
    return found


def to_opgraph(model: onnx.ModelProto, x: np.ndarray, values: dict[str, np.ndarray] | None = None) -> OpGraph:
    """The neutral op graph of an ONNX model, shapes from one ONNX Runtime run on ``x`` ``[B, C, H, W]``.

    Node names are ONNX tensor names. ``values`` (from :func:`run_values`) saves the run when given.

    Raises:
        AnalysisError: the graph does not take one image input, or ONNX Runtime cannot run it on ``x``.
    """
    graph = model.graph
    values = values if values is not None else run_values(model, x)
    consts = _Consts(graph)
    shapes = {k: tuple(int(s) for s in v.shape) for k, v in values.items()}
    shapes.update({k: tuple(int(s) for s in v.shape) for k, v in consts.values.items()})
    image = image_input(model).name
    shapes[image] = tuple(x.shape)
    fused_norms = _layer_norm_decompositions(graph, consts)
    hidden = set().union(*(h for _, h in fused_norms.values())) if fused_norms else set()

    og = OpGraph(batch=int(x.shape[0]))
    og.add(image, "input", shape=shapes[image], tensor=True, label="graph input")
    for name in consts.values:
        if name not in hidden and name not in og.g:
            if any(i.name == name for i in graph.initializer):
                og.add(name, "constant", shape=shapes.get(name), tensor=True, label="initializer")
    non_tensor: set[str] = set()

    def known(names: Iterable[str]) -> list[str | None]:
        return [n if n and n in og.g else None for n in names]

    for node in graph.node:
        label = f"{node.op_type} {node.name}".strip()
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            if node.output[0] not in hidden:
                og.add(node.output[0], "constant", shape=shapes.get(node.output[0]), tensor=True, label=label)
            continue
        outs = [o for o in node.output if o]
        if all(o in hidden for o in outs):
            continue
        if outs and outs[0] in fused_norms:
            src = fused_norms[outs[0]][0]
            og.add(outs[0], "norm", shape=shapes.get(outs[0]), tensor=True, inputs=known([src]),
                   label=f"LayerNorm (decomposed) ending at {label}")
            continue
        for k, (out, kind, ins, attrs) in enumerate(_map_node(node, consts, shapes, outs)):
            tensor = out not in non_tensor and node.op_type not in ("Shape", "Size")
            reads = known(ins)
            # the other operands (weights, shape tensors); data operands a mapping leaves out (the norm of a
            # SkipLayerNormalization reads the sum, not the op's two inputs) are not read
            extra = [i for i in known(node.input) if i is not None and i not in reads and not og.is_data(i)]
            og.add(out, kind, shape=shapes.get(out), tensor=tensor, inputs=reads, extra_inputs=extra,
                   label=label + (f" output {k}" if len(outs) > 1 else ""), **attrs)
            if not tensor:
                non_tensor.add(out)
    out_node = "output"
    while out_node in og.g:
        out_node = "_" + out_node
    og.add(out_node, "output", shape=None, tensor=False, inputs=[o.name for o in graph.output if o.name in og.g],
           label="graph output")
    return og


def _map_node(node: onnx.NodeProto, consts: _Consts, shapes: dict[str, tuple[int, ...]],
              outs: list[str]) -> list[tuple[str, str, list[str], dict[str, Any]]]:
    """(output, kind, operand tensors, attrs) for each output of an ONNX node."""
    op, domain = node.op_type, node.domain
    ins = list(node.input)
    first = shapes.get(ins[0]) if ins and ins[0] else None
    rank = len(first or ())
    if domain == MS_DOMAIN:
        if op == "Attention":
            heads = int(_attr(node, "num_heads"))
            c = shapes[ins[0]][-1]
            return [(outs[0], "mha", ins, {"heads": heads, "head_dim": c // heads, "embed_dim": c,
                                          "batch_first": True, "projections": 3})]
        if op == "MultiHeadAttention":
            heads = int(_attr(node, "num_heads"))
            c = shapes[ins[0]][-1]
            return [(outs[0], "mha", ins, {"heads": heads, "head_dim": c // heads, "embed_dim": c,
                                          "batch_first": True, "projections": 0})]
        if op == "SkipLayerNormalization":
            # output 3 is the residual sum input + skip (+ bias); when the graph does not read it (the last
            # block), the op graph still gets the sum, under a name no tensor has, so the stream is complete
            total = node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.output[0]}#sum"
            shapes.setdefault(total, shapes.get(ins[1]))
            result = [(total, "add", [ins[0], ins[1]], {}), (node.output[0], "norm", [total], {})]
            return result + [(o, "other", ins, {}) for o in outs if o not in (total, node.output[0])]
        if op in ("LayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"):
            return [(outs[0], "norm", ins[:1], {})] + [(o, "other", ins, {}) for o in outs[1:]]
        return [(o, "other", ins, {}) for o in outs]
    if op == "MatMul":
        w = consts.get(ins[1])
        if w is not None and w.ndim == 2:
            return [(outs[0], "linear", ins, {"in_features": int(w.shape[0]), "out_features": int(w.shape[1])})]
        return [(outs[0], "matmul", ins, {})]
    if op == "Gemm":
        w = shapes.get(ins[1])
        trans_b = int(_attr(node, "transB", 0))
        attrs = {}
        if w is not None and len(w) == 2:
            attrs = {"in_features": w[1] if trans_b else w[0], "out_features": w[0] if trans_b else w[1]}
        return [(outs[0], "linear", ins, attrs)]
    if op == "Attention":  # opset 23: q, k, v [B, H, N, d] (or 3-D with q_num_heads)
        return [(outs[0], "sdpa", ins[:3], {"scale": _attr(node, "scale"), "heads": _attr(node, "q_num_heads")})] + \
            [(o, "other", ins, {}) for o in outs[1:]]
    if op == "LayerNormalization":
        return [(outs[0], "norm", ins[:1], {})] + [(o, "other", ins, {}) for o in outs[1:]]
    if op == "Softmax":
        return [(outs[0], "softmax", ins, {"dim": int(_attr(node, "axis", -1)) % max(len(shapes.get(outs[0], ())), 1)})]
    if op == "Concat":
        r = len(shapes.get(outs[0], ()))
        axis = int(_attr(node, "axis"))
        return [(outs[0], "cat", ins, {"dim": axis % r if r else axis})]
    if op == "Conv":
        return [(outs[0], "conv", ins, {"stride": list(_attr(node, "strides", [1, 1]))})]
    if op in ("ReduceMean", "ReduceMax"):
        axes = _attr(node, "axes")
        if axes is None and len(ins) > 1:
            axes = _ints(consts.get(ins[1]))
        dims = tuple(sorted(int(a) % rank for a in axes)) if axes is not None and rank else ()
        if axes is None:
            dims = tuple(range(rank))
        kind = "mean" if op == "ReduceMean" else "max"
        return [(outs[0], kind, ins[:1], {"dims": dims, "keepdims": bool(_attr(node, "keepdims", 1))})]
    if op == "Transpose":
        perm = _attr(node, "perm")
        return [(outs[0], "permute", ins, {"perm": [int(p) for p in (perm or reversed(range(rank)))]})]
    if op == "Gather":
        return [(outs[0], "index", ins, _gather_axes(node, consts, rank))]
    if op == "Slice":
        return [(outs[0], "index", ins, _slice_axes(node, consts, rank))]
    if op == "Split":
        axis = int(_attr(node, "axis", 0)) % max(rank, 1)
        result, start = [], 0
        for o in node.output:
            size = shapes.get(o, ())[axis] if o in shapes else 0
            if o:
                result.append((o, "index", ins[:1], {"axes": {axis: slice(start or None, start + size)}, "tensor_axes": []}))
            start += size
        return result
    if op in _SIMPLE_KINDS:
        return [(outs[0], _SIMPLE_KINDS[op], ins, {})] + [(o, "other", ins, {}) for o in outs[1:]]
    return [(o, "other", ins, {}) for o in outs]


def drop_noop_attention_masks(model: onnx.ModelProto, values: dict[str, np.ndarray],
                              image: str) -> tuple[onnx.ModelProto, list[str]]:
    """Remove attention masks that mask nothing: image-independent, and all-true (boolean) or all-zero
    (additive) on the example. Hugging Face models exported by the dynamo exporter carry one
    ``[B, 1, N, N]`` mask built from ``arange(N)`` into every attention (opset 23 ``Attention`` input 3, or
    an ``Add`` to the scores before ``Softmax``); it holds no information, yet it is indexed by token
    position, so a pruned model would have to gather it. An ``Attention`` loses the input; an ``Add`` gets a
    scalar zero instead, so every tensor keeps its name. Returns ``(model, names of the ops changed)``; the
    caller checks the outputs did not move.
    """
    from vitprune.frontends.onnx_lowering import image_dependent

    data = image_dependent(model, image)
    softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}

    def noop(name: str, additive: bool) -> bool:
        v = values.get(name)
        if v is None or name in data:
            return False
        return bool(v.all()) if v.dtype == bool else additive and bool((v == 0).all())

    new = onnx.ModelProto()
    new.CopyFrom(model)
    changed = []
    zero = None
    for node in new.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and len(node.input) > 3 \
                and node.input[3] and noop(node.input[3], additive=True):
            node.input[3] = ""
            while node.input and not node.input[-1]:
                del node.input[-1]
            changed.append(node.name or node.output[0])
        elif node.op_type == "Add" and node.output[0] in softmax_inputs:
            for k in (0, 1):
                other = node.input[1 - k]
                if other in data and noop(node.input[k], additive=True):
                    if zero is None:
                        zero = "vitprune/no_mask"
                        dtype = onnx.helper.np_dtype_to_tensor_dtype(values[node.input[k]].dtype)
                        new.graph.initializer.append(onnx.helper.make_tensor(zero, dtype, [], [0]))
                    node.input[k] = zero
                    changed.append(node.name or node.output[0])
                    break
    return new, changed
