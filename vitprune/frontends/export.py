"""torch.export frontend: capture what symbolic tracing cannot, and re-specialise token-count literals.

``torch.export`` captures models ``torch.fx.symbolic_trace`` cannot (data-dependent Python, Hugging Face
transformers 5.x, timm hybrids) as an aten-level graph. vitprune exports with the batch axis dynamic and
turns the program into a plain ``fx.GraphModule`` (parameters as attributes, the standard code generator,
no input guard), so the analysis (through :func:`vitprune.frontends.fx.to_opgraph`), the passes, the
verification, ``torch.compile`` and the ONNX export treat it like a traced graph.

Exported graphs bake the token count into shape literals (``aten.reshape(x, [s0, 197, 3, 6, 64])``,
``aten.slice(x, 1, 1, 197)``); after a pass changes the count these would fail or silently misread.
:func:`respecialise_token_literals` rewrites every such literal downstream of a vitprune token op: the
literal is located by shape propagation (it must sit at the output axis the input's token axis maps to
through the reshape), not by its value alone, and a literal it cannot place is refused by node name.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from vitprune.errors import CaptureError, PassError
from vitprune.ops.modules import LEAF_MODULES

aten = torch.ops.aten
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.expand}
_SCALAR_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod}
_INT64_MAX = 2 ** 63 - 1
#: ops whose list argument is the shape of the input's trailing axes (``normalized_shape``)
_TRAILING_SHAPE_OPS = {aten.layer_norm, aten.native_layer_norm, aten.rms_norm}


def plain_graph_module(program: torch.export.ExportedProgram, class_name: str = "ExportedViT") -> fx.GraphModule:
    """An ``ExportedProgram`` as a plain, trainable-mode-switchable ``fx.GraphModule`` taking one image.

    ``program.module()`` refuses ``.eval()`` and carries a pytree code generator and an input guard;
    here the graph is copied with the standard code generator and the guard call removed (the batch
    axis is dynamic, every other size is what the model was exported at, which the analysis re-checks).
    """
    unlifted = program.module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in unlifted.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue
        if node.op == "output":
            out = node.args[0]
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
            graph.output(fx.map_arg(out, env.__getitem__))
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
    gm = fx.GraphModule(unlifted, graph, class_name=class_name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval()


def capture_export(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` ``model`` in eval mode, batch axis dynamic; a plain GraphModule (see above).

    Raises:
        CaptureError: the exporter fails (its first line is given).
    """
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    was = model.training
    model.eval()
    try:
        program = torch.export.export(model, (example_input,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # the exporter raises many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {reason}") from exc
    finally:
        model.train(was)
    gm = plain_graph_module(program, class_name=type(model).__name__)
    drop_noop_attention_masks(gm, example_input)
    return gm


def drop_noop_attention_masks(gm: fx.GraphModule, example_input: torch.Tensor) -> list[str]:
    """Remove attention masks that mask nothing: image-independent and all-true (boolean) or all-zero
    (additive) on the example. Hugging Face models export one ``[B, 1, N, N]`` mask built from
    ``arange(N)`` into every SDPA call; it holds no information, yet it is indexed by token position,
    so a pruned model would have to gather it. Dropping it is exact (verification compares outputs with
    the model's own forward). Returns the names of the SDPA nodes changed."""
    from vitprune.frontends.fx import RecordValues, to_opgraph

    sdpa = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is aten.scaled_dot_product_attention]
    masks = {n: n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) for n in sdpa}
    masks = {n: m for n, m in masks.items() if isinstance(m, fx.Node)}
    if not masks:
        return []
    og = to_opgraph(gm, example_input)
    record = RecordValues(gm, {m.name for m in masks.values()})
    with torch.no_grad():
        record.run(example_input)
    changed = []
    for node, mask in masks.items():
        v = record.values[mask.name]
        noop = bool(v.all()) if v.dtype == torch.bool else bool((v == 0).all())
        if og.is_data(mask.name) or not noop:
            continue
        if "attn_mask" in node.kwargs:
            node.update_kwarg("attn_mask", None)
        else:
            node.update_arg(3, None)
        changed.append(node.name)
    gm.recompile()  # the mask's own nodes stay (dead but harmless) so every original node is still there
    return changed


