"""token-drop: PatchDropout (arXiv 2208.07220) with the selection modes of PSS (arXiv 2208.09520).

Inserts one :class:`~vitprune.ops.modules.TokenDrop` leaf right after the graph's token-stream start
(the later of the position-embedding add and the prefix-token concat), so every block sees
``num_prefix_tokens + keep_count`` tokens. The keep count is a Python int fixed here:
``max(1, int(num_patches * keep_rate))`` as PatchDropout computes it.

Readers that need every token in place (a dense head, a token-sequence output) get the dropped tokens back,
and tensors indexed by token position (RoPE tables, relative-position biases) follow the kept tokens
(:mod:`vitprune.passes.token_positions`). Needs: no position read inside a block, token-indexed tensors whose
token axes the analysis can tell, no earlier token op.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from vitprune.graph.analysis import ViTGraph
from vitprune.errors import PassError
from vitprune.ops.modules import TokenDrop
from vitprune.passes.token_restore import check_restore_rule
from vitprune.passes.base import VitPass, insert_on_stream, node_named, register_pass
from vitprune.ops.token_ops import SELECTIONS, keep_count_for_rate


@register_pass
class TokenDropPass(VitPass):
    """Parameters: ``keep_rate`` in (0, 1], ``selection`` (``random`` | ``magnitude`` | ``distinct``), ``at_inference``,
    ``restore`` (how a dense reader gets a dropped token back: ``last`` | ``nearest``,
    :func:`~vitprune.ops.token_ops.restore_tokens`)."""

    name = "token-drop"
    needs = ("readers_restorable", "token_indexed_gatherable", "no_token_ops")
    restores_tokens = True

    def __init__(self, keep_rate: float = 0.5, selection: str = "random", at_inference: bool = False,
                 restore: str = "last") -> None:
        if not 0.0 < float(keep_rate) <= 1.0:
            raise PassError(f"keep rate must be in (0, 1], got {keep_rate}")
        if selection not in SELECTIONS:
            raise PassError(f"unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
        super().__init__(keep_rate=float(keep_rate), selection=selection, at_inference=bool(at_inference),
                         restore=check_restore_rule(restore))

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, self.rewrite(graph_module, self.analysis))

    def rewrite(self, gm: fx.GraphModule, vit: ViTGraph) -> bool:
        keep_count = keep_count_for_rate(vit.num_patches, self.params["keep_rate"])
        module = TokenDrop(
            num_prefix_tokens=vit.num_prefix_tokens,
            num_patches=vit.num_patches,
            keep_count=keep_count,
            selection=self.params["selection"],
            at_inference=self.params["at_inference"],
        )
        start = node_named(gm, vit.token_stream_start)
        insert_on_stream(gm, start, "token_drop", module)
        gm.recompile()
        self.record = {
            "num_patches": vit.num_patches,
            "num_prefix_tokens": vit.num_prefix_tokens,
            "keep_count": keep_count,
            "tokens_per_block": vit.num_prefix_tokens + keep_count,
            "inserted_after": start.name,
        }
        return True

    def lower_onnx(self, ctx) -> None:
        """Insert the drop into an ONNX graph (:class:`~vitprune.frontends.onnx_lowering.OnnxLowering`).
        ONNX graphs are for inference, so the drop is always active (``at_inference``)."""
        from vitprune.ops import onnx_ops

        vit = ctx.vit
        keep_count = vit.num_patches if ctx.keep_all else keep_count_for_rate(vit.num_patches, self.params["keep_rate"])

        def build(x):
            b = ctx.builder("token_drop")
            scores = {"magnitude": onnx_ops.magnitude_scores, "distinct": onnx_ops.distinct_scores,
                      "random": onnx_ops.random_scores}[self.params["selection"]](b, x, vit.num_prefix_tokens)
            return ctx.keep_patches(b, x, onnx_ops.top_patch_indices(b, scores, keep_count))

        ctx.insert_on_stream(vit.token_stream_start, vit.num_prefix_tokens + keep_count, build)
        self.record = {"num_patches": vit.num_patches, "num_prefix_tokens": vit.num_prefix_tokens,
                       "keep_count": keep_count, "tokens_per_block": vit.num_prefix_tokens + keep_count,
                       "inserted_after": vit.token_stream_start, "at_inference": True}
