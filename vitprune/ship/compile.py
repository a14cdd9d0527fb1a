"""``vitprune.ship.compile``: torch.compile with the batch dimension dynamic and everything else static.

Token counts per layer are Python ints fixed at rewrite time, so the only shape that varies between
calls is the batch. Marking it dynamic (``torch._dynamo.mark_dynamic(x, 0)``) lets one compiled graph
serve every batch size; dynamo still specialises batch 1 (its 0/1 specialisation), so at most two
graphs are built: one for batch 1 and one for every other batch size.

On CUDA, ``cuda_graphs=True`` compiles with ``mode="reduce-overhead"`` (inductor's CUDA graphs): it
removes the launch overhead at small batches, but records one CUDA graph per distinct batch size and
keeps its static input/output buffers alive, so use it with a few fixed batch sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CompiledModel(nn.Module):
    """A compiled model whose forward marks the input's batch dimension dynamic.

    Shapes: ``x [B, C, H, W]`` with any ``B >= 1``; ``C, H, W`` as the model was verified with.
    The wrapped eager model is :attr:`model` (its state dict is the compiled model's).
    """

    def __init__(self, model: nn.Module, *, cuda_graphs: bool = False, backend: str = "inductor",
                 **compile_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        mode = "reduce-overhead" if cuda_graphs else compile_kwargs.pop("mode", None)
        self._compiled = torch.compile(model, backend=backend, mode=mode, dynamic=False, **compile_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            # mark a view, not the caller's tensor: the mark stays on the tensor object, and another
            # torch.compile'd model given that tensor later would recompile for a dynamic batch
            x = x.view(x.shape)
            torch._dynamo.mark_dynamic(x, 0)
        return self._compiled(x)


def compile(model: nn.Module, *, cuda_graphs: bool = False, backend: str = "inductor", **compile_kwargs: Any) -> CompiledModel:
    """Compile ``model`` (a vitprune-rewritten GraphModule or any model) for every batch size.

    Args:
        model: the model; put it in the mode (``eval()``) you will run it in before the first call.
        cuda_graphs: use inductor's CUDA graphs (``mode="reduce-overhead"``); CUDA only.
        backend: the torch.compile backend (``"inductor"``; ``"eager"`` for debugging).
        **compile_kwargs: passed to :func:`torch.compile` (``dynamic`` is fixed to ``False``: only the
            batch dimension is dynamic).

    Returns:
        A :class:`CompiledModel`; call it like the model.
    """
    return CompiledModel(model, cuda_graphs=cuda_graphs, backend=backend, **compile_kwargs)
