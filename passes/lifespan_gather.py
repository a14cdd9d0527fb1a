"""lifespan-gather: Life Regression (arXiv 2304.04926): predict each patch's lifespan once, keep the living.

Inserts, at the input of block ``after_block`` (k0, default 3), a :class:`~vitprune.ops.modules.LifespanGather`
that predicts every patch token's life (in blocks, within ``[k0, L]``) from the previous block's q·k
attention row and the token itself, and sorts the patch tokens by it (prefix tokens stay first). Every
later block ``l`` then keeps a prefix of ``prefix + K_l`` tokens (:class:`~vitprune.ops.modules.PrefixSlice`,
a slice, no gather), ``K_l`` a Python int fixed here from the FLOPs target (the schedule shape of
importance-mask, from block k0 on). A life counts the blocks that process the token: it is alive at
block ``l`` iff ``life > l`` (so a life of k0 ends at the regressor). In training, every residual update of blocks ``l >= k0`` passes a
:class:`~vitprune.ops.modules.SurvivalGate` (``sigmoid((life - l) / tau)``), their attention gets the additive
key mask ``log sigmoid((life - l) / tau)`` (:class:`~vitprune.ops.modules.SurvivalKeyMask`: tokens past their life
fade out as keys, as they will be absent at inference; vitprune's addition to the paper's soft masks), and the regressor's budget loss
holds the implied FLOPs at the target; ``vitprune finetune`` adds that loss and anneals ``tau``.

The regressor's bias is set here so that, on the example input, the hard lives (alive at ``l`` iff
``life > l``) imply the FLOPs target: before fine-tuning, lives rank patches by attention importance.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from vitprune.graph.analysis import ViTGraph
from vitprune.errors import PassError
from vitprune.graph.flops import count_flops
from vitprune.ops import token_ops
from vitprune.ops.modules import LifespanGather, PrefixSlice, SurvivalGate, SurvivalKeyMask
from vitprune.frontends.fx import RecordValues
from vitprune.passes.token_restore import check_restore_rule
from vitprune.passes.base import (VitPass, insert_on_stream, node_named, register_pass, resolve_score, schedule_record,
                                   unique_attr_name)
from vitprune.graph.keep_counts import block_flops, predicted_ratio, solve_for_flops
from vitprune.ops.token_ops import score_flops


def _hard_ratio(vit: ViTGraph, lives: torch.Tensor, first_block: int, total: float, score: str | None = None) -> float:
    """FLOPs ratio implied by hard lives ``[B, P]`` (token alive at block l iff life > l), batch mean, with the
    cost of ``score`` over every patch at ``first_block``."""
    counts = {l: float((lives > l).sum(dim=1).float().mean()) for l in range(first_block, vit.num_blocks)}
    ratio = predicted_ratio(vit, {l: max(1.0, c) for l, c in counts.items()}, total)
    return ratio + score_flops(score, vit.num_patches, vit.blocks[first_block].dim) / total if score else ratio


@register_pass
class LifespanGatherPass(VitPass):
    """Parameters: ``flops`` (target FLOPs ratio), ``after_block`` (k0), ``exact`` (batch-1 exact lives),
    ``budget_weight``, ``tau_start``, ``tau_end``."""

    name = "lifespan-gather"
    needs = ("readers_restorable", "token_indexed_gatherable", "no_token_ops")
    restores_tokens = True

    def __init__(self, flops: float = 0.5, after_block: int = 3, exact: bool = False, budget_weight: float = 2.0,
                 tau_start: float = 1.0, tau_end: float = 0.1, score: str = "auto", min_keep: int | None = None,
                 restore: str = "last") -> None:
        if not 0.0 < float(flops) <= 1.0:
            raise PassError(f"FLOPs target must be in (0, 1], got {flops}")
        super().__init__(flops=float(flops), after_block=int(after_block), exact=bool(exact),
                         budget_weight=float(budget_weight), tau_start=float(tau_start), tau_end=float(tau_end),
                         score=str(score), min_keep=None if min_keep is None else int(min_keep),
                         restore=check_restore_rule(restore))

    @property
    def single_image(self) -> bool:
        return self.params["exact"]

    @property
    def needs_visible_attention(self) -> bool:
        return True  # the regressor reads q·kᵀ of the block before it

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, self.rewrite(graph_module, self.analysis))

    def rewrite(self, gm: fx.GraphModule, vit: ViTGraph) -> bool:
        p, k0, L = self.params, self.params["after_block"], vit.num_blocks
        if not 1 <= k0 <= L - 1:
            raise PassError(f"--after-block must be in 1..{L - 1} for a model with {L} blocks, got {k0}")
        prev = vit.blocks[k0 - 1]
        if prev.query_node is None:  # an opaque module, or a matmul attention whose q·kᵀ chain the analysis could not follow
            raise PassError(f"block {k0 - 1} uses {prev.attention}: its queries and keys are not in the graph")
        gm.eval()
        x = self.example_input
        total = count_flops(gm, x) / x.shape[0]
        score, cls_index = resolve_score(vit, p["score"])  # scored once, at block k0: counted in the target
        n_all = vit.num_tokens
        block_lin = [b.linear_flops_per_token for b in vit.blocks]
        block_att = [4 * b.attention_heads * (b.head_dim or b.dim // b.heads) for b in vit.blocks]
        fixed = total - block_flops(vit, [n_all] * L)
        module = LifespanGather(
            vit.num_prefix_tokens, vit.num_patches, vit.embed_dim, k0, L, prev.attention_scale, score=score,
            cls_index=cls_index, block_linear=block_lin,
            block_attention=block_att, fixed_flops=fixed, target=p["flops"], budget_weight=p["budget_weight"],
            tau_start=p["tau_start"], tau_end=p["tau_end"])
        overhead = self._module_flops(vit, module, prev)  # the regressor's own FLOPs are part of the target
        module.target = p["flops"] - overhead / total  # what the kept tokens may spend: the budget loss and bias aim here
        self._calibrate_bias(gm, vit, module, total)
        counts = solve_for_flops(vit, p["flops"], int(total), first_block=k0, score=score, stages="first",
                                 min_keep=p["min_keep"], option="--after-block", overhead=overhead)

        # soft survival on every residual update of blocks k0.. (training only)
        gates = []
        for block in vit.blocks[k0:]:
            for add_name, branch_name in zip(block.residual_adds, block.residual_branches):
                add, branch = node_named(gm, add_name), node_named(gm, branch_name)
                gate_name = unique_attr_name(gm, "survival_gate")
                gm.add_submodule(gate_name, SurvivalGate(vit.num_prefix_tokens, block.index, p["tau_start"], p["tau_end"]))
                with gm.graph.inserting_after(branch):
                    gate = gm.graph.call_module(gate_name, (branch, branch))  # second arg set below
                add.replace_input_with(branch, gate)
                gates.append(gate)

        stream = node_named(gm, vit.blocks[k0].input_node)
        name = unique_attr_name(gm, "lifespan_gather")
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(stream):
            lg = gm.graph.call_module(name, (stream, node_named(gm, prev.query_node), node_named(gm, prev.key_node)))
        with gm.graph.inserting_after(lg):
            tokens = gm.graph.call_function(operator.getitem, (lg, 0))
        with gm.graph.inserting_after(tokens):
            lives = gm.graph.call_function(operator.getitem, (lg, 1))
        stream.replace_all_uses_with(tokens, delete_user_cb=lambda u: u is not lg)
        for gate in gates:
            gate.args = (gate.args[0], lives)
        anchor = lives
        for block in vit.blocks[k0:]:  # keys past their life fade out of attention in training too
            sdpas = [node_named(gm, a["attention_node"]) for a in block.attentions]  # every parallel attention
            if block.attention != "sdpa" or any(s.kwargs.get("attn_mask") is not None or len(s.args) > 3
                                                for s in sdpas):
                continue
            mask_name = unique_attr_name(gm, "survival_key_mask")
            gm.add_submodule(mask_name, SurvivalKeyMask(vit.num_prefix_tokens, block.index, p["tau_start"], p["tau_end"]))
            with gm.graph.inserting_after(anchor):
                anchor = gm.graph.call_module(mask_name, (lives,))
            for sdpa in sdpas:
                sdpa.update_kwarg("attn_mask", anchor)

        alive = vit.num_patches
        for l, k in counts.items():
            stream = tokens if l == k0 else node_named(gm, vit.blocks[l].input_node)
            insert_on_stream(gm, stream, "prefix_slice", PrefixSlice(vit.num_prefix_tokens, alive, k, l, exact=p["exact"]),
                             (lives,), after=lives if l == k0 else None)  # after both of its inputs
            alive = k
        gm.graph.lint()
        gm.recompile()
        self.record = schedule_record(vit, counts, total, score, "first", overhead, after_block=k0,
                                      initial_bias=float(module.bias.detach()))
        return True

    def _calibrate_bias(self, gm: fx.GraphModule, vit: ViTGraph, module: LifespanGather, total: float) -> None:
        """Set the regressor's bias so the example input's hard lives imply the FLOPs target."""
        k0 = self.params["after_block"]
        prev, block = vit.blocks[k0 - 1], vit.blocks[k0]
        rec = RecordValues(gm, {prev.query_node, prev.key_node, block.input_node})
        with torch.no_grad():
            rec.run(self.example_input)
        x, q, k = (rec.values[n] for n in (block.input_node, prev.query_node, prev.key_node))
        self._fit_bias(vit, module, total, lambda: module.lives(x, q, k), module.target)

    @staticmethod
    def _module_flops(vit: ViTGraph, module: LifespanGather, prev) -> float:
        """The regressor's FLOPs per image in eval mode, as the counter counts them (shapes alone decide them:
        one image of zeros, ``x [1, N, C]`` and the previous block's ``q, k [1, H, N, d]``), the same for every
        frontend."""
        from vitprune.graph.flops import flop_counter, frozen_parameters

        n, d = vit.num_tokens, prev.head_dim or prev.dim // prev.heads
        x, qk = torch.zeros(1, n, vit.embed_dim), torch.zeros(1, prev.heads, n, d)
        counter, was = flop_counter(), module.training
        module.eval()
        with torch.no_grad(), frozen_parameters(module), counter:
            module(x, qk, qk)
        module.train(was)
        return float(counter.get_total_flops())

    def _fit_bias(self, vit: ViTGraph, module: LifespanGather, total: float, lives, target: float) -> None:
        """Bisect the bias so the hard lives (``lives()``: ``[B, P]`` on the example batch) imply ``target``
        (the FLOPs ratio the kept tokens may spend: the pass's target less the regressor's own FLOPs)."""
        k0 = self.params["after_block"]
        with torch.no_grad():
            lo, hi = -20.0, 20.0
            for _ in range(40):
                module.bias.fill_((lo + hi) / 2)
                if _hard_ratio(vit, lives(), k0, total, module.score) > target:
                    hi = (lo + hi) / 2
                else:
                    lo = (lo + hi) / 2
            module.bias.fill_((lo + hi) / 2)

    def lower_onnx(self, ctx) -> None:
        """Insert the lifespan sort and the prefix slices into an ONNX graph
        (:class:`~vitprune.frontends.onnx_lowering.OnnxLowering`). The regressor is the one this pass
        initialises (lives from the previous block's attention score; its token MLP starts at zero)."""
        from vitprune.ops import onnx_ops

        p, k0, vit = self.params, self.params["after_block"], ctx.vit
        L = vit.num_blocks
        if not 1 <= k0 <= L - 1:
            raise PassError(f"--after-block must be in 1..{L - 1} for a model with {L} blocks, got {k0}")
        prev, block = vit.blocks[k0 - 1], vit.blocks[k0]
        total = ctx.flops_per_image
        score, cls_index = resolve_score(vit, p["score"])  # scored once, at block k0: counted in the target
        module = LifespanGather(vit.num_prefix_tokens, vit.num_patches, vit.embed_dim, k0, L, prev.attention_scale or 1.0,
                                score=score, cls_index=cls_index)
        overhead = self._module_flops(vit, module, prev)  # as the fx rewrite counts it: the same keep counts
        counts = solve_for_flops(vit, p["flops"], int(total), first_block=k0, score=score, stages="first",
                                 min_keep=p["min_keep"], option="--after-block", overhead=overhead)
        target = p["flops"] - overhead / total  # the bias the fx rewrite starts from (its token MLP starts at zero)
        x = torch.from_numpy(ctx.values[block.input_node])
        if prev.attention == "sdpa":
            q, k = (torch.from_numpy(ctx.values[n]) for n in (prev.query_node, prev.key_node))
            self._fit_bias(vit, module, total, lambda: module.lives(x, q, k), target)
        else:  # scores from the attention map (the same softmax(q · Kᵀ · scale) rows)
            attn = torch.from_numpy(ctx.values[prev.attention_node] if prev.attention == "matmul-softmax"
                                    else ctx.fused_attention_map(prev, ctx.values))
            scores_value = token_ops.patch_scores(x, vit.num_prefix_tokens, score, attn=attn, cls_index=cls_index)
            self._fit_bias(vit, module, total, lambda: module.lives_from_scores(x, scores_value), target)

        def build(stream):
            o = ctx.builder("lifespan_gather")
            scores = ctx.patch_scores(o, stream, prev, score, cls_index)
            order = onnx_ops.lifespan_order(o, scores, vit.num_patches, k0, L, float(module.score_weight.detach()),
                                            float(module.bias.detach()))
            if ctx.keep_all:  # verification: the gather runs, every token stays in its place
                order = onnx_ops.sort_indices(o, order, vit.num_patches)
            return ctx.keep_patches(o, stream, order)

        sorted_stream = ctx.insert_on_stream(block.input_node, vit.num_tokens, build)
        alive = vit.num_patches
        for l, kc in counts.items():
            keep = alive if ctx.keep_all else kc
            ctx.insert_on_stream(vit.blocks[l].input_node, vit.num_prefix_tokens + keep,
                                 lambda t, n=vit.num_prefix_tokens + keep: ctx.prefix_slice(ctx.builder("prefix_slice"), t, n),
                                 stream=sorted_stream if l == k0 else None)
            alive = keep
        self.record = schedule_record(vit, counts, total, score, "first", overhead, after_block=k0,
                                      initial_bias=float(module.bias.detach()))
