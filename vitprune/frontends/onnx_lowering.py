"""Lowering for the ONNX frontend: insert a pass's token ops into the graph (onnx-graphsurgeon), then
re-specialise the token-count constants downstream and check the result.

A pass decides its static counts from the :class:`~vitprune.graph.analysis.ViTGraph` and calls
:meth:`OnnxLowering.insert_on_stream` with a builder of its ops (:mod:`vitprune.ops.onnx_ops`); every
reader of the stream tensor at that point then reads the op's output, as ``insert_on_stream`` does for
fx graphs.

Exporters bake the token count into constants (the dynamo exporter's ``Reshape`` targets
``[s0, 197, 6, 64]`` are ``Concat(Shape(x)[:1], [197, 6, 64])``, shared by every block). After the
insertions, every node downstream of a token op whose shape operand (``Reshape``/``Expand`` shape,
``Slice`` bounds, ``ConstantOfShape``, ``Range``, ``Tile``) is built from constants holding the old count
gets its own copy of that constant arithmetic with the count of its region (the token op it follows);
the other nodes are untouched. The result is then run: every original tensor must have its original
shape with the token axes at the new count, or the rewrite is refused naming the first tensor that does
not.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vitprune.errors import PassError, VerificationError
from vitprune.graph.analysis import ViTGraph
from vitprune.ops.onnx_ops import Builder

#: op type -> operand positions that hold a shape, bounds or a count (not data).
SHAPE_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Slice": (1, 2), "Range": (0, 1), "Tile": (1,),
}
_NOT_DATA = ("Shape", "Size")
MS_DOMAIN = "com.microsoft"


def tensor_graph(model: onnx.ModelProto) -> nx.DiGraph:
    """Tensor-level data flow of ``model``: an edge from every operand to every output of a node."""
    g = nx.DiGraph()
    for node in model.graph.node:
        for o in node.output:
            if o:
                g.add_node(o)
                for i in node.input:
                    if i:
                        g.add_edge(i, o)
        if node.op_type == "SkipLayerNormalization" and len(node.output) > 3 and node.output[3]:
            g.add_edge(node.output[3], node.output[0])  # the norm of the residual sum (as once unfused)
    return g


def image_dependent(model: onnx.ModelProto, image: str) -> set[str]:
    """Tensors whose values depend on the image's values (``Shape``/``Size`` outputs do not)."""
    data = {image}
    for node in model.graph.node:
        if node.op_type in _NOT_DATA:
            continue
        if any(i in data for i in node.input):
            data.update(o for o in node.output if o)
    return data


