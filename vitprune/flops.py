"""FLOPs with ``torch.utils.flop_counter`` (counts matmuls, convolutions and SDPA; 1 MAC = 2 FLOPs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``example_input`` ``[B, C, H, W]``, in the model's current
    train/eval mode, without gradients. Token selection and gathers are not counted (they are not
    matmuls): :mod:`torch.utils.flop_counter` counts what dominates a ViT's cost.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return int(counter.get_total_flops())
