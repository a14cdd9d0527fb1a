"""FLOPs with ``torch.utils.flop_counter`` (matmuls, convolutions, attention; 1 MAC = 2 FLOPs).

``torch.utils.flop_counter`` knows only some of the attention kernels torch may dispatch to, and which
ones it knows depends on the installed torch: on torch 2.14.1, CPU ``scaled_dot_product_attention``
dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no formula, so every
attention FLOP counted 0; ``nn.MultiheadAttention``'s eval fast path (``aten._native_multi_head_attention``,
one fused kernel for the projections and the attention) counts 0 on every torch. :func:`flop_counter`
fills exactly the gaps of the installed torch with torch's own formulas (``sdpa_flop_count``), so a count
is the same on every torch the project admits, and equals the analytic count.
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward SDPA: ``q·kᵀ`` and ``attn·v`` (torch's own count)."""
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _native_mha(query_shape, key_shape, value_shape, embed_dim: int, num_heads: int, *args,
                out_shape=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fused fast path: in-projections, attention and out-projection.

    Shapes: query ``[B, N, C]``, key/value ``[B, M, C]`` (the fast path is batch-first).
    """
    b, n, c = query_shape
    m = key_shape[1]
    head_dim = embed_dim // num_heads
    projections = 2 * b * n * c * embed_dim + 2 * 2 * b * m * c * embed_dim + 2 * b * n * embed_dim * embed_dim
    attention = _fc.sdpa_flop_count((b, num_heads, n, head_dim), (b, num_heads, m, head_dim),
                                    (b, num_heads, m, head_dim))
    return projections + attention


#: aten op name -> formula, for ops the installed torch's flop counter may not know.
_FORMULAS: dict[str, Callable[..., int]] = {
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "_scaled_dot_product_fused_attention_overrideable": _sdpa,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward,
    "_native_multi_head_attention": _native_mha,
}


def missing_formulas() -> dict[Any, Callable[..., int]]:
    """The formulas of :data:`_FORMULAS` that the installed torch does not register itself."""
    mapping = {}
    for name, formula in _FORMULAS.items():
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and packet not in _fc.flop_registry:
            mapping[packet] = formula
    return mapping


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the attention kernels the installed torch misses."""
    return FlopCounterMode(display=False, custom_mapping=missing_formulas())


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients for the block (restored after).

    Under ``no_grad`` a view of a parameter (SigLIP's MAP head expands its latent query) still requires grad
    yet has no ``grad_fn``, and ``FlopCounterMode``'s module tracker asserts on such module inputs."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``example_input`` ``[B, C, H, W]``, in the model's current
    train/eval mode, without gradients. Token selection and gathers are not counted (they are not
    matmuls): linear layers, convolutions and attention are what dominates a ViT's cost.
    """
    counter = flop_counter()
    with torch.no_grad(), frozen_parameters(model), counter:
        model(example_input)
    return int(counter.get_total_flops())
