"""Pass infrastructure: a registry of passes by name and what each needs from the analysis.

Passes build on ``torch.fx.passes.infra.pass_base.PassBase``: ``requires`` checks the pass's needs
against the :class:`~vitprune.graph.analysis.ViTGraph` the manager hands it, ``call`` rewrites the graph
and returns a ``PassResult``, ``ensures`` lints the result.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase

from vitprune.graph.analysis import ViTGraph
from vitprune.errors import PassError

#: name -> pass class, filled by :func:`register_pass`.
PASSES: dict[str, type["VitPass"]] = {}

#: What a pass may require of the analysed graph: name -> (holds?, reason it does not).
REQUIREMENTS: dict[str, tuple[Callable[[ViTGraph], bool], Callable[[ViTGraph], str]]] = {
    "token_indexed_gatherable": (
        lambda v: all(t["token_axes"] for t in v.token_indexed),
        lambda v: next(f"tensor {t['node']!r} {t['shape']} (used by {t['used_by']!r}) is indexed by token position "
                       "on axes vitprune cannot tell" + (f" (the token axes are lost at {t['unknown_at']!r}, an op "
                                                         "vitprune cannot follow)" if t.get("unknown_at") else "")
                       + ", so it cannot follow the kept tokens"
                       for t in v.token_indexed if not t["token_axes"]),
    ),
    "readers_restorable": (
        lambda v: all(r["restorable"] for r in v.stream_readers),
        lambda v: next(f"node {r['node']!r} ({r['op']}) {r['what']}: dropping tokens would change what it reads, "
                       "and tokens are put back only on the residual stream" for r in v.stream_readers
                       if not r["restorable"]),
    ),
    "no_token_ops": (
        lambda v: not v.token_ops,
        lambda v: f"the model already drops tokens ({v.token_ops[0]['module']} at node {v.token_ops[0]['node']!r})",
    ),
}


def readout_is_position_free(v: ViTGraph) -> bool:
    """Whether the readout reads prefix tokens by index and/or a mean over all tokens or all patch tokens,
    which dropping patch tokens keeps meaningful (else a pass restores every token before it)."""
    return (v.readout.kind != "tokens" and all(i < v.num_prefix_tokens for i in v.readout.token_indices)
            and (v.readout.kind == "token"
                 or (v.readout.mean_start or 0) in (0, v.num_prefix_tokens) and v.readout.mean_stop is None))


def register_pass(cls: type["VitPass"]) -> type["VitPass"]:
    """Class decorator: register a pass under ``cls.name``."""
    for need in cls.needs:
        if need not in REQUIREMENTS:
            raise ValueError(f"pass {cls.name!r} needs unknown requirement {need!r}")
    PASSES[cls.name] = cls
    return cls


class VitPass(PassBase):
    """A vitprune graph pass.

    Subclasses set ``name`` (the ``--method`` users type), ``needs`` (keys of :data:`REQUIREMENTS`)
    and implement :meth:`rewrite`. The manager sets :attr:`analysis` before calling the pass.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    #: Whether the pass's token modules can report the tokens they keep (``return_kept``), so dropped tokens
    #: can be put back before dense readers and token-indexed tensors follow the kept ones
    #: (:mod:`vitprune.passes.token_positions`).
    restores_tokens: ClassVar[bool] = False

    @property
    def needs_visible_attention(self) -> bool:
        """Whether the pass reads queries and keys (or attention maps), which an opaque
        ``nn.MultiheadAttention`` leaf hides: ``vitprune.rewrite`` then captures with ``torch.export``."""
        return False

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.analysis: ViTGraph | None = None
        self.example_input = None  # the [B, C, H, W] batch the manager analysed with
        #: what the pass decided (static keep counts, ...), for the report and the saved recipe.
        self.record: dict[str, Any] = {}

    @property
    def single_image(self) -> bool:
        """Whether the rewritten model takes batch 1 only (data-dependent token counts)."""
        return False

    def requires(self, graph_module: fx.GraphModule) -> None:
        if self.analysis is None:
            raise RuntimeError(f"pass {self.name!r} run without an analysis")
        for need in self.needs:
            holds, reason = REQUIREMENTS[need]
            if not holds(self.analysis):
                raise PassError(reason(self.analysis))

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()

    def rewrite(self, gm: fx.GraphModule, vit: ViTGraph) -> bool:
        """Rewrite ``gm`` in place; return whether it changed."""
        raise NotImplementedError


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node called ``name`` (analysis results refer to nodes by name)."""
    return next(n for n in gm.graph.nodes if n.name == name)


def insert_on_stream(gm: fx.GraphModule, stream: fx.Node, base: str, module: nn.Module,
                     extra_args: tuple[fx.Node, ...] = (), after: fx.Node | None = None) -> fx.Node:
    """Register ``module`` under a fresh name and call it on ``stream`` (plus ``extra_args``) right after
    ``after`` (default ``stream``); every other use of ``stream`` then reads the module's output."""
    name = unique_attr_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(after or stream):
        new = gm.graph.call_module(name, (stream, *extra_args))
    stream.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def score_query(vit: ViTGraph) -> tuple[str, int]:
    """The default patch score, ``(score, cls_index)``: ``"distinct"`` (1 − a patch's highest cosine similarity to
    another patch: near-duplicates go first, ToMe's premise, arXiv 2210.09461 §3) for every model, chosen by
    measured fidelity without fine-tuning. Dense models (``benchmarks/dense_digits.py``, FLOPs 0.6):
    importance-mask mIoU 0.529 vs 0.138 with the mean query. Classification: top-1 agreement, importance-mask
    ``first_block=1``, mean over three CLS models and FLOPs 0.7 / 0.6 / 0.5 0.786 vs the CLS row's (EViT) 0.742,
    better on the mean-pool model at every FLOPs (``benchmarks/results/importance_scores.md``; it loses to L2 and
    the CLS row on the register model at 0.7 and 0.6), and on the 64 px digits ViT 0.949 / 0.933 / 0.907 vs
    0.742 / 0.611 / 0.502 (``benchmarks/results/fidelity_digits64.md``). Its ``2·P²·C`` FLOPs are counted in a
    FLOPs target. ``cls_index`` is 0 (the score reads no CLS row)."""
    return "distinct", 0