class OnnxLowering:
    """The state of one ONNX rewrite: the graphsurgeon graph, the analysis and the original run.

    Attributes:
        graph: the graph being rewritten (``gs.import_onnx`` of the input model).
        vit: the analysis of the input model.
        opset: default-domain opset of the model.
        example: the ``[B, C, H, W]`` example batch (numpy).
        values: every tensor of the original model on ``example`` (from :func:`vitprune.frontends.onnx.run_values`).
        flops_per_image: FLOPs of the original model per image.
        keep_all: build every token op keeping every patch (verification).
        calibration: a callable ``(names, batches) -> list[dict]`` running the original model.
    """

    def __init__(self, model: onnx.ModelProto, vit: ViTGraph, opset: int, example: np.ndarray,
                 values: dict[str, np.ndarray], flops_per_image: float, keep_all: bool,
                 run_original: Callable[[Iterable[str], np.ndarray], dict[str, np.ndarray]]) -> None:
        self.model = model
        self.graph = gs.import_onnx(model)
        self.vit, self.opset, self.example, self.values = vit, opset, example, values
        self.flops_per_image, self.keep_all = flops_per_image, keep_all
        self.run_original = run_original
        self.sites: list[tuple[str, int]] = []  # (stream tensor, tokens after the op), in insertion order
        # (site, stream tensor before a token op, what it keeps: indices [B, K], an index list or a count), in
        # stream order; the site is the original stream tensor the op was inserted at
        self.kept: list[tuple[str, gs.Tensor, Any]] = []
        self.moved: dict[str, gs.Tensor] = {}  # original stream tensor -> the token op output its readers read now
        self.restored: list[str] = []  # outputs of readers that read every token again (token restore)
        self._site: str | None = None
        self.axes: dict[str, dict[int, int]] = {}  # tensor -> {token axis: multiplicity} (after finish)
        self.regions: dict[str, int] = {}  # tensor -> token count there (after finish)
        self._inserted = 0

    def tensor(self, name: str) -> gs.Tensor:
        tensors = self.graph.tensors()
        if name not in tensors:
            raise PassError(f"tensor {name!r} is not in the ONNX graph")
        return tensors[name]

    def builder(self, base: str) -> Builder:
        self._inserted += 1
        return Builder(self.graph, self.opset, f"vitprune/{base}")

    def insert_on_stream(self, name: str, tokens_after: int, build: Callable[[gs.Tensor], gs.Tensor],
                         stream: gs.Tensor | None = None) -> gs.Tensor:
        """Call ``build`` on the stream tensor ``name`` ``[B, N, C]`` (or on ``stream``, a token op's output
        that replaced it); every other reader then reads ``build``'s output ``[B, tokens_after, C]``."""
        stream = stream if stream is not None else self.tensor(name)
        self._unfuse_skip_layer_norm(stream)
        readers = list(stream.outputs)
        self._site = name
        out = build(stream)
        self.moved[name] = out
        for node in readers:
            for i, t in enumerate(node.inputs):
                if t is stream:
                    node.inputs[i] = out
        self.graph.outputs = [out if t is stream else t for t in self.graph.outputs]
        self.sites.append((name, tokens_after))
        return out

    # ---- token ops that report what they keep (token restore follows them)

    def keep_patches(self, b: Builder, x: gs.Tensor, kept: gs.Tensor) -> gs.Variable:
        """Prefix tokens and the patches at ``kept [B, K]`` (:func:`vitprune.ops.onnx_ops.keep_patch_tokens`)."""
        from vitprune.ops.onnx_ops import keep_patch_tokens

        self.kept.append((self._site, x, kept))
        return keep_patch_tokens(b, x, self.vit.num_prefix_tokens, kept)

    def static_select(self, b: Builder, x: gs.Tensor, token_index: list[int]) -> gs.Variable:
        """A constant gather on the token axis (prefix tokens first in ``token_index``)."""
        from vitprune.ops.onnx_ops import static_select

        prefix = self.vit.num_prefix_tokens
        self.kept.append((self._site, x, [i - prefix for i in token_index[prefix:]]))
        return static_select(b, x, token_index)

    def prefix_slice(self, b: Builder, x: gs.Tensor, count: int) -> gs.Variable:
        """The first ``count`` tokens (prefix tokens included)."""
        from vitprune.ops.onnx_ops import prefix_slice

        self.kept.append((self._site, x, count - self.vit.num_prefix_tokens))
        return prefix_slice(b, x, count)

    def restore_tokens(self, end: str | None, readers: list[dict[str, Any]], rule: str = "last") -> None:
        """Every token back in place for the readers that need them: the ONNX form of
        :mod:`vitprune.passes.token_restore`. ``end``: the last residual add, restored for a dense readout;
        ``readers``: the analysis's restorable stream readers (an intermediate layer read by a DPT-style head),
        each given its own restored copy of the stream it reads. A canvas of every patch's last features is
        written at each token op before the reader (``ScatterElements`` without reduction) and the live patches
        are scattered into it (``rule`` ``"nearest"``: the canvas holds instead each patch's most similar kept
        patch, by the patches at the first token op, :func:`~vitprune.ops.onnx_ops.nearest_fill`).

        Raises:
            PassError: no token op before the readout.
        """
        if end is not None and not self.kept:
            raise PassError(f"no pruning point before the readout at {end!r}: nothing to restore")
        g = tensor_graph(self.model)
        for r in readers:
            source = r["source"]
            upstream = nx.ancestors(g, source) | {source}  # one walk per reader
            before = [k for k in self.kept if k[0] in upstream]
            if not before:
                continue  # nothing dropped before it: it reads every token already
            node = self.tensor(r["node"]).inputs[0]
            current = self.moved.get(source, self.tensor(source))
            restored = self._restored(self.builder("token_restore"), before, current, rule)
            for i, t in enumerate(node.inputs):
                if t is current:
                    node.inputs[i] = restored
            self.restored.append(r["node"])
        if end is not None:
            b = self.builder("token_restore")
            self.insert_on_stream(end, self.vit.num_tokens, lambda x: self._restored(b, self.kept, x, rule))

    def _restored(self, b: Builder, points: list[tuple[str, gs.Tensor, Any]], x: gs.Tensor, rule: str = "last"
                  ) -> gs.Variable:
        """``x`` ``[B, prefix + K, C]`` after the token ops ``points`` with every patch back in grid order."""
        from vitprune.ops import onnx_ops

        prefix = self.vit.num_prefix_tokens
        canvas = positions = reference = None
        for _, stream, kept in points:
            patches = b.slice(stream, prefix, None, axis=1) if prefix else stream
            canvas = patches if canvas is None else onnx_ops.scatter_patches(b, canvas, positions, patches)
            reference = patches if reference is None else reference  # every patch, at the first token op
            positions = onnx_ops.compose_positions(b, stream, positions, kept)
        return onnx_ops.restore_tokens(b, x, prefix, canvas, positions, rule, reference)

    def _unfuse_skip_layer_norm(self, stream: gs.Tensor) -> None:
        """A cut at ONNX Runtime's ``SkipLayerNormalization`` residual sum (output 3): the fused op also
        normalises that sum for the next block from its *own* inputs, which the cut would not reach. Split it
        into ``Add`` and ``LayerNormalization`` (what the optimizer fused) writing the same tensors, so the
        norm reads the pruned stream. ``LayerNormalization`` below opset 17 is ONNX Runtime's own (the
        optimizer emits it there too)."""
        node = stream.inputs[0] if stream.inputs else None
        if node is None or node.op != "SkipLayerNormalization" or node.domain != MS_DOMAIN:
            return
        if len(node.outputs) < 4 or node.outputs[3] is not stream:
            return
        x, skip, gamma = node.inputs[:3]
        beta = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        bias = node.inputs[4] if len(node.inputs) > 4 and node.inputs[4].name else None
        normed = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)
        b = self.builder("skip_layer_norm")
        operands = [b.op("Add", [x, skip]), bias] if bias is not None else [x, skip]
        self.graph.nodes.append(gs.Node("Add", name=b.name("Add"), inputs=operands, outputs=[stream]))
        self.graph.nodes.append(gs.Node("LayerNormalization", name=b.name("LayerNormalization"),
                                        attrs={"axis": -1, "epsilon": float(node.attrs.get("epsilon", 1e-12))},
                                        inputs=[stream, gamma] + ([beta] if beta is not None else []),
                                        outputs=[normed]))

    def block_scores(self, b: Builder, block: Any, score: str, cls_index: int) -> gs.Variable:
        """Patch scores ``[B, P]`` from ``block``'s attention, however the graph holds it: q and k of an SDPA,
        the rows of an explicit attention map, or a fused ONNX Runtime ``Attention`` (split to expose q, k)."""
        from vitprune.ops.onnx_ops import attention_map_scores, attention_row_scores

        prefix = self.vit.num_prefix_tokens
        if block.attention == "sdpa":
            return attention_row_scores(b, self.tensor(block.query_node), self.tensor(block.key_node), prefix,
                                        block.attention_scale, score, cls_index)
        if block.attention == "matmul-softmax":
            return attention_map_scores(b, self.tensor(block.attention_node), prefix, score, cls_index)
        return self.fused_attention_scores(b, block, score, cls_index)

    def patch_scores(self, b: Builder, x: gs.Tensor, block: Any, score: str, cls_index: int) -> gs.Variable:
        """Patch scores ``[B, P]`` at a pruning point whose stream is ``x`` and whose previous block is ``block``:
        the ONNX form of :func:`vitprune.ops.token_ops.patch_scores`."""
        from vitprune.ops.onnx_ops import distinct_scores, magnitude_scores

        prefix = self.vit.num_prefix_tokens
        if score == "distinct":
            return distinct_scores(b, x, prefix)
        if score in ("l1", "l2"):
            return magnitude_scores(b, x, prefix, "ReduceL1" if score == "l1" else "ReduceL2")
        rows = self.block_scores(b, block, "cls" if score == "cls-norm" else score, cls_index)
        return b.op("Mul", [rows, magnitude_scores(b, x, prefix, "ReduceL2")]) if score == "cls-norm" else rows

    def fused_attention_scores(self, b: Builder, block: Any, score: str, cls_index: int) -> gs.Variable:
        """Patch scores ``[B, P]`` of a block whose attention is ONNX Runtime's fused ``com.microsoft``
        ``Attention`` (q and k live inside the op). The op is split into its packed projection
        (``MatMul`` + ``Add``, ``Split``) and ``com.microsoft`` ``MultiHeadAttention`` on q, k, v: the same
        computation and the same fused attention kernel, with q and k now tensors the score reads (no
        extra FLOPs)."""
        node = self.tensor(block.attention_node).inputs[0]
        x, weight, bias = (list(node.inputs) + [None, None])[:3]
        extra = [t for t in node.inputs[3:] if t is not None and t.name]
        if not (node.op == "Attention" and node.domain == MS_DOMAIN and isinstance(weight, gs.Constant)
                and not node.attrs.get("qkv_hidden_sizes") and not extra and not node.attrs.get("unidirectional")):
            raise PassError(f"block {block.index}'s attention ({node.op} {node.name!r}) is fused in a form vitprune "
                            "cannot split into queries and keys (packed weights with a mask, past state or unequal sizes)")
        heads = int(node.attrs["num_heads"])
        c = int(weight.values.shape[1]) // 3
        d = c // heads
        qkv = b.op("MatMul", [x, weight])
        if bias is not None and bias.name:
            qkv = b.op("Add", [qkv, bias])
        q, k, v = b.op("Split", [qkv, b.const([c, c, c], "split")], {"axis": 2}, outputs=3)
        out = node.outputs[0]
        attrs = {"num_heads": heads}
        if node.attrs.get("scale"):
            attrs["scale"] = float(node.attrs["scale"])
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)
        self.graph.nodes.append(gs.Node("MultiHeadAttention", name=b.name("MultiHeadAttention"), domain=MS_DOMAIN,
                                        attrs=attrs, inputs=[q, k, v], outputs=[out]))

        def heads_first(t):
            return b.op("Transpose", [b.op("Reshape", [t, b.const([0, 0, heads, d], "heads")])], {"perm": [0, 2, 1, 3]})

        scale = float(attrs.get("scale", 0.0)) or d ** -0.5
        from vitprune.ops.onnx_ops import attention_row_scores

        return attention_row_scores(b, heads_first(q), heads_first(k), self.vit.num_prefix_tokens, scale, score, cls_index)

    def fused_input(self, block: Any) -> str:
        """The input tensor ``[B, N, C]`` of a block's fused ``com.microsoft`` ``Attention``."""
        return self.tensor(block.attention_node).inputs[0].inputs[0].name

    def fused_attention_map(self, block: Any, values: dict[str, np.ndarray]) -> np.ndarray:
        """The attention map ``[B, H, N, N]`` a fused ``com.microsoft`` ``Attention`` computes inside, from its
        input in ``values`` (an ONNX Runtime run) and its packed weights."""
        node = self.tensor(block.attention_node).inputs[0]
        x = values[node.inputs[0].name]
        w = np.asarray(node.inputs[1].values)
        bias = np.asarray(node.inputs[2].values) if isinstance(node.inputs[2], gs.Constant) else np.zeros(w.shape[1], w.dtype)
        heads = int(node.attrs["num_heads"])
        c = w.shape[1] // 3
        d = c // heads

        def heads_first(t):
            return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(0, 2, 1, 3)

        q, k = heads_first(x @ w[:, :c] + bias[:c]), heads_first(x @ w[:, c:2 * c] + bias[c:2 * c])
        logits = q @ k.transpose(0, 1, 3, 2) * (float(node.attrs.get("scale", 0.0)) or d ** -0.5)
        logits = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return logits / logits.sum(axis=-1, keepdims=True)

    # ---- after the insertions

    def finish(self) -> onnx.ModelProto:
        """Re-specialise token-count constants, clean up, sort, and return the model (shapes not yet inferred)."""
        self._respecialise()
        self.graph.cleanup().toposort()
        model = gs.export_onnx(self.graph)
        del model.graph.value_info[:]  # stale shapes of the old token count
        model.ir_version = self.model.ir_version
        model.producer_name = "vitprune"
        return model

    def _regions(self) -> dict[str, int]:
        """Output tensor of every original node after a token op -> the token count there."""
        g = tensor_graph(self.model)
        region: dict[str, int] = {}
        for site, tokens in self.sites:  # sites run along the stream: later ones win
            for t in nx.descendants(g, site):
                region[t] = tokens
        for reader in self.restored:  # reads every token again
            for t in nx.descendants(g, reader) | {reader}:
                region[t] = self.vit.num_tokens
        return region

    def _respecialise(self) -> None:
        """Give every shape operand that holds a token count its region's count (see the module docstring)."""
        from vitprune.frontends.onnx import _Consts
        from vitprune.frontends.onnx_token_axes import propagate

        consts = _Consts(self.model.graph).values
        shapes = {k: tuple(v.shape) for k, v in self.values.items()}
        shapes.update({k: tuple(np.shape(v)) for k, v in consts.items()})
        shapes[self.vit_input()] = tuple(self.example.shape)
        self.axes, unknown = propagate(self.model, shapes, self.vit.token_stream_start, consts)
        self.regions = self._regions()
        old = self.vit.num_tokens
        memo: dict[tuple[str, tuple[int, ...]], gs.Tensor] = {}
        for node in list(self.graph.nodes):
            outs = [t.name for t in node.outputs if t.name in self.regions]
            if not outs or self.regions[outs[0]] == old:
                continue
            delta = old - self.regions[outs[0]]
            bad = [t.name for t in [*node.inputs, *node.outputs] if t.name in unknown]
            if bad:
                raise PassError(f"cannot follow the token axis through {unknown[bad[0]]!r} (tensor {bad[0]!r}): "
                                "vitprune does not know how this op maps token positions, so it cannot change the "
                                "token count before it")
            for pos, change in self._operand_changes(node, delta, shapes, consts).items():
                node.inputs[pos] = self._shifted(node.inputs[pos], change, memo)

    def _operand_changes(self, node: gs.Node, delta: int, shapes, consts) -> dict[int, np.ndarray]:
        """Operand position -> the amount to add to each element of that shape operand (token axes only)."""
        out = node.outputs[0].name
        changes: dict[int, np.ndarray] = {}
        if node.op in ("Reshape", "Expand") and out in self.axes:
            target = node.inputs[1]
            value = self._value(target, consts)
            if value is None:
                return {}
            change = np.zeros_like(value)
            computed = _run_time_elements(target, len(value), {k: int(np.size(v)) for k, v in self.values.items()})
            for axis, m in self.axes[out].items():
                # an explicit size baked in as a constant (not -1 or 0, not read from Shape at run time)
                if axis < len(value) and value[axis] == shapes[out][axis] and not computed[axis]:
                    change[axis] = -m * delta
            if change.any():
                changes[1] = change
        elif node.op == "Slice" and node.inputs[0].name in self.axes:
            token = self.axes[node.inputs[0].name]
            rank = len(shapes[node.inputs[0].name])
            ends = self._value(node.inputs[2], consts)
            axes = self._value(node.inputs[3], consts) if len(node.inputs) > 3 else np.arange(len(ends or []))
            if ends is None or axes is None:
                return {}
            change = np.zeros_like(ends)
            for k, axis in enumerate(axes):
                size = shapes[node.inputs[0].name][int(axis) % rank]
                if int(axis) % rank in token and size <= ends[k] < 2 ** 62:  # "to the end", spelled as the size
                    change[k] = -token[int(axis) % rank] * delta
            if change.any():
                changes[2] = change
        return changes

    def _value(self, t: gs.Tensor, consts) -> np.ndarray | None:
        if isinstance(t, gs.Constant):
            return np.asarray(t.values).reshape(-1)
        v = self.values.get(t.name, consts.get(t.name))
        return None if v is None else np.asarray(v).reshape(-1)

    def _shifted(self, t: gs.Tensor, change: np.ndarray, memo: dict) -> gs.Tensor:
        """``t + change``: a new constant when ``t`` is one, else an ``Add`` (``t``'s other elements may come from
        ``Shape`` at run time, like the batch size, and must stay as they are)."""
        key = (t.name, tuple(int(c) for c in change))
        if key not in memo:
            if isinstance(t, gs.Constant):
                memo[key] = gs.Constant(self._fresh(f"{t.name}/tokens"), (np.asarray(t.values) + change.reshape(np.shape(t.values))).astype(t.values.dtype))
            else:
                b = self.builder("token_count")
                memo[key] = b.op("Add", [t, b.const(change.astype(np.int64), "change")])
        return memo[key]

    def _fresh(self, base: str) -> str:
        taken = set(self.graph.tensors())
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        return name

    def vit_input(self) -> str:
        from vitprune.frontends.onnx import image_input

        return image_input(self.model).name