def _shape_of(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(v) for v in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _holds_token_count(entry: Any, num_tokens: int) -> bool:
    """A size entry that is the token count, or scalar arithmetic on it (``s0 * 197``: batch × tokens)."""
    if isinstance(entry, int):
        return entry == num_tokens
    if isinstance(entry, fx.Node) and entry.op == "call_function" and entry.target in _SCALAR_OPS:
        return any(_holds_token_count(a, num_tokens) for a in entry.args)
    return False


def respecialise_token_literals(gm: fx.GraphModule, num_tokens: int) -> int:
    """Rewrite the token-count literals downstream of vitprune's token ops (module docstring).

    ``num_tokens``: tokens in the original stream (prefix + patches); the original graph's shapes must
    be in ``node.meta["tensor_meta"]`` (the analysis put them there). A reshape entry holding the count
    becomes ``-1`` or the input's ``sym_size``; a slice that ends at the token count ends "at the end".

    Returns:
        How many literals were rewritten.

    Raises:
        PassError: a node downstream of a token op holds the token count where it cannot be rewritten
            (the node is named).
    """
    leaves = tuple(LEAF_MODULES.values())
    changed = {n for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), leaves)}
    rewritten = 0
    for node in gm.graph.nodes:  # topological: a node is downstream once any input is
        if node in changed or not any(i in changed for i in node.all_input_nodes):
            continue
        changed.add(node)
        packet = getattr(node.target, "overloadpacket", None)
        source = node.args[0] if node.args else None
        in_shape, out_shape = _shape_of(source), _shape_of(node)
        if packet in _RESHAPES and out_shape is not None:
            sizes = list(node.args[1])
            hits = [p for p, v in enumerate(sizes) if _holds_token_count(v, num_tokens)]
            if not hits:
                continue
            # With every other entry fixed (or the batch), -1 takes the one size that holds the token
            # count: numel fixes it, whatever the count becomes. The propagated shape confirms the place.
            p = hits[0]
            refuse = PassError(f"node {node.name!r} ({packet.__name__} to {sizes}) holds the token count {num_tokens} "
                               "where vitprune cannot re-specialise it")
            if len(hits) != 1 or out_shape[p] % num_tokens or any(isinstance(v, int) and v < -1 for v in sizes):
                raise refuse
            if -1 in sizes or packet is aten.expand:
                # -1 is taken: read the size off the input's token axis, the one axis that lands on p
                # with the same element count before it (propagated shapes)
                axes = [a for a in range(len(in_shape or ())) if in_shape[a] == out_shape[p] == num_tokens
                        and math.prod(in_shape[:a]) == math.prod(out_shape[:p])]
                if len(axes) != 1:
                    raise refuse
                with gm.graph.inserting_before(node):
                    sizes[p] = gm.graph.call_function(aten.sym_size.int, (source, axes[0]))
            else:
                sizes[p] = -1
            node.args = (source, sizes, *node.args[2:])
            rewritten += 1
        elif packet is aten.slice and in_shape is not None:
            dim, start, end = (list(node.args) + [0, None, None])[1:4]
            if isinstance(end, int) and end == num_tokens and in_shape[dim] == num_tokens:
                node.args = (source, dim, start, _INT64_MAX, *node.args[4:])
                rewritten += 1
        elif packet in (aten.split_with_sizes, aten.split) and in_shape is not None:
            rewritten += _respecialise_split(gm, node, in_shape, num_tokens)
        elif packet in _TRAILING_SHAPE_OPS and out_shape is not None and len(node.args[1]) < len(out_shape) - 1:
            continue  # normalized_shape covers the trailing (channel) axes only: a width equal to the count is no literal
        elif packet is aten.unflatten and out_shape is not None and _unflattens_last_axis(node, out_shape):
            continue  # splits the channels (an attention's packed q, k, v): its sizes are no token count
        elif packet is not None and any(isinstance(a, (list, tuple)) and num_tokens in a for a in node.args[1:]):
            raise PassError(f"node {node.name!r} ({packet.__name__}) holds the token count {num_tokens} in its "
                            "arguments and reads the pruned token stream: vitprune cannot re-specialise it")
    gm.graph.lint()
    gm.recompile()
    return rewritten


def _unflattens_last_axis(node: fx.Node, out_shape: tuple[int, ...]) -> bool:
    """Whether ``aten.unflatten(x, dim, sizes)`` splits ``x``'s last axis (the channels in every layout
    vitprune reads), from its propagated output shape."""
    dim, sizes = (list(node.args) + [None, None])[1:3]
    if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
        return False
    rank = len(out_shape) - len(sizes) + 1
    return dim % rank == rank - 1


def _respecialise_split(gm: fx.GraphModule, node: fx.Node, in_shape: tuple[int, ...], num_tokens: int) -> int:
    """A split of the token axis into literal sizes (``split_with_sizes(q, [1, 64], -2)``: the prefix tokens
    off the patch tokens, as Hugging Face DINOv3 splits queries and keys for RoPE): the fixed leading sizes stay,
    the last (the patch tokens, to the end) becomes the input's token count at run time minus them. Returns 1
    when it rewrote the split, 0 when the split is not on a token-count axis.

    Raises:
        PassError: a split of the token axis into equal chunks (``aten.split(x, k)``: how many depends on the
            count), named by node.
    """
    dim = (list(node.args) + [None, 0])[2]
    dim = node.kwargs.get("dim", dim) % len(in_shape)
    sizes = node.args[1]
    if in_shape[dim] != num_tokens:
        return 0
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2 or not all(isinstance(v, int) for v in sizes[:-1]):
        raise PassError(f"node {node.name!r} ({node.target}) splits the token axis ({num_tokens} tokens) into "
                        f"chunks of {sizes}: vitprune cannot re-specialise it for the kept token count")
    source = node.args[0]
    with gm.graph.inserting_before(node):
        count = gm.graph.call_function(aten.sym_size.int, (source, dim))
        rest = gm.graph.call_function(operator.sub, (count, sum(sizes[:-1])))
    node.args = (source, [*sizes[:-1], rest], *node.args[2:])
    if node.target is not aten.split_with_sizes.default:
        node.target = aten.split_with_sizes.default
    return 1


def is_exported(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is an aten-level graph (captured by ``torch.export``)."""
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes if n.op == "call_function")

