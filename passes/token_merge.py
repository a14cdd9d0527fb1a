"""token-merge: ToMe, Token Merging (Bolya et al., arXiv 2210.09461), as a graph rewrite.

Where: in every merging block ``b`` (from ``first_block``, default 0), right after the attention residual
add, a :class:`~vitprune.ops.modules.TokenMerge` takes the stream ``[B, N, C]``, the block's attention keys
``[B, H, N, d]`` (the SDPA's key input, found by the analysis) and the token sizes so far, and returns the
stream with ``r_b`` tokens merged away, ``[B, N - r_b, C]``, and the new sizes ``[B, N - r_b, 1]``. The
MLP branch and the next residual add read the merged stream, as in ToMe (§3: merging between the
attention and the MLP, so the attention's keys are the similarity metric for free). Nothing of the model
is re-implemented: ToMe's timm patch replaces the blocks' forward and so drops LayerScale and qk-norm;
here the model's own nodes stay and only the merge is inserted, so LayerScale, qk-norm, pre-norm
variants and drop path are kept. Keep-all verification (every token kept) is node-for-node exact.

Merging: bipartite soft matching (ToMe §3) on the keys averaged over heads, the patch tokens alternating
into sets A and B; prefix tokens (CLS, registers, distillation) are left out of the matching, so they are
never merged and never merged into (ToMe protects CLS with a score of -inf). Merged tokens are the
size-weighted average of what they hold. The tokens that stay keep their original order (ToMe's merge.py
returns the unmerged A tokens, then B: any fixed order serves a permutation-equivariant block; keeping the
original one makes ``r = 0`` the identity and keeps later blocks' A/B alternation spatial).

Why a matmul, not a scatter: merge.py adds each merged token into its destination with
``scatter_reduce``; ONNX Runtime and TensorRT refuse ``ScatterElements`` with a reduction
(``shared/DESIGN.md``). Here one flat gather puts the kept and the merged-away tokens side by side, and a
one-hot assignment ``[B, N - r, r]`` times the merged-away tokens adds them to their destinations: a
small batched matmul, static shapes, exportable (:func:`vitprune.ops.token_ops.merge_tokens`).

Proportional attention (ToMe §3): every block after the first merge attends with ``log(size)`` added to
each key's score, so a key holding ``s`` tokens counts as ``s`` keys. It is wired as the additive float
``attn_mask`` ``[B, 1, 1, N]`` of the block's SDPA (:class:`~vitprune.ops.modules.ProportionalAttentionMask`,
the way lifespan-gather feeds its key mask), so the fused kernel stays; a mask the SDPA already has (BEiT's
relative-position bias) is kept and the two are added. ``proportional_attention=False`` leaves the
attention as it is (ToMe's advice for training and for MAE models).

Tokens indexed by position (after the pass, :mod:`vitprune.passes.token_positions`): a merged token sits at
its destination's grid position, so RoPE tables (EVA-02) and relative-position biases (BEiT) are gathered
for the tokens that stay, as after a drop. Dense readers (a token-sequence output, a segmentation head, a
DPT-style tap) get every token back unmerged: each grid position takes the features of the merged token
holding it (ToMe for Stable Diffusion's unmerge, arXiv 2303.17604).

Schedule: ``r`` an int is ToMe's constant ``r``: block ``b`` merges ``min(r, P_b // 2)`` of its ``P_b``
patch tokens (merge.py caps ``r`` the same way); a list gives each block's ``r`` exactly; ``flops`` solves
the constant ``r`` whose predicted FLOPs ratio is closest to the target
(:func:`vitprune.graph.keep_counts.solve_merge_for_flops`: in a merging block the attention sees ``N``
tokens, the MLP ``N - r``, whose FLOPs per token the FLOPs counter measures), then lets the first blocks merge
``r + 1`` where that lands closer (:func:`~vitprune.graph.keep_counts.refine_merge_schedule`; the record's
``merges`` holds each block's count). Every count is a Python int fixed here.

Mean-pool readouts average the merged tokens unweighted, as ToMe does: a merged token counts once however
many tokens it holds. A size-weighted mean would equal the original mean exactly when merged tokens are
equal; it is not done because it needs a node that reads the sizes between the readout's token slice and
its mean, which the analysis (``vitprune inspect``, ``vitprune show``, a rewrite of the rewritten model)
would no longer recognise as a token mean. CLS readouts are unaffected.

Needs: stream readers on the residual stream, token-indexed tensors whose token axes are known, no
earlier token op; the attention keys in merging blocks (an SDPA's key input, or ``k`` of a matmul attention's
``q @ kᵀ``, found by the analysis), and SDPA or matmul attention in every later block (proportional attention:
the SDPA's ``attn_mask``, or added to the scores before the softmax).
"""

