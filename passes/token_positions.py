"""Follow the kept tokens: what every tensor indexed by token position needs after a pass drops tokens.

Run by the pass manager right after a pass that drops tokens (``restores_tokens``), on the analysis of the
graph before it. Each of the pass's token modules reports its kept indices (``return_kept``); beside it a
:class:`~vitprune.ops.modules.TokenPositions` follows the live tokens' grid positions (and, when a dense reader
needs them back, the canvas of every patch's last features). Then:

- :mod:`vitprune.passes.token_restore` puts every token back before dense readers;
- :mod:`vitprune.passes.token_indexed` gathers RoPE tables, relative-position biases and late position
  embeddings per image for the live tokens.

Every count is static; with every token kept, positions are ``arange(P)`` and every gather is the identity.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import fx

from vitprune.errors import PassError
from vitprune.graph.analysis import ViTGraph
from vitprune.ops.modules import LifespanGather, TokenHolders, TokenMerge, TokenModule, TokenPositions
from vitprune.passes.base import unique_attr_name


def call_leaf(gm: fx.GraphModule, base: str, module, args: tuple) -> fx.Node:
    """Register ``module`` under a fresh name and call it (at the graph's current insertion point)."""
    name = unique_attr_name(gm, base)
    gm.add_submodule(name, module)
    return gm.graph.call_module(name, args)


@dataclass
class PositionChain:
    """The pruning points of a rewritten graph, in graph order, with the state after each."""

    order: dict[fx.Node, int]  # graph order before the chain was inserted
    # (token module node, canvas or None, positions); after token merging the canvas slot holds the
    # holders (:class:`TokenHolders`: which merged token holds each grid position) and ``unmerge`` is set
    points: list[tuple[fx.Node, fx.Node | None, fx.Node]]
    unmerge: bool = False

    def state_of(self, value: fx.Node) -> tuple[fx.Node | None, fx.Node] | None:
        """``(canvas, positions)`` describing the tokens of ``value`` (None: no token dropped before it).

        A token module's output (its ``[0]``) is described by the state after that module; any other node by
        the state of the last pruning point before it in graph order."""
        after = {n: (c, p) for n, c, p in self.points}
        if value.op == "call_function" and value.target is operator.getitem and value.args[0] in after:
            return after[value.args[0]]
        if value not in self.order:
            raise PassError(f"node {value.name!r} is not in the graph the pass rewrote")
        earlier = [(c, p) for n, c, p in self.points if self.order[n] < self.order[value]]
        return earlier[-1] if earlier else None

    def token_outputs(self) -> set[fx.Node]:
        """The stream outputs (``[0]``) of the token modules."""
        return {u for n, _, _ in self.points for u in n.users if u.target is operator.getitem and u.args[1] == 0}


def _kept_output(gm: fx.GraphModule, node: fx.Node, mod: TokenModule) -> fx.Node:
    """Make the token module at ``node`` return its kept indices; returns the node holding them."""
    mod.return_kept = True
    if isinstance(mod, (LifespanGather, TokenMerge)):  # already return (tokens, lives / sizes): kept comes third
        with gm.graph.inserting_after(node):
            return gm.graph.call_function(operator.getitem, (node, 2))
    with gm.graph.inserting_after(node):
        tokens = gm.graph.call_function(operator.getitem, (node, 0))
    with gm.graph.inserting_after(tokens):
        kept = gm.graph.call_function(operator.getitem, (node, 1))
    node.replace_all_uses_with(tokens, delete_user_cb=lambda u: u not in (tokens, kept))
    return kept


def track_positions(gm: fx.GraphModule, vit: ViTGraph, canvas: bool) -> PositionChain | None:
    """Insert a :class:`TokenPositions` beside every token module of ``gm`` (None: the graph has none).

    After token merging (every token module a :class:`TokenMerge`) the canvas is replaced by the holders
    (:class:`TokenHolders`), and a reader gets merged tokens unmerged (:class:`TokenUnmerge`).

    Raises:
        PassError: a token module that cannot report its kept tokens, or a graph that both merges and drops.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    stages = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TokenModule)]
    if not stages:
        return None
    merges = [isinstance(gm.get_submodule(n.target), TokenMerge) for n in stages]
    if any(merges) and not all(merges):
        raise PassError(f"the graph both merges and drops tokens (node {stages[merges.index(True)].name!r} merges): "
                        "tokens cannot be put back through both")
    points = []
    state: tuple[fx.Node | None, fx.Node | None] = (None, None)  # (positions, canvas or holders) so far
    for node, merge in zip(stages, merges):
        mod = gm.get_submodule(node.target)
        if not hasattr(mod, "_all_kept") or mod.num_prefix_tokens != vit.num_prefix_tokens:
            raise PassError(f"{type(mod).__name__} at node {node.name!r} cannot report the tokens it keeps")
        kept = _kept_output(gm, node, mod)
        if merge:  # a merged token sits at its destination's position; the holders say who holds each patch
            holders = None
            if canvas:  # only an unmerge reads the holders: the merge computes its sources only then
                mod.return_sources = True
                with gm.graph.inserting_after(kept):
                    sources = gm.graph.call_function(operator.getitem, (node, 3))
                with gm.graph.inserting_after(sources):
                    holders = call_leaf(gm, "token_holders", TokenHolders(), (sources, state[1]))
            where = holders or kept
            track = TokenPositions(vit.num_prefix_tokens, vit.num_patches, canvas=False)
            with gm.graph.inserting_after(where):
                pair = call_leaf(gm, "token_positions", track, (node.args[0], kept, state[0]))
            with gm.graph.inserting_after(pair):
                positions = gm.graph.call_function(operator.getitem, (pair, 1))
            state = (positions, holders)
            points.append((node, holders, positions))
            continue
        with gm.graph.inserting_after(kept):
            pair = call_leaf(gm, "token_positions", TokenPositions(vit.num_prefix_tokens, vit.num_patches, canvas),
                             (node.args[0], kept, *state))
        with gm.graph.inserting_after(pair):
            canvas_node = gm.graph.call_function(operator.getitem, (pair, 0)) if canvas else None
        with gm.graph.inserting_after(canvas_node or pair):
            positions = gm.graph.call_function(operator.getitem, (pair, 1))
        state = (positions, canvas_node)
        points.append((node, canvas_node, positions))
    return PositionChain(order, points, unmerge=all(merges))


def follow_kept_tokens(gm: fx.GraphModule, vit: ViTGraph, restore: str = "last") -> dict | None:
    """After a pass dropped tokens: restore them before dense readers (by the ``restore`` rule,
    :func:`~vitprune.passes.token_restore.insert_token_restore`) and gather the token-indexed tensors (``vit``: the
    analysis of the graph before the pass). Returns what was inserted (for the report), or None."""
    from vitprune.passes.token_indexed import gather_token_indexed, gathered_uses
    from vitprune.passes.token_restore import insert_token_restore, restore_points

    end, readers = restore_points(vit)
    uses = gathered_uses(vit)
    if end is None and not readers and not uses:
        return None
    chain = track_positions(gm, vit, canvas=end is not None or bool(readers))
    if chain is None:
        return None
    done = {}
    if end is not None or readers:
        done["token_restore"] = insert_token_restore(gm, vit, chain, restore)
    if uses:
        done["token_indexed"] = gather_token_indexed(gm, vit, chain)
    gm.graph.lint()
    gm.recompile()
    return done
