"""importance-mask: Patch Slimming (arXiv 2106.02852) with per-layer static keep counts.

Before each pruning block ``b`` (from the keep schedule: ``keep={b: rate}`` or solved from a FLOPs
target), keep a nested subset of the patch tokens alive there; prefix tokens are always kept.

- ``mode="dynamic"`` (DPS-ViT, input-dependent): each image keeps its top-``k`` patches by the
  attention of the block just before ``b``: one query row ``softmax(q_cls · Kᵀ · scale)`` averaged over
  heads (EViT's score, linear cost, so blocks keep their fused SDPA kernel). Without a CLS token the
  mean query is used (vitprune's choice; see ``token_ops.attention_patch_scores``). When a dense reader
  needs every token back, the default is ``"distinct"`` (``token_ops.distinct_scores``: near-duplicate
  tokens go first), whose ``2·P²·C`` similarity FLOPs are counted in a FLOPs target.
- ``mode="static"`` (PS-ViT): image-independent index sets, chosen top-down from calibration images:
  a patch's significance at block ``l`` is its effect on the final features, estimated through the
  product of later blocks' head-averaged attention maps (with the residual as ``(A + I) / 2``, the
  paper's approximation, §3.2); the last stage's set is chosen first and each earlier stage's set
  contains it (nested masks). Sets are baked in as constant gathers: no scoring at run time.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from vitprune.graph.analysis import ViTGraph
from vitprune.errors import PassError, VitpruneError
from vitprune.graph.flops import count_flops
from vitprune.ops.modules import AttentionTopK, StaticTokenSelect
from vitprune.frontends.fx import RecordValues
from vitprune.io.images import is_path
from vitprune.passes.token_restore import check_restore_rule
from vitprune.passes.base import VitPass, insert_on_stream, node_named, register_pass, resolve_score, schedule_record
from vitprune.graph.keep_counts import counts_from_rates, parse_keep, solve_for_flops
from vitprune.ops.token_ops import STREAM_SCORES

MODES = ("dynamic", "static")


def _insert_before_block(gm: fx.GraphModule, vit: ViTGraph, block: int, base: str, module, extra_args=()) -> None:
    insert_on_stream(gm, node_named(gm, vit.blocks[block].input_node), base, module,
                     tuple(node_named(gm, a) for a in extra_args))


def _attention_maps(vit: ViTGraph, batches: Iterable[torch.Tensor],
                    record: Callable[[set[str], torch.Tensor], dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Head- and image-averaged attention map ``[N, N]`` of every block over the calibration images.

    ``record(names, x)`` runs the original model on ``x`` and returns the named values (fx: an
    Interpreter; ONNX: ONNX Runtime with the tensors exposed)."""
    names = set()
    for b in vit.blocks:
        for a in b.attentions:
            names |= {a["query_node"], a["key_node"]} if b.attention == "sdpa" else {a["attention_node"]}
    sums, count = [None] * vit.num_blocks, 0
    with torch.no_grad():
        for x in batches:
            values = record(names, x)
            for i, b in enumerate(vit.blocks):
                maps = []  # a parallel block's attentions are averaged: each moves tokens by its own map
                for a in b.attentions:
                    if b.attention == "sdpa":
                        q, k = values[a["query_node"]], values[a["key_node"]]
                        maps.append(torch.softmax(q @ k.transpose(-2, -1) * a["attention_scale"], dim=-1))
                    else:
                        maps.append(values[a["attention_node"]])
                m = torch.stack([attn.mean(dim=1) for attn in maps]).mean(0).sum(dim=0)  # [N, N], summed over images
                sums[i] = m if sums[i] is None else sums[i] + m
            count += x.shape[0]
    if count == 0:
        raise PassError("the calibration data holds no images")
    return [s / count for s in sums]


