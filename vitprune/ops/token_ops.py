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
    return top_patch_indices(scores, keep_count)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep all prefix tokens and ``keep_count`` patch tokens, in original order.

    Args:
        x: ``[B, num_prefix_tokens + P, C]`` residual stream, prefix tokens first.
        num_prefix_tokens: CLS / distillation / register tokens at the front (always kept).
        keep_count: patch tokens kept per image (Python int, ``1 <= keep_count <= P``).
        selection: see :func:`select_patch_indices`.

    Returns:
        ``(tokens [B, num_prefix_tokens + keep_count, C], kept [B, keep_count])``: the kept patch
        indices, into the input's patch tokens.
    """
    return keep_patch_tokens(x, num_prefix_tokens, select_patch_indices(x[:, num_prefix_tokens:], keep_count, selection))


def keep_patch_tokens(x: torch.Tensor, num_prefix_tokens: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix tokens, then the patch tokens at ``kept`` ``[B, K]`` (indices into the patch tokens).

    Returns:
        ``(tokens [B, num_prefix_tokens + K, C], kept)``.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    return torch.cat([prefix, gather_tokens(patches, kept)], dim=1), kept


def keep_count_for_rate(num_patches: int, keep_rate: float) -> int:
    """Static keep count for a keep rate: ``max(1, int(num_patches * keep_rate))`` (as PatchDropout).

    Raises:
        ValueError: ``keep_rate`` outside ``(0, 1]``.
    """
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate}")
    return max(1, min(num_patches, int(num_patches * keep_rate + 1e-9)))


SCORES = ("cls", "mean-query")


def attention_patch_scores(
    q: torch.Tensor, k: torch.Tensor, num_prefix_tokens: int, scale: float, score: str = "cls", cls_index: int = 0
) -> torch.Tensor:
    """Patch importance from one attention row: softmax(q_r · Kᵀ · scale), averaged over heads.

    ``score="cls"``: the row of the CLS query (EViT, arXiv 2202.07800 §3; the top-down score of Patch
    Slimming, arXiv 2106.02852, uses the same attention). ``score="mean-query"`` (vitprune's choice for
    models without a CLS token): the row of the mean query, i.e. attention from the average token.
    One row costs ``O(N · d)`` per head, so the block keeps its fused attention kernel.

    Args:
        q, k: ``[B, H, N, d]`` queries and keys of the attention block before the pruning point.
        num_prefix_tokens: prefix tokens at the front (scored keys exclude them).
        scale: softmax scale of the block (``d ** -0.5`` for standard attention).

    Returns:
        ``[B, N - num_prefix_tokens]`` scores of the patch tokens (each row sums to at most 1).
    """
    if score == "cls":
        query = q[:, :, cls_index:cls_index + 1]
    elif score == "mean-query":
        query = q.mean(dim=2, keepdim=True)
    else:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    attn = torch.softmax((query @ k.transpose(-2, -1)) * scale, dim=-1)  # [B, H, 1, N]
    return attn.mean(dim=1)[:, 0, num_prefix_tokens:]


def top_patch_indices(scores: torch.Tensor, keep_count: int) -> torch.Tensor:
    """``[B, P]`` scores -> ``[B, keep_count]`` indices of the highest, ascending (original order)."""
    return torch.sort(torch.topk(scores, keep_count, dim=1, sorted=False).indices, dim=1).values