from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from vitprune.errors import PassError, VitpruneError
from vitprune.frontends.fx import fx_digraph
from vitprune.graph.analysis import ViTGraph
from vitprune.graph.flops import flop_counter, frozen_parameters
from vitprune.graph.keep_counts import (merge_predicted_ratio, merge_tokens_per_block, min_keep_for,
                                        refine_merge_schedule, solve_merge_for_flops)
from vitprune.ops.modules import ProportionalAttentionMask, TokenMerge
from vitprune.passes.base import VitPass, node_named, register_pass, unique_attr_name


def parse_r(r: Any) -> int | list[int]:
    """``8`` / ``"8"`` -> ``8`` (every block); ``[0, 8, 8]`` / ``"0,8,8"`` -> a list (one per block).

    Raises:
        PassError: not an int or a list of ints, or a negative count.
    """
    if isinstance(r, str):
        parts = [p.strip() for p in r.split(",")]
        try:
            r = int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
        except ValueError:
            raise PassError(f"r must be an int or a comma-separated list of ints (one per block), got {r!r}") from None
    if isinstance(r, (list, tuple)):
        if not r or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
            raise PassError(f"r must be an int or a list of ints (one per block), got {r!r}")
        r = [int(v) for v in r]
    elif not isinstance(r, int) or isinstance(r, bool):
        raise PassError(f"r must be an int or a list of ints (one per block), got {r!r}")
    if min(r if isinstance(r, list) else [r]) < 0:
        raise PassError(f"r counts tokens merged per block and cannot be negative, got {r!r}")
    return r