def reads_cls_token(vit: ViTGraph) -> bool:
    """Whether the readout reads a prefix token by index (a CLS token), whose attention row ``cls`` and
    ``cls-norm`` score patches by."""
    return bool(vit.readout.token_indices and vit.num_prefix_tokens)


def resolve_score(vit: ViTGraph, score: str) -> tuple[str, int]:
    """The patch score a pass uses (``"auto"``: :func:`score_query`'s choice) and the CLS index it reads.

    Raises:
        PassError: an unknown score, or a CLS-row score on a model whose readout reads no CLS token.
    """
    from vitprune.ops.token_ops import SCORES

    default, cls_index = score_query(vit)
    if score == "auto":
        return default, cls_index
    if score not in SCORES:
        raise PassError(f"unknown score {score!r}; expected auto or one of {', '.join(SCORES)}")
    if score in ("cls", "cls-norm") and not reads_cls_token(vit):
        raise PassError(f"score {score!r} reads the CLS token's attention row, and this model's readout reads no "
                        "CLS token: use mean-query, attention-received, l1, l2 or distinct")
    if score in ("cls", "cls-norm"):
        cls_index = vit.readout.token_indices[0]
    return score, cls_index


def schedule_record(vit: ViTGraph, counts: dict[int, int], total_flops: float, score: str, stages: str = "each",
                    overhead: float | None = None, **extra: Any) -> dict[str, Any]:
    """What a keep-count pass decided, for the report and the saved recipe (the same for every frontend);
    ``overhead``: the inserted modules' measured FLOPs per image (:func:`~vitprune.graph.keep_counts.predicted_ratio`)."""
    from vitprune.graph.keep_counts import predicted_ratio, tokens_per_block

    return {"num_patches": vit.num_patches, "num_prefix_tokens": vit.num_prefix_tokens, **extra,
            "keep_counts": {str(b): k for b, k in counts.items()}, "tokens_per_block": tokens_per_block(vit, counts),
            "predicted_flops_ratio": predicted_ratio(vit, counts, int(total_flops), score, stages, overhead),
            "score": score}


def unique_attr_name(gm: fx.GraphModule, base: str) -> str:
    """A submodule name not yet used on ``gm`` (``base``, ``base_1``, ...)."""
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
