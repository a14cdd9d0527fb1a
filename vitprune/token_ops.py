"""Pure token operations on the residual stream ``[B, N, C]``.

These functions are what vitprune's inserted graph nodes compute. They take static counts (Python
ints fixed at rewrite time) so a compiled or exported graph has one token count per layer and only
the batch dimension varies. Gathers use flattened indices (one ``index_select`` on ``[B*N, C]``):
measured faster in ONNX Runtime than TopK + Expand + GatherElements (see ``shared/DESIGN.md``).
"""

from __future__ import annotations

import torch

SELECTIONS = ("random", "magnitude")


def select_patch_indices(patches: torch.Tensor, keep_count: int, selection: str) -> torch.Tensor:
    """Choose ``keep_count`` patch tokens per image; returns their indices in original order.

    Args:
        patches: ``[B, P, C]`` patch tokens (prefix tokens excluded).
        keep_count: how many patch tokens to keep, ``1 <= keep_count <= P`` (a Python int).
        selection: ``"random"`` (uniform without replacement, PatchDropout, arXiv 2208.07220 §3) or
            ``"magnitude"`` (largest L1 norm over channels, PSS, arXiv 2208.09520 §3.2).

    Returns:
        ``[B, keep_count]`` int64 indices into the patch axis, ascending (original order kept).

    Raises:
        ValueError: unknown ``selection``.
    """
    if selection == "random":
        scores = torch.rand(patches.shape[0], patches.shape[1], device=patches.device)
    elif selection == "magnitude":
        scores = patches.detach().abs().sum(dim=-1)
    else:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    top = torch.topk(scores, keep_count, dim=1, sorted=False).indices
    return torch.sort(top, dim=1).values


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather tokens per image with flattened indices.

    Args:
        x: ``[B, N, C]`` tokens.
        indices: ``[B, K]`` int64 token indices into ``N``.

    Returns:
        ``[B, K, C]``: ``out[b, k] = x[b, indices[b, k]]``.
    """
    batch, tokens, channels = x.shape
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * tokens
    flat = (indices + offsets).reshape(-1)
    return x.reshape(batch * tokens, channels).index_select(0, flat).reshape(batch, indices.shape[1], channels)


def drop_patch_tokens(
    x: torch.Tensor, num_prefix_tokens: int, keep_count: int, selection: str
) -> torch.Tensor:
    """Keep all prefix tokens and ``keep_count`` patch tokens, in original order.

    Args:
        x: ``[B, num_prefix_tokens + P, C]`` residual stream, prefix tokens first.
        num_prefix_tokens: CLS / distillation / register tokens at the front (always kept).
        keep_count: patch tokens kept per image (Python int, ``1 <= keep_count <= P``).
        selection: see :func:`select_patch_indices`.

    Returns:
        ``[B, num_prefix_tokens + keep_count, C]``.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    kept = gather_tokens(patches, select_patch_indices(patches, keep_count, selection))
    return torch.cat([prefix, kept], dim=1)


def keep_count_for_rate(num_patches: int, keep_rate: float) -> int:
    """Static keep count for a keep rate: ``max(1, int(num_patches * keep_rate))`` (as PatchDropout).

    Raises:
        ValueError: ``keep_rate`` outside ``(0, 1]``.
    """
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate}")
    return max(1, min(num_patches, int(num_patches * keep_rate + 1e-9)))
