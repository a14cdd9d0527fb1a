"""Capture a model as a ``torch.fx.GraphModule``: symbolic trace, or ``torch.export`` when that fails.

Symbolic trace leaves: torch.nn's own modules (fx's default) and vitprune's inserted modules. Every forward
argument after the image is fixed to its default (``concrete_args``), so timm blocks whose forward
takes ``attn_mask`` / ``is_causal`` trace with those fixed, and the captured graph takes one input.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import fx, nn

from vitprune.errors import CaptureError
from vitprune.frontends.export import capture_export
from vitprune.ops.modules import LEAF_MODULES


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in LEAF_MODULES.values():
            return True
        return super().is_leaf_module(m, module_qualified_name)


def require_one_image_input(model: nn.Module) -> None:
    """Refuse a model whose forward needs more than the image batch.

    Raises:
        CaptureError: a forward parameter after the first has no default (a NaFlex model, Hugging Face
            ``Siglip2VisionModel``, takes patchified ``pixel_values [B, N, C·p·p]`` with ``pixel_attention_mask``
            and ``spatial_shapes``); the message names them and the input vitprune expects.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    needed = [p.name for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
              and p.default is inspect.Parameter.empty]
    if needed:
        first = params[0].name if params else "x"
        raise CaptureError(
            f"forward needs {', '.join(repr(n) for n in needed)} besides {first!r}: vitprune rewrites models called "
            "with one image batch [B, C, H, W] alone (a patchified input [B, N, C*p*p] with a patch mask and grid "
            "shapes, as NaFlex models take, is not supported)"
        )


def _concrete_args(model: nn.Module) -> dict[str, object]:
    """Every forward parameter after the first, fixed to its default value."""
    require_one_image_input(model)
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        concrete[p.name] = p.default
    return concrete


def _drop_concrete_placeholders(gm: fx.GraphModule) -> None:
    """Remove the placeholders fx keeps for concrete args, with the guards it builds on them.

    fx checks a concrete arg at run time (``_assert_is_none(attn_mask)``, ``_assert(is_causal ==
    False)``); those guard subgraphs have no other consumer, so the placeholder goes with them.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        guards: list[fx.Node] = []
        frontier, seen = [ph], {ph}
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user not in seen:
                    seen.add(user)
                    guards.append(user)
                    frontier.append(user)
        used_outside = any(u not in seen for n in guards for u in n.users)
        if used_outside or any(n.op == "output" for n in guards):
            raise CaptureError(f"the traced graph uses forward argument {ph.target!r} beyond a guard")
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in sorted(guards, key=order.__getitem__, reverse=True):
            graph.erase_node(node)
        graph.erase_node(ph)
    graph.lint()
    gm.recompile()


def capture(model: nn.Module, example_input: torch.Tensor | None = None, frontend: str = "auto") -> fx.GraphModule:
    """Capture ``model`` as a GraphModule taking one image ``[B, C, H, W]``.

    ``frontend="fx"``: ``torch.fx`` symbolic trace (torch-level ops, leaves kept). ``"export"``:
    ``torch.export`` with a dynamic batch (aten-level ops; :mod:`vitprune.frontends.export`), needs
    ``example_input``. ``"auto"`` (default): symbolic trace, and ``torch.export`` when that fails and an
    ``example_input`` is given. A GraphModule (a model vitprune loaded, rewrote or captured) is returned as it is.

    Raises:
        CaptureError: the model cannot be captured; the message gives each frontend's reason.
    """
    if isinstance(model, fx.GraphModule):
        return model
    if frontend not in ("auto", "fx", "export"):
        raise CaptureError(f"unknown frontend {frontend!r}; expected auto, fx or export")
    if frontend == "export":
        if example_input is None:
            raise CaptureError("the torch.export frontend needs an example input")
        with _module_state_kept(model):
            gm = capture_export(model, example_input)
    else:
        try:
            with _module_state_kept(model):
                gm = _symbolic_trace(model)
        except CaptureError as traced:
            if frontend == "fx" or example_input is None:
                raise
            try:
                with _module_state_kept(model):
                    gm = capture_export(model, example_input)
            except CaptureError as exported:
                raise CaptureError(f"{traced}; {exported}") from exported
    gm.train(model.training)
    _record_origin(model, gm)
    return gm


_CONTAINERS = (dict, list, set)


@contextlib.contextmanager
def _module_state_kept(model: nn.Module) -> Iterator[None]:
    """Leave every submodule's attributes as they were before a capture, whatever the capture did.

    Tracing runs the model's forward on proxies (fx) or fake tensors (export); a forward that caches
    something on its module keeps those: timm's LeViT stores ``attention_biases[:, idxs]`` in
    ``attention_bias_cache`` in eval mode, so after one trace the cache holds an fx Proxy of a dead graph and
    the next capture fails with "Argument 'getitem_6' ... does not belong to this Graph". Every attribute is
    put back (added ones removed, replaced ones restored) and every dict/list/set attribute is refilled in
    place with its old items, so references to those containers elsewhere stay valid. Tensor values are not
    copied: capture never writes into parameters or buffers.
    """
    saved = []
    for module in model.modules():
        attrs = dict(vars(module))
        contents = {k: (type(v), list(v.items()) if isinstance(v, dict) else list(v))
                    for k, v in attrs.items() if type(v) in _CONTAINERS}
        saved.append((module, attrs, contents))
    try:
        yield
    finally:
        for module, attrs, contents in saved:
            state = vars(module)
            for key in [k for k in state if k not in attrs]:
                del state[key]
            state.update(attrs)
            for key, (kind, items) in contents.items():
                container = attrs[key]
                container.clear()
                if kind is dict:
                    container.update(items)
                elif kind is list:
                    container.extend(items)
                else:
                    container.update(items)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    concrete = _concrete_args(model)
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, AssertionError...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.fx could not trace {type(model).__name__}: {reason}") from exc
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    _drop_concrete_placeholders(gm)
    return gm


def _record_origin(model: nn.Module, gm: fx.GraphModule) -> None:
    """Keep what the module knew of its source and input size (timm's data config) on the graph."""
    from vitprune.errors import VitpruneError
    from vitprune.io.origin import default_input_size, source_of

    from vitprune.io.preprocess import metadata

    meta = {"source": source_of(model), "recipe": [], "preprocessing": metadata(model)}
    try:
        meta["input_shape"] = [1, *default_input_size(model)]
    except VitpruneError:
        pass  # unknown: callers pass an input size
    gm.meta["vitprune"] = meta
