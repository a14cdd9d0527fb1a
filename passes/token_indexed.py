"""Gather the tensors indexed by token position for the tokens each image keeps.

Part of following the kept tokens (:mod:`vitprune.passes.token_positions`). The analysis finds every
image-independent tensor with a token-sized axis where it meets image data after the token-stream start
(``ViTGraph.token_indexed``): RoPE sin/cos tables ``[P, d]`` multiplied into queries and keys (EVA-02, timm's
RoPE ViTs), relative-position biases ``[1, H, N, N]`` passed to attention as a mask (BEiT, ``vit_relpos``),
position embeddings added late. Found from the graph, not by family. Each use after a pruning point reads a
:class:`~vitprune.ops.modules.TokenIndexedGather` of the tensor by the live tokens' grid positions there:
``[B, 1, K, d]`` for a RoPE table, ``[B, H, K', K']`` for a bias (prefix tokens kept first; the per-image bias
costs ``B·H·K'²`` floats). A tensor whose token axes cannot be told is refused by name.
"""

from __future__ import annotations

from torch import fx

from vitprune.graph.analysis import ViTGraph
from vitprune.ops.modules import TokenIndexedGather
from vitprune.passes.base import node_named
from vitprune.passes.token_positions import PositionChain, call_leaf


def gathered_uses(vit: ViTGraph) -> list[dict]:
    """The token-indexed uses a drop must gather (every entry of ``vit.token_indexed``)."""
    return list(vit.token_indexed)


def gather_token_indexed(gm: fx.GraphModule, vit: ViTGraph, chain: PositionChain) -> dict:
    """Replace every token-indexed tensor's use after a pruning point by its per-image gather. Returns
    ``{"gathered": [(tensor, used by), ...]}``."""
    gathered = []
    for use in gathered_uses(vit):
        user, table = node_named(gm, use["used_by"]), node_named(gm, use["node"])
        state = chain.state_of(user)
        if state is None:
            continue  # used before any token is dropped
        # the pass may have put a node of its own between the tensor and its user (token-merge adds its
        # proportional-attention mask to a relative-position bias): gather where the tensor is read now
        readers = [user] if table in user.all_input_nodes else [u for u in table.users if user in u.users]
        for reader in readers:
            with gm.graph.inserting_before(reader):
                new = call_leaf(gm, "token_indexed_gather",
                                TokenIndexedGather(vit.num_prefix_tokens, use["rank"],
                                                   [(a["axis"], a["with_prefix"]) for a in use["token_axes"]]),
                                (table, state[1]))
            reader.replace_input_with(table, new)
        gathered.append([use["node"], use["used_by"]])
    return {"gathered": gathered}