class _NodeFlops(fx.Interpreter):
    """Runs the graph under a FLOPs counter and keeps each node's FLOPs in :attr:`flops`."""

    def __init__(self, gm: fx.GraphModule, counter) -> None:
        super().__init__(gm)
        self.counter, self.flops = counter, {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops[n.name] = self.counter.get_total_flops() - before
        return out


def measure_flops(gm: fx.GraphModule, vit: ViTGraph, x: torch.Tensor) -> tuple[int, list[int]]:
    """``(total, mlp)``: the model's FLOPs per image and, per block, the FLOPs per token of its residual
    branches after the attention (the part a merge before them saves), both as FLOPs are counted for the
    report (:func:`vitprune.graph.flops.flop_counter`). One eval forward on ``x``."""
    counter = flop_counter()
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad(), frozen_parameters(gm), counter:
            run = _NodeFlops(gm, counter)
            run.run(x)
    finally:
        gm.train(was)
    mlp, g = [], fx_digraph(gm)
    for b in vit.blocks:
        names: set[str] = set()
        for stream_in, branch_out in zip(b.residual_adds, b.residual_branches[1:]):
            names |= (nx.ancestors(g, branch_out) | {branch_out}) & nx.descendants(g, stream_in)
        mlp.append(round(sum(run.flops.get(n, 0) for n in names) / (x.shape[0] * b.tokens)))
    return int(counter.get_total_flops()) // x.shape[0], mlp


def _mask_of(sdpa: fx.Node) -> Any:
    return sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")


def _set_mask(sdpa: fx.Node, mask: fx.Node) -> None:
    if len(sdpa.args) > 3:  # torch.export graphs pass every argument by position
        sdpa.args = (*sdpa.args[:3], mask, *sdpa.args[4:])
    else:
        sdpa.update_kwarg("attn_mask", mask)


def _add_proportional_attention(gm: fx.GraphModule, sdpa: fx.Node, sizes: fx.Node) -> None:
    """Give ``sdpa`` ToMe's ``log(size)`` on its keys, composed with the mask it already has (a relative
    position bias, a boolean mask): :class:`ProportionalAttentionMask`."""
    name = unique_attr_name(gm, "proportional_attention")
    gm.add_submodule(name, ProportionalAttentionMask())
    base = _mask_of(sdpa)
    if base is not None and not isinstance(base, fx.Node):
        raise PassError(f"node {sdpa.name!r} has a constant attention mask ({type(base).__name__}) that proportional "
                        "attention cannot compose with (or pass proportional_attention=False)")
    with gm.graph.inserting_before(sdpa):
        mask = gm.graph.call_module(name, (sizes,) if base is None else (sizes, base))
    _set_mask(sdpa, mask)


def _add_to_scores(gm: fx.GraphModule, softmax: fx.Node, sizes: fx.Node) -> None:
    """Proportional attention in a matmul attention: ``log(size)`` added to the scores its ``softmax`` reads
    (:class:`ProportionalAttentionMask` with the scores as its base)."""
    name = unique_attr_name(gm, "proportional_attention")
    gm.add_submodule(name, ProportionalAttentionMask())
    scores = softmax.args[0]
    with gm.graph.inserting_before(softmax):
        biased = gm.graph.call_module(name, (sizes, scores))
    softmax.replace_input_with(scores, biased)


@register_pass
class TokenMergePass(VitPass):
    """Parameters: ``r`` (tokens merged per block: an int, ToMe's constant ``r``, or a list with one count
    per block) or ``flops`` (target FLOPs ratio, solved for a constant ``r``), ``first_block`` (first merging
    block for an int ``r`` or ``flops``, default 0), ``proportional_attention`` (default True)."""

    name = "token-merge"
    needs = ("readers_restorable", "token_indexed_gatherable", "no_token_ops")
    restores_tokens = True  # dense readers get every token back (unmerged); RoPE tables and biases follow

    def __init__(self, r: Any = None, flops: float | None = None, first_block: int = 0,
                 proportional_attention: bool = True, min_keep: int | None = None) -> None:
        if (r is None) == (flops is None):
            raise PassError("give exactly one of r (tokens merged per block, --r R) or a FLOPs target (--flops F)")
        if r is not None:
            r = parse_r(r)
            if isinstance(r, list) and first_block:
                raise PassError("first_block applies to an int r or a FLOPs target; "
                                "a list of r gives every block's count")
        if flops is not None and not 0.0 < float(flops) <= 1.0:
            raise PassError(f"FLOPs target must be in (0, 1], got {flops}")
        super().__init__(r=r, flops=float(flops) if flops is not None else None, first_block=int(first_block),
                         proportional_attention=bool(proportional_attention),
                         min_keep=None if min_keep is None else int(min_keep))
        self.solved_r: int | None = None  # the constant r a FLOPs target solved for

    @property
    def needs_visible_attention(self) -> bool:
        return True  # the attention keys are the similarity metric

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, self.rewrite(graph_module, self.analysis))

    def merges(self, vit: ViTGraph, total: int, mlp: list[int]) -> dict[int, int]:
        """``{block: r_b}`` for the blocks that merge (``r_b >= 1``), checked against the tokens alive there.

        Raises:
            PassError: ``first_block`` outside the model, a list of the wrong length, an ``r`` that leaves
                fewer than ``prefix + 1`` tokens or merges more than half the patch tokens of a block
                (bipartite matching merges one set into the other), or a FLOPs target out of reach.
        """
        p, L = self.params, vit.num_blocks
        if not 0 <= p["first_block"] < L:
            raise PassError(f"first_block must be in 0..{L - 1} for a model with {L} blocks, got {p['first_block']}")
        if p["flops"] is not None:
            try:
                least = min_keep_for(vit, p["min_keep"])
                self.solved_r = solve_merge_for_flops(vit, p["flops"], total, mlp, p["first_block"], min_keep=least)
            except VitpruneError as exc:  # keep_counts' refusal, as the pass's
                raise PassError(str(exc)) from exc
            return refine_merge_schedule(vit, self.solved_r, p["flops"], total, mlp, p["first_block"], min_keep=least)
        r = p["r"]
        if isinstance(r, int):
            wanted = {b: r for b in range(p["first_block"], L)}
        elif len(r) != L:
            raise PassError(f"a list of r needs one count per block: the model has {L} blocks, the list {len(r)}")
        else:
            wanted = dict(enumerate(r))
        alive, merges = vit.num_patches, {}
        for block, want in sorted(wanted.items()):
            merged = min(want, alive // 2) if isinstance(r, int) and block > p["first_block"] else want
            if alive - merged < 1:
                raise PassError(f"r={merged} in block {block} leaves fewer than {vit.num_prefix_tokens + 1} tokens "
                                f"(prefix + 1): block {block} has {alive} patch tokens")
            if merged > alive // 2:
                raise PassError(f"r={merged} in block {block} merges more than half of its {alive} patch tokens: "
                                f"bipartite matching (ToMe §3) merges at most {alive // 2} there")
            if merged:
                merges[block] = merged
                alive -= merged
        return merges

    def rewrite(self, gm: fx.GraphModule, vit: ViTGraph) -> bool:
        p = self.params
        total, mlp = measure_flops(gm, vit, self.example_input)
        merges = self.merges(vit, total, mlp)
        first = min(merges, default=vit.num_blocks)
        for b in merges:
            if vit.blocks[b].key_node is None:
                raise PassError(f"block {b} uses {vit.blocks[b].attention}: its attention keys, which token-merge "
                                "matches tokens by, are not in the graph")
        if p["proportional_attention"]:
            for block in vit.blocks[first + 1:]:
                if block.attention not in ("sdpa", "matmul-softmax"):
                    raise PassError(f"block {block.index} uses {block.attention}: proportional attention adds "
                                    "log(size) to the attention scores, which this op hides "
                                    "(or pass proportional_attention=False)")

        sizes = None
        alive = vit.num_patches
        for block in vit.blocks:
            if sizes is not None and p["proportional_attention"]:
                for a in block.attentions:  # each of a parallel block's attentions sees the merged sizes
                    add_log_size = _add_proportional_attention if block.attention == "sdpa" else _add_to_scores
                    add_log_size(gm, node_named(gm, a["attention_node"]), sizes)
            r = merges.get(block.index, 0)
            if not r:
                continue
            add, keys = node_named(gm, block.residual_adds[0]), node_named(gm, block.key_node)
            name = unique_attr_name(gm, "token_merge")
            gm.add_submodule(name, TokenMerge(vit.num_prefix_tokens, alive, r, block.index))
            with gm.graph.inserting_after(add):
                merge = gm.graph.call_module(name, (add, keys) if sizes is None else (add, keys, sizes))
            with gm.graph.inserting_after(merge):
                tokens = gm.graph.call_function(operator.getitem, (merge, 0))
            with gm.graph.inserting_after(tokens):
                sizes = gm.graph.call_function(operator.getitem, (merge, 1))
            add.replace_all_uses_with(tokens, delete_user_cb=lambda u: u is not merge)
            alive -= r
        gm.graph.lint()
        gm.recompile()
        self.record = {
            "num_patches": vit.num_patches, "num_prefix_tokens": vit.num_prefix_tokens,
            "r": p["r"] if p["r"] is not None else self.solved_r,
            "first_block": first if merges else None,
            "merges": {str(b): r for b, r in merges.items()},
            "tokens_per_block": merge_tokens_per_block(vit, merges),
            "tokens_after_merge": [n - merges.get(b, 0) for b, n in enumerate(merge_tokens_per_block(vit, merges))],
            "predicted_flops_ratio": merge_predicted_ratio(vit, merges, total, mlp),
            "proportional_attention": p["proportional_attention"],
        }
        return bool(merges)
