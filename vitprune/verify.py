"""Verify a rewritten model against the original: keep-all exact, outputs finite, FLOPs before/after.

Keep-all runs every inserted token op with every patch token kept (the selection and gather still
execute): ViT blocks are permutation-equivariant once position embeddings are added and the
original order is kept, so the output must equal the original's. Pruned runs are only checked to be
finite and of the right shape: top-k selection is discontinuous, so a tight output tolerance on a
pruned run is meaningless (``shared/DESIGN.md``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitprune.errors import VerificationError
from vitprune.modules import force_keep_all


class FlopsRatios:
    """``flops_ratio`` (eval) and ``flops_ratio_train`` for a dataclass with ``flops_before/after(_train)``."""

    flops_before: int
    flops_after: int
    flops_after_train: int

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        d["flops_ratio"] = self.flops_ratio
        d["flops_ratio_train"] = self.flops_after_train / self.flops_before
        return d


@dataclass
class Verification(FlopsRatios):
    """What verification measured. FLOPs are per forward pass of the example batch."""

    keep_all_max_abs_diff: float
    outputs_finite: bool
    output_shape: list[int]
    flops_before: int
    flops_after: int  # eval mode (inference)
    flops_after_train: int  # train mode, token ops active


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    was = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was)


def _run(model: nn.Module, x: torch.Tensor, training: bool, seed: int) -> tuple[torch.Tensor, int]:
    """(output, FLOPs) of one seeded forward: the FLOPs are counted on the same pass, not a second one."""
    counter = FlopCounterMode(display=False)
    with _mode(model, training), torch.no_grad(), torch.random.fork_rng(devices=[]), counter:
        torch.manual_seed(seed)
        out = model(x)
    if isinstance(out, (tuple, list)):  # e.g. (head, distillation head) in training mode: compare the first
        out = out[0]
    return out, int(counter.get_total_flops())


def verify(
    original: nn.Module, rewritten: nn.Module, example_input: torch.Tensor, *, tolerance: float = 1e-5, seed: int = 0
) -> Verification:
    """Check ``rewritten`` against ``original`` on ``example_input`` ``[B, C, H, W]``.

    Four seeded forwards (original; rewritten keep-all, eval, train); FLOPs are counted on the same passes.

    Raises:
        VerificationError: keep-all output differs by more than ``tolerance`` (max abs), an output is
            not finite, or the output shape changed.
    """
    reference, flops_before = _run(original, example_input, False, seed)
    with force_keep_all(rewritten):
        keep_all, _ = _run(rewritten, example_input, False, seed)
    if keep_all.shape != reference.shape:
        raise VerificationError(f"keep-all output shape {list(keep_all.shape)} != original {list(reference.shape)}")
    diff = (keep_all - reference).abs().max().item() if reference.numel() else 0.0
    pruned_eval, flops_after = _run(rewritten, example_input, False, seed)
    pruned_train, flops_after_train = _run(rewritten, example_input, True, seed)
    finite = all(bool(torch.isfinite(t).all()) for t in (keep_all, pruned_eval, pruned_train))
    if not finite:
        raise VerificationError("the rewritten model produces non-finite outputs on the example input")
    if pruned_eval.shape != reference.shape:
        raise VerificationError(f"rewritten output shape {list(pruned_eval.shape)} != original {list(reference.shape)}")
    if not diff <= tolerance:
        raise VerificationError(
            f"keep-all output differs from the original by {diff:.3g} (tolerance {tolerance:g}): the rewrite is not exact"
        )
    return Verification(
        keep_all_max_abs_diff=float(diff),
        outputs_finite=finite,
        output_shape=list(reference.shape),
        flops_before=flops_before,
        flops_after=flops_after,
        flops_after_train=flops_after_train,
    )
