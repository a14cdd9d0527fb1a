"""Pure token operations on the residual stream ``[B, N, C]``.

These functions are what vitprune's inserted graph nodes compute. They take static counts (Python
ints fixed at rewrite time) so a compiled or exported graph has one token count per layer and only
the batch dimension varies. Gathers use flattened indices (one ``index_select`` on ``[B*N, C]``):
measured faster in ONNX Runtime than TopK + Expand + GatherElements (see ``shared/DESIGN.md``).
"""

from __future__ import annotations

import torch

SELECTIONS = ("random", "magnitude", "distinct")


def select_patch_indices(patches: torch.Tensor, keep_count: int, selection: str) -> torch.Tensor:
    """Choose ``keep_count`` patch tokens per image; returns their indices in original order.

    Args:
        patches: ``[B, P, C]`` patch tokens (prefix tokens excluded).
        keep_count: how many patch tokens to keep, ``1 <= keep_count <= P`` (a Python int).
        selection: ``"random"`` (uniform without replacement, PatchDropout, arXiv 2208.07220 §3),
            ``"magnitude"`` (largest L1 norm over channels, PSS, arXiv 2208.09520 §3.2) or ``"distinct"``
            (near-duplicate patches go first: :func:`distinct_scores`, for dense models).

    Returns:
        ``[B, keep_count]`` int64 indices into the patch axis, ascending (original order kept).

    Raises:
        ValueError: unknown ``selection``.
    """
    if selection == "random":
        scores = torch.rand(patches.shape[0], patches.shape[1], device=patches.device)
    elif selection in ("magnitude", "distinct"):
        scores = patch_scores(patches.detach(), 0, "l1" if selection == "magnitude" else "distinct")
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


#: Scores read from one attention row (linear cost: the block keeps its fused attention kernel).
ROW_SCORES = ("cls", "mean-query")
#: Every patch score a pruning point can use (see :func:`patch_scores`).
SCORES = ("cls", "mean-query", "attention-received", "l1", "l2", "cls-norm", "distinct")
#: Scores read from the stream alone (no attention of the block before).
STREAM_SCORES = ("l1", "l2", "distinct")


def score_flops(score: str, tokens: int, channels: int) -> int:
    """FLOPs per image of scoring ``tokens`` patch tokens of ``channels`` channels beyond what the model does
    anyway, as :mod:`torch.utils.flop_counter` counts them (matmuls: ``2·m·n·k``): ``"distinct"``'s
    ``[P, C] @ [C, P]`` similarity matrix, 0 for the others (a norm or one attention row is linear in ``P``)."""
    return 2 * tokens * tokens * channels if score == "distinct" else 0


def distinct_scores(patches: torch.Tensor) -> torch.Tensor:
    """``1 - max cosine similarity`` of each patch token ``[B, P, C]`` to any other: ``[B, P]``.

    A token with a near-duplicate among the others carries little the duplicate does not (ToMe's premise,
    arXiv 2210.09461 §3: similar tokens are redundant); dropping it loses least for a **dense** reader, which
    gets it back where it was (token restore). vitprune's default for dense readouts: measured on
    ``benchmarks/dense_digits.py``, attention- and norm-based scores drop the few tokens of the objects
    (background is the majority and draws the attention) and this keeps them. Costs ``2·P²·C`` FLOPs
    (:func:`score_flops`), counted in a FLOPs target.
    """
    p = torch.nn.functional.normalize(patches, dim=-1)
    sim = p @ p.transpose(1, 2)
    sim = (sim + sim.transpose(1, 2)) / 2  # exactly symmetric: a mutual nearest pair scores exactly the same
    self_sim = torch.eye(sim.shape[-1], dtype=sim.dtype, device=sim.device)
    return 1.0 - (sim - 3.0 * self_sim).amax(dim=-1)  # a cosine is >= -1: the diagonal (<= -2) never wins


#: resolution of :func:`ranked`: scores closer than this rank by position
RANK_RESOLUTION = 2 ** -10