def _run_time_elements(t: gs.Tensor, size: int, sizes: dict[str, int], depth: int = 0) -> list[bool]:
    """For a 1-D int64 shape tensor: which elements are computed from ``Shape`` at run time (they follow the
    new token count by themselves) and which are constants. Unknown arithmetic counts as run time (left
    alone; verification then catches a constant it hid). ``sizes``: element counts of the graph's tensors."""
    if isinstance(t, gs.Constant):
        return [False] * size
    if not t.inputs or depth > 32:
        return [True] * size
    node = t.inputs[0]
    op = node.op
    if op == "Constant":
        return [False] * size
    if op in ("Shape", "Size"):
        return [True] * size
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return _run_time_elements(node.inputs[0], size, sizes, depth + 1)
    if op == "Concat":
        out: list[bool] = []
        for i in node.inputs:
            n = int(np.prod(i.values.shape)) if isinstance(i, gs.Constant) else sizes.get(i.name)
            if n is None:
                return [True] * size
            out += _run_time_elements(i, n, sizes, depth + 1)
        return out if len(out) == size else [True] * size
    if op in ("Add", "Sub", "Mul", "Div"):
        parts = [_run_time_elements(i, size, sizes, depth + 1) for i in node.inputs]
        return [any(p[k] if len(p) == size else p[0] for p in parts) for k in range(size)]
    return [True] * size


def check_token_shapes(rewritten_values: dict[str, np.ndarray], original_values: dict[str, np.ndarray],
                       lowering: "OnnxLowering") -> None:
    """Every original tensor in the rewritten run has its original shape, each token axis shortened by
    ``multiplicity · (N - N')`` for its region's count ``N'``.

    Raises:
        VerificationError: naming the first tensor whose shape is not the expected one.
    """
    old = lowering.vit.num_tokens
    for name, value in original_values.items():
        if name not in rewritten_values:
            continue
        delta = old - lowering.regions.get(name, old)
        expected = list(value.shape)
        for axis, m in lowering.axes.get(name, {}).items() if delta else ():
            expected[axis] -= m * delta
        got = list(rewritten_values[name].shape)
        if got != expected:
            raise VerificationError(f"tensor {name!r} has shape {got} after the rewrite; expected {expected} "
                                    f"(token axes {sorted(lowering.axes.get(name, {}))} at {old - delta} tokens): "
                                    "a token count vitprune did not re-specialise")
