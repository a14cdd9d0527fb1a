"""token-restore: put dropped tokens back in place before every reader that needs all of them.

Part of following the kept tokens (:mod:`vitprune.passes.token_positions`), for the readers a drop would
otherwise change:

- a **dense readout** (``Readout.kind == "tokens"``: the token sequence as an output, ``forward_features``,
  a grid reshape for a segmentation / depth / saliency head) or a readout that reads patch tokens by position
  (``x[:, 5]``, a mean over part of the grid): every token is restored right after the last residual add, so
  the final norm and the head see ``prefix + P`` tokens in grid order;
- **other readers outside the blocks** (an intermediate block's tokens read by a DPT-style head, a second
  output): each reads its own restored copy of the stream it read.

Dropped tokens come back by the pass's ``restore`` rule (:data:`~vitprune.ops.token_ops.RESTORE_RULES`):
``"last"``, the features they had when they were dropped (they stopped being updated: DynamicViT's and
"Expediting Large-Scale ViTs for Dense Prediction"'s choice, arXiv 2210.01035 §3.2), or ``"nearest"``, the
current features of the kept token most similar to them at the first pruning point (cosine; the most
similar token propagated through the later blocks). A :class:`~vitprune.ops.modules.TokenRestore` before the
reader scatters the live tokens into the canvas of last features (or of nearest kept tokens). After token merging, each grid position takes instead the features of the merged token
that holds it (:class:`~vitprune.ops.modules.TokenUnmerge`: ToMe's unmerge). Every shape is static (``P``
is fixed); with every token kept, a reader sees exactly what it saw before.
"""

from __future__ import annotations

from torch import fx

from vitprune.errors import PassError
from vitprune.graph.analysis import ViTGraph
from vitprune.ops.modules import TokenRestore, TokenUnmerge
from vitprune.ops.token_ops import RESTORE_RULES
from vitprune.passes.base import node_named, readout_is_position_free
from vitprune.passes.token_positions import PositionChain, call_leaf


def restore_points(vit: ViTGraph) -> tuple[str | None, list[dict]]:
    """What needs every token back: ``(stream end to restore for the readout or None, restorable readers)``."""
    end = None
    if vit.readout.kind == "tokens" or not readout_is_position_free(vit):
        end = vit.blocks[-1].residual_adds[-1]
    return end, [r for r in vit.stream_readers if r["restorable"]]


def check_restore_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`~vitprune.ops.token_ops.RESTORE_RULES`.

    Raises:
        PassError: any other rule.
    """
    if rule not in RESTORE_RULES:
        raise PassError(f"unknown restore rule {rule!r}; expected one of {', '.join(RESTORE_RULES)}")
    return rule


def insert_token_restore(gm: fx.GraphModule, vit: ViTGraph, chain: PositionChain, rule: str = "last") -> dict:
    """Restore every token before the readers :func:`restore_points` finds (node names of ``vit``); ``chain``
    from :func:`~vitprune.passes.token_positions.track_positions` with a canvas; ``rule``: how a dropped token
    comes back (:func:`~vitprune.ops.token_ops.restore_tokens`; token merging always unmerges). Returns what
    was inserted.

    Raises:
        PassError: no pruning point before the readout (nothing to restore from), or an unknown ``rule``.
    """
    end, readers = restore_points(vit)
    check_restore_rule(rule)
    # "nearest" compares every patch at the first pruning point, where all of them are alive: the first canvas
    reference = (chain.points[0][1],) if rule == "nearest" and not chain.unmerge else ()

    def restore(value: fx.Node, state, where) -> fx.Node:
        with where:
            if chain.unmerge:  # state: (holders, positions)
                return call_leaf(gm, "token_unmerge", TokenUnmerge(vit.num_prefix_tokens), (value, state[0]))
            module = TokenRestore(vit.num_prefix_tokens, vit.num_patches, rule)
            return call_leaf(gm, "token_restore", module, (value, *state, *reference))

    restored = []
    outputs = chain.token_outputs()
    for r in readers:
        reader, source = node_named(gm, r["node"]), node_named(gm, r["source"])
        # a pass that prunes right after the value this reader reads has moved the reader onto its own output
        # (``insert_on_stream``): restore whatever stream value the reader reads now
        for value in [a for a in reader.all_input_nodes if a is source or a in outputs]:
            state = chain.state_of(value)
            if state is not None:
                reader.replace_input_with(value, restore(value, state, gm.graph.inserting_before(reader)))
                restored.append(r["node"])
    if end is not None:
        stream = node_named(gm, end)
        state = chain.state_of(stream)
        if state is None:
            raise PassError(f"no pruning point before the readout at node {end!r}: nothing to restore")
        new = restore(stream, state, gm.graph.inserting_after(stream))
        stream.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        restored.append("readout")
    return {"restored_before": restored, "pruning_points": len(chain.points),
            "restore": "unmerge" if chain.unmerge else rule}