def ranked(scores: torch.Tensor) -> torch.Tensor:
    """Tie-free ranking values of scores ``[B, P]`` in ``[0, 2]``: ``round(score / RANK_RESOLUTION) · P + (P - 1 - i)``.

    Scores with exact ties (a mutual nearest pair's :func:`distinct_scores`) or ties to rounding noise would be
    ranked by each backend's own ``topk`` (PyTorch and ONNX Runtime differ); this ranks them by position, the
    earlier first, in every backend. The values are integers below ``2^24`` (exact in float32) for ``P <= 8188``.
    """
    p = scores.shape[-1]
    scores = scores.float()  # the values need float32's 24-bit mantissa: in bfloat16 (8 bits) most would tie
    position = torch.arange(p - 1, -1, -1, dtype=scores.dtype, device=scores.device)
    return torch.round(scores / RANK_RESOLUTION) * p + position


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
        raise ValueError(f"unknown score {score!r}; expected one of {ROW_SCORES}")
    attn = torch.softmax((query @ k.transpose(-2, -1)) * scale, dim=-1)  # [B, H, 1, N]
    return attn.mean(dim=1)[:, 0, num_prefix_tokens:]


def patch_scores(x: torch.Tensor, num_prefix_tokens: int, score: str, *, q: torch.Tensor | None = None,
                 k: torch.Tensor | None = None, attn: torch.Tensor | None = None, scale: float | None = None,
                 cls_index: int = 0) -> torch.Tensor:
    """Importance of every patch token at a pruning point; higher is kept.

    - ``"cls"`` / ``"mean-query"``: one attention row of the block before
      (:func:`attention_patch_scores`; EViT, arXiv 2202.07800 §3).
    - ``"attention-received"``: attention each token receives, averaged over queries and heads (the
      column mean of the full map; costs an ``O(N² · d)`` score matrix beside a fused kernel).
    - ``"l1"`` / ``"l2"``: the token's norm over channels in the residual stream (magnitude, as
      PSS, arXiv 2208.09520 §3.2, uses L1).
    - ``"distinct"``: ``1 -`` the token's highest cosine similarity to another patch token
      (:func:`distinct_scores`: near-duplicates go first; the default for dense readouts), as :func:`ranked`
      values (ties broken by position, the same in PyTorch and ONNX Runtime).
    - ``"cls-norm"``: the CLS row times the token's L2 norm: attention weighted by the size of what the
      token carries (the ``‖α·f(x)‖`` view of Kobayashi et al., arXiv 2004.10102, with the stream token
      standing in for the value vector).

    Args:
        x: ``[B, N, C]`` residual stream at the pruning point (prefix tokens first).
        q, k: ``[B, H, N, d]`` of the block before, or ``attn``: its attention map ``[B, H, N, N]``.
        scale: the block's softmax scale (with ``q, k``).

    Returns:
        ``[B, N - num_prefix_tokens]`` scores.

    Raises:
        ValueError: unknown ``score``, or an attention score without ``q, k`` / ``attn``.
    """
    patches = x[:, num_prefix_tokens:]
    if score == "l1":
        return patches.abs().sum(dim=-1)
    if score == "l2":
        return patches.norm(dim=-1)
    if score == "distinct":
        return ranked(distinct_scores(patches))
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    if attn is None and (q is None or k is None):
        raise ValueError(f"score {score!r} needs the attention of the block before (q and k, or its map)")
    if score == "attention-received":
        if attn is None:
            attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
        return attn.mean(dim=(1, 2))[:, num_prefix_tokens:]
    row = "mean-query" if score == "mean-query" else "cls"
    if attn is None:
        rows = attention_patch_scores(q, k, num_prefix_tokens, scale, row, cls_index)
    else:
        rows = (attn[:, :, cls_index] if row == "cls" else attn.mean(dim=2)).mean(dim=1)[:, num_prefix_tokens:]
    return rows * patches.norm(dim=-1) if score == "cls-norm" else rows


def top_patch_indices(scores: torch.Tensor, keep_count: int) -> torch.Tensor:
    """``[B, P]`` scores -> ``[B, keep_count]`` indices of the highest, ascending (original order)."""
    return torch.sort(torch.topk(scores, keep_count, dim=1, sorted=False).indices, dim=1).values