def _fx_recorder(gm: fx.GraphModule) -> Callable[[set[str], torch.Tensor], dict[str, torch.Tensor]]:
    def record(names: set[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
        was = gm.training
        gm.eval()
        try:
            rec = RecordValues(gm, names)
            rec.run(x)
        finally:
            gm.train(was)
        return rec.values
    return record


def significance(vit: ViTGraph, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Top-down token significance ``[N]`` at the input of every block (Patch Slimming §3.2).

    The readout's tokens start with significance 1 (a CLS index) or a uniform share (a mean, or every token
    for a dense readout; half each when the head reads a CLS token and a mean); each
    block, last to first, passes it back through ``(A + I) / 2``.
    """
    n = vit.num_tokens
    s = torch.zeros(n)
    if vit.readout.kind in ("tokens", "attention-pool"):  # every token is read: all of them matter alike
        s = torch.full((n,), 1.0 / n)
    elif vit.readout.kind != "mean":
        s[vit.readout.token_indices] = 1.0 / len(vit.readout.token_indices)
    if vit.readout.kind in ("mean", "token+mean"):  # a mean pool, alone or beside the CLS token (half each)
        mean = torch.zeros(n)
        mean[vit.readout.mean_start or 0:vit.readout.mean_stop] = 1.0
        s = mean / mean.sum() if vit.readout.kind == "mean" else 0.5 * s + 0.5 * mean / mean.sum()
    out = [None] * vit.num_blocks
    for i in reversed(range(vit.num_blocks)):
        s = 0.5 * (s @ maps[i]) + 0.5 * s
        out[i] = s
    return out


def nested_static_sets(vit: ViTGraph, counts: dict[int, int], sig: list[torch.Tensor]) -> dict[int, list[int]]:
    """Grid positions kept before each pruning block, chosen last stage first, each set inside the earlier."""
    blocks = sorted(counts)
    chosen: dict[int, list[int]] = {}
    keep: set[int] = set()
    for b in reversed(blocks):
        patch_sig = sig[b][vit.num_prefix_tokens:]
        order = [int(i) for i in torch.argsort(patch_sig, descending=True)]
        extra = [i for i in order if i not in keep][: counts[b] - len(keep)]
        keep |= set(extra)
        chosen[b] = sorted(keep)
    return chosen


@register_pass
class ImportanceMaskPass(VitPass):
    """Parameters: ``keep`` (``{block: rate}`` or ``"3:0.7,6:0.7"``) or ``flops`` (target ratio),
    ``mode`` (``dynamic`` | ``static``), ``first_block`` (first pruned block for ``flops``, default 3),
    ``calibration`` (static: a folder of images or an iterable of ``[B, C, H, W]`` tensors),
    ``calibration_limit`` (images read from a folder, default 256), ``score`` (dynamic: ``auto`` or one of
    :data:`~vitprune.ops.token_ops.SCORES`, see :func:`~vitprune.ops.token_ops.patch_scores`), ``min_keep``
    (``flops``: the fewest patches a block may keep, default
    :func:`~vitprune.graph.keep_counts.default_min_keep`), ``mean`` / ``std`` (per-channel normalisation of a
    calibration folder's images, ``(pixel / 255 - mean) / std``; :func:`vitprune.rewrite` passes the model's
    own, :mod:`vitprune.io.preprocess`; default 0.5 / 0.5)."""

    name = "importance-mask"
    needs = ("readers_restorable", "token_indexed_gatherable", "no_token_ops")
    restores_tokens = True

    def __init__(self, keep: Any = None, flops: float | None = None, mode: str = "dynamic", first_block: int = 3,
                 calibration: Any = None, calibration_limit: int = 256, score: str = "auto",
                 min_keep: int | None = None, mean: Any = None, std: Any = None, restore: str = "last") -> None:
        if (keep is None) == (flops is None):
            raise PassError("give exactly one of a keep schedule (--keep BLOCK:RATE,...) or a FLOPs target (--flops F)")
        if mode not in MODES:
            raise PassError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "static" and calibration is None:
            raise PassError("static mode needs calibration images (--calibration DIR)")
        if flops is not None and not 0.0 < float(flops) <= 1.0:
            raise PassError(f"FLOPs target must be in (0, 1], got {flops}")
        if mode == "static" and score != "auto":
            raise PassError("static mode chooses patches by top-down significance; --score applies to dynamic mode")
        self._calibration = calibration
        super().__init__(keep=parse_keep(keep) if keep is not None else None,
                         flops=float(flops) if flops is not None else None, mode=mode, first_block=int(first_block),
                         calibration=None if calibration is None else
                         str(calibration) if is_path(calibration)
                         else "<tensors>", calibration_limit=int(calibration_limit), score=str(score),
                         min_keep=None if min_keep is None else int(min_keep),
                         restore=check_restore_rule(restore),
                         # a calibration folder's normalisation (vitprune.rewrite resolves the model's own)
                         **({"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
                            if mean is not None and std is not None else {}))

    @property
    def needs_visible_attention(self) -> bool:
        return True  # dynamic: q·kᵀ of the block before; static: every block's attention map

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, self.rewrite(graph_module, self.analysis))

    def _score(self, vit: ViTGraph) -> tuple[str, int]:
        """``(score, cls_index)`` of the dynamic selection; ``("static", 0)`` in static mode."""
        return resolve_score(vit, self.params["score"]) if self.params["mode"] == "dynamic" else ("static", 0)

    def _counts(self, vit: ViTGraph, total: int) -> dict[int, int]:
        p = self.params
        if p["keep"] is not None:
            counts = counts_from_rates(vit.num_patches, vit.num_blocks, p["keep"])
        else:  # a score that costs FLOPs of its own (distinct's similarity matrix) is counted in the target
            counts = solve_for_flops(vit, p["flops"], total, p["first_block"], score=self._score(vit)[0],
                                     min_keep=p["min_keep"])
        alive, stages = vit.num_patches, {}
        for b, k in sorted(counts.items()):  # a stage that keeps every alive patch does nothing: skip it
            if k < alive:
                stages[b] = alive = k
        if not stages:
            raise PassError("the schedule keeps every patch token: nothing to prune")
        return stages

    def rewrite(self, gm: fx.GraphModule, vit: ViTGraph) -> bool:
        gm.eval()
        total = count_flops(gm, self.example_input) // self.example_input.shape[0]  # per image
        counts = self._counts(vit, total)
        alive = vit.num_patches
        if self.params["mode"] == "dynamic":
            score, cls_index = self._score(vit)
            for b, k in counts.items():
                prev = vit.blocks[b - 1]
                if score in STREAM_SCORES:  # the stream alone
                    args, source = (), "qk"
                elif prev.attention == "sdpa":
                    args, source = (prev.query_node, prev.key_node), "qk"
                elif prev.attention == "matmul-softmax":
                    args, source = (prev.attention_node,), "attn"
                else:
                    raise PassError(f"block {b - 1} uses {prev.attention}: its queries and keys are not in the graph")
                module = AttentionTopK(vit.num_prefix_tokens, alive, k, scale=prev.attention_scale, score=score,
                                       cls_index=cls_index, source=source)
                _insert_before_block(gm, vit, b, "importance_topk", module, args)
                alive = k
        else:
            batches = self._calibration_batches(vit)
            sets = nested_static_sets(vit, counts, significance(vit, _attention_maps(vit, batches, _fx_recorder(gm))))
            previous = list(range(vit.num_patches))
            for b in counts:
                position = {g: i for i, g in enumerate(previous)}
                kept = [position[g] for g in sets[b]]
                _insert_before_block(gm, vit, b, "static_select", StaticTokenSelect(vit.num_prefix_tokens, alive, kept))
                previous, alive = sets[b], len(sets[b])
            score = "static"
        gm.recompile()
        self.record = schedule_record(vit, counts, total, score)
        return True

    def lower_onnx(self, ctx) -> None:
        """Insert the selections into an ONNX graph (:class:`~vitprune.frontends.onnx_lowering.OnnxLowering`)."""
        from vitprune.ops import onnx_ops

        vit = ctx.vit
        counts = self._counts(vit, int(ctx.flops_per_image))
        alive = vit.num_patches
        if self.params["mode"] == "dynamic":
            score, cls_index = self._score(vit)
            for b, k in counts.items():
                prev = vit.blocks[b - 1]
                keep = alive if ctx.keep_all else k

                def build(x, prev=prev, keep=keep):
                    o = ctx.builder("importance_topk")
                    scores = ctx.patch_scores(o, x, prev, score, cls_index)
                    return ctx.keep_patches(o, x, onnx_ops.top_patch_indices(o, scores, keep))

                ctx.insert_on_stream(vit.blocks[b].input_node, vit.num_prefix_tokens + keep, build)
                alive = keep
        else:
            fused = {b.attention_node: b for b in vit.blocks if b.attention == "multihead-module"}

            def record(names: set[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
                # a fused attention op hides its map: computed from the op's input and weights instead
                want = {n for n in names if n not in fused} | {ctx.fused_input(fused[n]) for n in names if n in fused}
                got = ctx.run_original(want, x.numpy())
                out = {n: torch.from_numpy(v) for n, v in got.items()}
                out.update({n: torch.from_numpy(ctx.fused_attention_map(fused[n], got)) for n in names if n in fused})
                return out

            # keep-all keeps every token in place: the calibration run is only for the real lowering
            sets = None if ctx.keep_all else nested_static_sets(
                vit, counts, significance(vit, _attention_maps(vit, self._calibration_batches(vit), record)))
            previous = list(range(vit.num_patches))
            for b in counts:
                position = {g: i for i, g in enumerate(previous)}
                kept = list(range(alive)) if ctx.keep_all else [position[g] for g in sets[b]]
                index = list(range(vit.num_prefix_tokens)) + [vit.num_prefix_tokens + i for i in kept]
                ctx.insert_on_stream(vit.blocks[b].input_node, len(index),
                                     lambda x, index=index: ctx.static_select(ctx.builder("static_select"), x, index))
                previous = previous if ctx.keep_all else sets[b]
                alive = len(kept)
            score = "static"
        self.record = schedule_record(vit, counts, ctx.flops_per_image, score)

    def _calibration_batches(self, vit: ViTGraph) -> Iterable[torch.Tensor]:
        data = self._calibration
        if isinstance(data, torch.Tensor):
            return [data]
        if is_path(data):
            from vitprune.io.images import image_batches

            normalisation = {k: self.params[k] for k in ("mean", "std") if k in self.params}
            return list(image_batches(data, tuple(vit.input_shape[1:]), limit=self.params["calibration_limit"],
                                      **normalisation))
        try:
            return [x for x in data]
        except TypeError:
            raise VitpruneError("calibration must be a folder of images or an iterable of [B, C, H, W] tensors") from None
