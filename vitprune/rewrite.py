"""``vitprune.rewrite``: capture -> analyse -> pass -> verify, on a copy of the model."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn

from vitprune.graph.analysis import analyse
from vitprune.frontends.capture import capture, require_one_image_input
from vitprune.errors import VitpruneError
from vitprune.frontends.export import is_exported
from vitprune.io.origin import example_input as make_example_input
from vitprune.io.origin import source_of
from vitprune.passes import make_pass, run_passes
from vitprune.io.images import DEFAULT_MEAN, DEFAULT_STD, is_path
from vitprune.io.preprocess import checked_normalisation, resolve_preprocessing
from vitprune.io.preprocess import metadata as preprocessing_metadata
from vitprune.verify import FlopsRatios, verify


@dataclass
class RewriteReport(FlopsRatios):
    """What a rewrite did and measured. FLOPs are for one forward of the example batch."""

    method: str
    params: dict[str, Any]
    decisions: dict[str, Any]  # what the pass fixed at rewrite time (keep counts, insertion point)
    input_shape: list[int]
    flops_before: int
    flops_after: int  # eval mode
    flops_after_train: int  # train mode
    keep_all_max_abs_diff: float  # over every output
    keep_all_nodes_compared: int  # original nodes found equal in the rewritten graph, every token kept
    keep_all_worst_node: str | None
    keep_all_worst_node_diff: float
    outputs_finite: bool
    seconds: float
    analysis: dict[str, Any] = field(default_factory=dict)
    output: str | None = None


def rewrite(
    model: nn.Module,
    method: str = "token-drop",
    *,
    example_input: torch.Tensor | None = None,
    input_size: tuple[int, int, int] | None = None,
    tolerance: float = 1e-5,
    seed: int = 0,
    frontend: str = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **params: Any,
) -> tuple[fx.GraphModule, RewriteReport]:
    """Rewrite a ViT so it spends compute on fewer tokens, and verify the result.

    The captured model is deep-copied first: the rewritten model never shares weights with ``model``.

    Args:
        model: the ViT (any ``nn.Module`` fx can trace, or a GraphModule vitprune produced).
        method: a registered pass name (``"token-drop"``).
        example_input: ``[B, C, H, W]`` batch for analysis and verification; default: a seeded
            normal batch of 2 at the model's input size.
        input_size: ``(C, H, W)`` when no ``example_input`` is given and the size cannot be read
            from the model.
        tolerance: max abs difference allowed between keep-all and the original output.
        seed: seed for the random token selection during verification.
        frontend: ``"auto"`` (symbolic trace, ``torch.export`` when tracing fails), ``"fx"`` or ``"export"``
            (:func:`vitprune.frontends.capture.capture`).
        mean, std: per-channel input normalisation ``(pixel / 255 - mean) / std``, overriding what the model
            records (:func:`vitprune.io.preprocess.resolve_preprocessing`: a vitprune model's metadata, timm's
            ``pretrained_cfg``, else 0.5); it normalises a calibration folder's images (importance-mask
            static) and is recorded in the rewritten model's metadata, where eval and finetune read it.
        **params: the method's parameters (token-drop: ``keep_rate``, ``selection``, ``at_inference``).

    Returns:
        ``(rewritten, report)``: the rewritten ``torch.fx.GraphModule`` (same train/eval mode as
        ``model``) and a :class:`RewriteReport`.

    Raises:
        CaptureError, AnalysisError, PassError: the model cannot be captured / is not a ViT vitprune
            can rewrite / the pass refused (messages give the reason).
        VerificationError: keep-all is not exact or outputs are not finite.
    """
    start = time.perf_counter()
    require_one_image_input(model)  # before asking for an input size the model would not take
    if example_input is None:
        example_input = make_example_input(model, input_size, seed=seed)
    if mean is not None or std is not None:  # a user's numbers: checked before any work
        checked_normalisation(DEFAULT_MEAN if mean is None else mean, DEFAULT_STD if std is None else std,
                              "rewrite's mean / std")
    preprocessing = resolve_preprocessing(model, mean, std, channels=example_input.shape[1])
    if is_path(params.get("calibration")) and "mean" not in params:  # images normalised as the model expects
        params = dict(params, mean=preprocessing.mean, std=preprocessing.std)
    pass_ = make_pass(method, **params)
    reference = capture(model, example_input, frontend)  # shares the model's weights: never modified
    if frontend == "auto" and pass_.needs_visible_attention and _opaque_attention(reference, example_input):
        # nn.MultiheadAttention is one leaf in a symbolic trace; torch.export shows its q and k
        reference = capture(model, example_input, "export")
    gm = copy.deepcopy(reference)
    gm, analyses = run_passes(gm, [pass_], example_input)
    # a rewrite with per-image token counts (lifespan-gather exact) runs on one image at a time
    check = verify(model, gm, example_input[:1] if pass_.single_image else example_input, tolerance=tolerance,
                   seed=seed, reference=reference)
    gm.train(model.training)

    previous = copy.deepcopy(getattr(model, "meta", {}).get("vitprune", {}))
    recipe = previous.get("recipe", []) + [{"pass": method, "params": pass_.params, "decisions": pass_.record}]
    gm.meta["vitprune"] = {
        "source": previous.get("source") or source_of(model),
        "input_shape": [1 if pass_.single_image else example_input.shape[0], *example_input.shape[1:]],
        "recipe": recipe,
        "preprocessing": (preprocessing.to_dict() if mean is not None or std is not None
                          else previous.get("preprocessing") or preprocessing_metadata(model)),
    }
    from vitprune.graph.keep_counts import prunable_share_of

    checked = 1 if pass_.single_image else example_input.shape[0]
    share = prunable_share_of(analyses[0], pass_.record, check.flops_before / checked)
    if share is not None:  # what the method can cut at all: the blocks from its pruning point on
        pass_.record["prunable_flops_share"] = share
    report = RewriteReport(
        method=method,
        params=pass_.params,
        decisions=pass_.record,
        input_shape=list(example_input.shape),
        flops_before=check.flops_before,
        flops_after=check.flops_after,
        flops_after_train=check.flops_after_train,
        keep_all_max_abs_diff=check.keep_all_max_abs_diff,
        keep_all_nodes_compared=check.keep_all_nodes_compared,
        keep_all_worst_node=check.keep_all_worst_node,
        keep_all_worst_node_diff=check.keep_all_worst_node_diff,
        outputs_finite=check.outputs_finite,
        seconds=time.perf_counter() - start,
        analysis=analyses[0].to_dict(),
    )
    return gm, report


def _opaque_attention(gm: fx.GraphModule, example_input: torch.Tensor) -> bool:
    """Whether a symbolic-trace graph hides a block's queries and keys in an attention leaf module."""
    if is_exported(gm):
        return False
    try:
        return any(b.attention == "multihead-module" for b in analyse(gm, example_input).blocks)
    except VitpruneError:
        return False  # the pass's own analysis reports it


def inspect_model(
    model: nn.Module, *, example_input: torch.Tensor | None = None, input_size: tuple[int, int, int] | None = None,
    frontend: str = "auto",
):
    """Capture and analyse ``model``; returns the :class:`~vitprune.graph.analysis.ViTGraph`.

    Raises:
        CaptureError, AnalysisError: as :func:`rewrite`.
    """
    require_one_image_input(model)
    if example_input is None:
        example_input = make_example_input(model, input_size)
    return analyse(capture(model, example_input, frontend), example_input)


def flops_per_image(model: nn.Module, *, input_size: tuple[int, int, int] | None = None) -> float:
    """FLOPs of one eval forward of ``model`` per image (:func:`vitprune.graph.flops.count_flops` on the
    example input ``make_example_input`` gives), the model's train/eval mode restored."""
    from vitprune.graph.flops import count_flops

    x = make_example_input(model, input_size)
    was = model.training
    model.eval()
    try:
        return count_flops(model, x) / x.shape[0]
    finally:
        model.train(was)