def bipartite_soft_matching(metric: torch.Tensor, num_prefix_tokens: int, r: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching (arXiv 2210.09461 §3, "Token Merging"): which ``r`` tokens to merge into which.

    The patch tokens alternate into sets A (even patch positions) and B (odd); each A token's most
    similar B token (cosine similarity of ``metric``) is its match, and the ``r`` A tokens with the most
    similar matches are merged into them. Prefix tokens (CLS, registers, distillation) take no part: they
    are never merged and nothing merges into them (ToMe's merge.py puts CLS in A with a score of -inf,
    and a distillation token in B with -inf; leaving the prefix out does the same for any number of them).

    Args:
        metric: ``[B, N, d]`` what tokens are compared by (ToMe: the block's attention keys averaged over
            heads), prefix tokens first.
        num_prefix_tokens: tokens at the front that are never merged.
        r: tokens to merge away (a Python int, ``0 <= r <= (N - num_prefix_tokens) // 2``).

    Returns:
        ``(kept [B, N - r], src [B, r], dst [B, r])`` int64 token indices into ``N``: the tokens that stay,
        ascending (so the merged stream keeps the original order), the tokens merged away, and the token
        each of those is merged into (always one of ``kept``).

    Raises:
        ValueError: ``r`` outside ``[0, (N - num_prefix_tokens) // 2]``.
    """
    batch, tokens, _ = metric.shape
    p = num_prefix_tokens
    nb = (tokens - p) // 2  # |B|; |A| = tokens - p - nb >= nb
    if not 0 <= r <= nb:
        raise ValueError(f"r must be in [0, {nb}] for {tokens - p} patch tokens, got {r}")
    device = metric.device
    if nb == 0:  # one patch token at most: nothing to match
        kept = torch.arange(tokens, device=device).expand(batch, tokens)
        empty = kept[:, :0]
        return kept, empty, empty
    # float32 whatever the model runs in: 1e-12 is 0 in float16, and bfloat16's 8-bit mantissa ties most
    # similarities (which then match by each backend's own tie order)
    patches = metric[:, p:].detach().float()
    patches = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = patches[:, 0::2], patches[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # [B, |A|, |B|] cosine similarities
    best, match = scores.max(dim=-1)  # each A token's most similar B token
    # every A token ranked by its best similarity (one TopK over all of A: a static-size sort)
    order = torch.topk(best, a.shape[1], dim=1, largest=True, sorted=True).indices
    src_a, unmerged_a = order[:, :r], order[:, r:]
    dst_b = gather_tokens(match.unsqueeze(-1), src_a).squeeze(-1)  # flat Gather, not GatherElements
    prefix = torch.arange(p, device=device).expand(batch, p)
    b_tokens = (p + 1 + 2 * torch.arange(nb, device=device)).expand(batch, nb)
    kept = torch.sort(torch.cat([prefix, p + 2 * unmerged_a, b_tokens], dim=1), dim=1).values
    return kept, p + 2 * src_a, p + 1 + 2 * dst_b


def merge_tokens(x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens ``src`` into ``dst`` by size-weighted average (ToMe's ``merge_wavg``, arXiv 2210.09461 §3).

    A merged token is ``Σ size_i · x_i / Σ size_i`` over the tokens it holds, its size ``Σ size_i``; the other
    tokens are unchanged. No scatter with a reduction (ONNX Runtime and TensorRT refuse ``ScatterElements``
    with add): one flat gather (:func:`gather_tokens`) puts the kept tokens and the merged-away ones side by
    side, and a one-hot assignment ``[B, N - r, r]`` (kept token == destination) times the merged-away tokens
    adds each to its destination as one batched matmul.

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` how many original tokens each token holds (ones before the first merge).
        kept, src, dst: from :func:`bipartite_soft_matching` (``[B, N - r]``, ``[B, r]``, ``[B, r]``).

    Returns:
        ``(x [B, N - r, C], size [B, N - r, 1])`` in the order of ``kept``. With ``r = 0`` and sizes of one,
        ``x`` comes back unchanged (bit for bit).
    """
    keep, channels = kept.shape[1], x.shape[-1]
    weighted = torch.cat([x * size, size], dim=-1)  # size rides along as channel C
    picked = gather_tokens(weighted, torch.cat([kept, src], dim=1))
    stay, gone = picked[:, :keep], picked[:, keep:]
    assign = (kept.unsqueeze(2) == dst.unsqueeze(1)).to(x.dtype)  # [B, N - r, r]
    total = stay + assign @ gone
    # sizes are counts: no gradient flows into them (and SDPA's fused CPU kernel refuses a mask that needs one)
    merged_size = total[..., channels:].detach()
    return total[..., :channels] / merged_size, merged_size


def merge_sources(kept: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Where each input patch token went in a merge: its index among the output patch tokens.

    A token that stays goes to its own place in ``kept``; a merged-away token to the place of the token it
    was merged into (ToMe for Stable Diffusion's unmerge, arXiv 2303.17604: a merged token's output is
    copied back to every token it holds).
    Two ``ScatterElements`` without reduction (each index written once), so it exports.

    Args:
        kept, src, dst: from :func:`bipartite_soft_matching` (``[B, N - r]``, ``[B, r]``, ``[B, r]``, token
            indices into ``N``, prefix tokens first in ``kept``).

    Returns:
        ``[B, N - prefix]`` int64: for input patch ``i``, the index of the output patch token holding it.
        With ``r = 0``, ``arange(N - prefix)``.
    """
    batch, keep = kept.shape
    tokens = keep + src.shape[1]
    place = torch.arange(keep, device=kept.device).expand(batch, keep)
    where = torch.zeros(batch, tokens, dtype=torch.long, device=kept.device).scatter(1, kept, place)
    where = where.scatter(1, src, where.gather(1, dst))
    return where[:, num_prefix_tokens:] - num_prefix_tokens


def unmerge_tokens(x: torch.Tensor, num_prefix_tokens: int, holders: torch.Tensor) -> torch.Tensor:
    """Every patch token back in grid order from merged tokens: each grid position takes the features of
    the token that holds it (the unmerge of ToMe for Stable Diffusion, arXiv 2303.17604, for dense outputs).

    Args:
        x: ``[B, prefix + K, C]`` merged stream.
        holders: ``[B, P]`` for each grid position, the index among ``x``'s ``K`` patch tokens of the token
            holding it (the composition of every merge's :func:`merge_sources`).

    Returns:
        ``[B, prefix + P, C]``: prefix tokens, then the ``P`` patch tokens in grid order.
    """
    return torch.cat([x[:, :num_prefix_tokens], gather_tokens(x[:, num_prefix_tokens:], holders)], dim=1)


def update_canvas(x: torch.Tensor, num_prefix_tokens: int, positions: torch.Tensor | None,
                  canvas: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the patch tokens alive at a pruning point into the canvas of every patch's last features.

    The canvas is how dropped tokens come back for a dense reader (:func:`restore_tokens`): each grid
    position holds the features its token had the last time it was in the stream, which for a dropped token
    is the stream at the pruning point that dropped it (DynamicViT's and "Expediting Large-Scale ViTs for
    Dense Prediction"'s choice, arXiv 2210.01035 §3.2: a dropped token stops being updated). A scatter
    without reduction (``ScatterElements``, which ONNX Runtime and TensorRT run): the positions are distinct.

    Args:
        x: ``[B, prefix + K, C]`` stream at the pruning point, before it drops tokens.
        positions: ``[B, K]`` grid position of each of its patch tokens, or ``None`` before the first pruning
            point (then the ``K = P`` patch tokens are in grid order and become the canvas).
        canvas: ``[B, P, C]`` last features of every grid position so far (``None`` with ``positions``).

    Returns:
        ``(canvas [B, P, C], positions [B, K])``, ``positions`` filled in with ``arange(P)`` at the first point.
    """
    patches = x[:, num_prefix_tokens:]
    if positions is None:
        positions = torch.arange(patches.shape[1], device=x.device).expand(x.shape[0], -1)
        return patches, positions
    return canvas.scatter(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]), patches), positions


#: How a dropped token comes back for a dense reader (:func:`restore_tokens`).
RESTORE_RULES = ("last", "nearest")


def nearest_kept(reference: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """For every grid position, the kept token most similar to it: ``[B, P]`` indices into the ``K`` kept tokens.

    Args:
        reference: ``[B, P, C]`` every patch's features at the first pruning point (all of them alive there).
        positions: ``[B, K]`` grid positions of the kept patch tokens.

    Returns:
        ``[B, P]``: ``argmax_k cos(reference[p], reference[positions[k]])``, the first such ``k`` on a tie
        (``torch.argmax`` and ONNX ``ArgMax`` agree). Static shapes: one ``[B, P, K]`` similarity matrix
        (``2·P·K·C`` FLOPs, counted by the FLOP counter as any matmul), no host sync.
    """
    unit = torch.nn.functional.normalize(reference, dim=-1)
    kept = unit.gather(1, positions.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # [B, K, C]
    return (unit @ kept.transpose(1, 2)).argmax(dim=-1)


def restore_tokens(x: torch.Tensor, num_prefix_tokens: int, canvas: torch.Tensor, positions: torch.Tensor,
                   rule: str = "last", reference: torch.Tensor | None = None) -> torch.Tensor:
    """Every token back in its grid position: the kept tokens' current features, the dropped ones' by ``rule``.

    Rules (:data:`RESTORE_RULES`):

    - ``"last"``: a dropped token's features when it was dropped (``canvas``; DynamicViT's and arXiv 2210.01035
      §3.2's "stops being updated");
    - ``"nearest"``: the *current* features of the kept token most similar to it at the first pruning point
      (:func:`nearest_kept`), i.e. the most similar token's features propagated through the later blocks, so a
      dropped token looks like the tokens the head was trained on (issue 27).

    Args:
        x: ``[B, prefix + K, C]`` stream after pruning (its patch tokens at grid ``positions``).
        canvas: ``[B, P, C]`` from :func:`update_canvas` (the last pruning point before ``x``).
        positions: ``[B, K]`` grid positions of ``x``'s patch tokens.
        rule: ``"last"`` or ``"nearest"``.
        reference: ``[B, P, C]`` every patch at the first pruning point (the first canvas); needed by ``"nearest"``.

    Returns:
        ``[B, prefix + P, C]``: prefix tokens, then the ``P`` patch tokens in grid order. With every token kept
        (``positions`` a permutation of ``arange(P)``), the stream itself in grid order, whatever the rule: the
        kept tokens are written last, over every position.

    Raises:
        ValueError: an unknown ``rule``, or ``"nearest"`` without ``reference``.
    """
    if rule not in RESTORE_RULES:
        raise ValueError(f"unknown restore rule {rule!r}; expected one of {', '.join(RESTORE_RULES)}")
    kept = x[:, num_prefix_tokens:]
    if rule == "nearest":
        if reference is None:
            raise ValueError("restore rule 'nearest' needs the reference features of every patch")
        canvas = gather_tokens(kept, nearest_kept(reference, positions))
    index = positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    patches = canvas.scatter(1, index, kept)
    return torch.cat([x[:, :num_prefix_tokens], patches], dim=1)


def gather_token_axes(table: torch.Tensor, positions: torch.Tensor, num_prefix_tokens: int, rank: int,
                      token_axes: list[tuple[int, bool]]) -> torch.Tensor:
    """A tensor indexed by token position, gathered per image for the tokens still alive.

    RoPE sin/cos tables ``[P, d]``, relative-position biases ``[1, H, N, N]`` and position embeddings
    added after a pruning point hold one entry per grid position; once each image keeps its own tokens they
    must follow them (DESIGN.md: BEiT's bias stays ``[H, 197, 197]``, EVA-02's RoPE table keeps 256 rows).
    One flat ``index_select`` (``Gather`` in ONNX) over the token axes taken together: it reads only what it
    returns (a bias's rows and columns in one step, not rows then columns).

    Args:
        table: the image-independent tensor, broadcasting (aligned right) against a rank-``rank`` operand whose
            axis 0 is the batch (so the table, padded to that rank, has size 1 there).
        positions: ``[B, K]`` grid positions of the patch tokens alive where the tensor is used.
        token_axes: ``(axis, with_prefix)`` per token axis, counted in the rank-``rank`` frame: ``with_prefix``
            axes index every token (prefix tokens first, always kept), the others the patch tokens only.

    Returns:
        ``[B, ...]`` of rank ``rank``: each token axis ``K`` long (``num_prefix_tokens + K`` with prefix), the
        other axes as in ``table``. A per-image bias ``[B, H, K', K']`` costs ``B·H·K'²`` floats of memory.
    """
    batch = positions.shape[0]
    full = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape))
    if full.shape[0] != 1:  # a per-image table [B, ...] (RoPE from per-image positions, a bias plus a batch mask)
        return _gather_per_image(full, positions, num_prefix_tokens, token_axes)
    t = full[0]  # drop the (size-1) batch axis
    tokens = [a - 1 for a, _ in token_axes]
    rest = [a for a in range(t.dim()) if a not in tokens]
    flat = _flat_token_index(positions, num_prefix_tokens, token_axes, [t.shape[a] for a in tokens])
    lengths, sizes = list(flat.shape[1:]), [t.shape[a] for a in rest]
    if tokens == list(range(t.dim() - len(tokens), t.dim())):  # token axes last (a bias [H, N, N]): gather columns
        picked = t.reshape(*sizes, -1).index_select(-1, flat.reshape(-1)).reshape(*sizes, batch, *lengths)
        where = {a: i for i, a in enumerate(rest)} | {a: len(rest) + 1 + i for i, a in enumerate(tokens)}
        batch_axis = len(rest)
    else:  # token axes first (a RoPE table [P, d]), or moved there: gather rows
        picked = t.permute(*tokens, *rest).reshape(-1, *sizes).index_select(0, flat.reshape(-1))
        picked = picked.reshape(batch, *lengths, *sizes)
        where = {a: 1 + i for i, a in enumerate(tokens)} | {a: 1 + len(tokens) + i for i, a in enumerate(rest)}
        batch_axis = 0
    # [B, axes of the table in their order], the token axes now K long
    return picked.permute(batch_axis, *[where[a] for a in range(t.dim())])


def _flat_token_index(positions: torch.Tensor, num_prefix_tokens: int, token_axes: list[tuple[int, bool]],
                      sizes: list[int]) -> torch.Tensor:
    """``[B, K_1, ..., K_t]``: per image, the flat index over the token axes taken together (row-major over
    their ``sizes``) of the live tokens (prefix tokens first on ``with_prefix`` axes)."""
    batch = positions.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=positions.device).expand(batch, -1)
    flat = None
    for (_, with_prefix), size in zip(token_axes, sizes):
        index = torch.cat([prefix, positions + num_prefix_tokens], dim=1) if with_prefix else positions
        flat = index if flat is None else flat.unsqueeze(-1) * size + index.reshape(batch, *([1] * (flat.dim() - 1)), -1)
    return flat


def _gather_per_image(table: torch.Tensor, positions: torch.Tensor, num_prefix_tokens: int,
                      token_axes: list[tuple[int, bool]]) -> torch.Tensor:
    """:func:`gather_token_axes` of a table with a batch axis of size ``B`` (``table [B, ...]``, its rank the
    operand's): image ``b``'s entries at image ``b``'s live tokens, one flat ``index_select`` over batch and
    token axes together (gemma4's RoPE ``[B, N, 1, d]``, Hugging Face BEiT's bias ``[B, H, N, N]``)."""
    batch = positions.shape[0]
    tokens = [a for a, _ in token_axes]
    rest = [a for a in range(1, table.dim()) if a not in tokens]
    flat = _flat_token_index(positions, num_prefix_tokens, token_axes, [table.shape[a] for a in tokens])
    per_image = 1  # entries one image's token axes hold
    for a in tokens:
        per_image *= table.shape[a]
    offsets = torch.arange(batch, device=positions.device).reshape(batch, *([1] * (flat.dim() - 1))) * per_image
    sizes = [table.shape[a] for a in rest]
    picked = table.expand(batch, *table.shape[1:]).permute(0, *tokens, *rest).reshape(-1, *sizes)
    picked = picked.index_select(0, (flat + offsets).reshape(-1)).reshape(batch, *flat.shape[1:], *sizes)
    where = {a: 1 + i for i, a in enumerate(tokens)} | {a: 1 + len(tokens) + i for i, a in enumerate(rest)}
    return picked.permute(0, *[where[a] for a in range(1, table.dim())])
