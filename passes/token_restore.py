"""token-restore: put dropped tokens back in place before every reader that needs all of them.

Run by the pass manager right after a pass that drops tokens (``restores_tokens``), on the same analysis,
when the graph has readers a drop would otherwise change:

- a **dense readout** (``Readout.kind == "tokens"``: the token sequence as an output, ``forward_features``,
  a grid reshape for a segmentation / depth / saliency head) or a readout that reads patch tokens by position
  (``x[:, 5]``, a mean over part of the grid): every token is restored right after the last residual add, so
  the final norm and the head see ``prefix + P`` tokens in grid order;
- **other readers outside the blocks** (an intermediate block's tokens read by a DPT-style head, a second
  output): each reads its own restored copy of the stream it read.

Dropped tokens come back with the features they had when they were dropped (they stopped being updated:
DynamicViT's and "Expediting Large-Scale ViTs for Dense Prediction"'s choice, arXiv 2210.01035 §3.2):
each token module reports its kept indices (``return_kept``); a :class:`~vitprune.ops.modules.DroppedTokenCanvas`
beside it keeps the canvas of last features ``[B, P, C]`` and the kept tokens' grid positions; a
:class:`~vitprune.ops.modules.TokenRestore` before the reader scatters the live tokens into the canvas.
Every shape is static (``P`` is fixed); with every token kept, a reader sees exactly what it saw before.
"""

from __future__ import annotations

import operator

from torch import fx

from vitprune.errors import PassError
from vitprune.graph.analysis import ViTGraph
from vitprune.ops.modules import DroppedTokenCanvas, LifespanGather, TokenModule, TokenRestore
from vitprune.passes.base import node_named, readout_is_position_free, unique_attr_name


def restore_points(vit: ViTGraph) -> tuple[str | None, list[dict]]:
    """What needs every token back: ``(stream end to restore for the readout or None, restorable readers)``."""
    end = None
    if vit.readout.kind == "tokens" or not readout_is_position_free(vit):
        end = vit.blocks[-1].residual_adds[-1]
    return end, [r for r in vit.stream_readers if r["restorable"]]


def _call(gm: fx.GraphModule, base: str, module, args: tuple) -> fx.Node:
    name = unique_attr_name(gm, base)
    gm.add_submodule(name, module)
    return gm.graph.call_module(name, args)


def _kept_output(gm: fx.GraphModule, node: fx.Node, mod: TokenModule) -> fx.Node:
    """Make the token module at ``node`` return its kept indices; returns the node holding them."""
    mod.return_kept = True
    if isinstance(mod, LifespanGather):  # already returns (tokens, lives): the order comes third
        with gm.graph.inserting_after(node):
            return gm.graph.call_function(operator.getitem, (node, 2))
    with gm.graph.inserting_after(node):
        tokens = gm.graph.call_function(operator.getitem, (node, 0))
    with gm.graph.inserting_after(tokens):
        kept = gm.graph.call_function(operator.getitem, (node, 1))
    node.replace_all_uses_with(tokens, delete_user_cb=lambda u: u not in (tokens, kept))
    return kept


def _token_outputs(after: dict) -> set[fx.Node]:
    """The stream outputs (``[0]``) of the token modules in ``after``."""
    return {u for n in after for u in n.users if u.target is operator.getitem and u.args[1] == 0}


def insert_token_restore(gm: fx.GraphModule, vit: ViTGraph) -> dict | None:
    """Restore every token before the readers :func:`restore_points` finds (node names of ``vit``, the analysis
    of the graph before the pass). Returns what was inserted, for the report, or None when nothing needs it.

    Raises:
        PassError: a token module that cannot report its kept tokens (token merging: its unmerge is not built).
    """
    end, readers = restore_points(vit)
    if end is None and not readers:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    stages = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TokenModule)]
    if not stages:
        return None
    state: list[tuple[fx.Node, fx.Node, fx.Node]] = []  # (token module node, canvas, positions) in graph order
    canvas = positions = None
    for node in stages:
        mod = gm.get_submodule(node.target)
        if not hasattr(mod, "_all_kept"):
            raise PassError(f"{type(mod).__name__} at node {node.name!r} cannot put its tokens back for the dense "
                            "reader(s) yet")
        kept = _kept_output(gm, node, mod)
        with gm.graph.inserting_after(kept):
            pair = _call(gm, "token_canvas", DroppedTokenCanvas(vit.num_prefix_tokens, vit.num_patches),
                         (node.args[0], kept, positions, canvas))
        with gm.graph.inserting_after(pair):
            canvas = gm.graph.call_function(operator.getitem, (pair, 0))
        with gm.graph.inserting_after(canvas):
            positions = gm.graph.call_function(operator.getitem, (pair, 1))
        state.append((node, canvas, positions))

    after = {n: (c, p) for n, c, p in state}

    def state_of(value: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """Canvas and positions that describe the stream value ``value`` (None: no token dropped before it).
        A token module's output (its ``[0]``) is described by the state after it; an original node by the
        state of the last pruning point before it."""
        if value.op == "call_function" and value.target is operator.getitem and value.args[0] in after:
            return after[value.args[0]]
        earlier = [(c, p) for n, c, p in state if order[n] < order[value]]
        return earlier[-1] if earlier else None

    def restore(value: fx.Node, found: tuple[fx.Node, fx.Node], where) -> fx.Node:
        with where:
            return _call(gm, "token_restore", TokenRestore(vit.num_prefix_tokens, vit.num_patches), (value, *found))

    restored = []
    for r in readers:
        reader = node_named(gm, r["node"])
        # a pass that prunes right after the value this reader reads has moved the reader onto its own output
        # (``insert_on_stream``): restore whatever stream value the reader reads now
        for value in [a for a in reader.all_input_nodes if a is node_named(gm, r["source"]) or a in _token_outputs(after)]:
            found = state_of(value)
            if found is not None:
                reader.replace_input_with(value, restore(value, found, gm.graph.inserting_before(reader)))
                restored.append(r["node"])
    if end is not None:
        stream = node_named(gm, end)
        found = state_of(stream)
        if found is None:  # cannot happen after a pass that dropped tokens before the last block; be safe
            raise PassError(f"no pruning point before the readout at node {end!r}")
        new = restore(stream, found, gm.graph.inserting_after(stream))
        stream.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        restored.append("readout")
    gm.graph.lint()
    gm.recompile()
    return {"restored_before": restored, "pruning_points": len(state)}
