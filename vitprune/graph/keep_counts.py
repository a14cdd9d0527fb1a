"""Keep schedules: how many patch tokens stay alive before each block, as Python ints.

A schedule maps a block index ``b`` to the patch tokens kept before block ``b``; masks are nested
(a token dropped before block ``b`` is gone for every later block), so counts never increase.
FLOPs are predicted from the analysed graph: per block ``linear_flops_per_token · N`` plus
``4 · heads · head_dim · N²`` for attention (what ``torch.utils.flop_counter`` counts), and the rest of
the model (patch embedding, head) is constant in the token count.

Token merging (ToMe, token-merge) has schedules of its own: ``{block: r}``, ``r`` tokens merged between
the block's attention and its MLP (:func:`merge_schedule`, :func:`merge_flops`, :func:`solve_merge_for_flops`).
"""

from __future__ import annotations

from vitprune.graph.analysis import ViTGraph
from vitprune.errors import VitpruneError


def parse_keep(spec: str | dict) -> dict[int, float]:
    """``"3:0.7,6:0.7"`` -> ``{3: 0.7, 6: 0.7}`` (before block 3 keep 70% of the patches alive there).

    Raises:
        VitpruneError: malformed spec, or a rate outside (0, 1].
    """
    if isinstance(spec, dict):
        items = [(int(k), float(v)) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            block, sep, rate = part.partition(":")
            try:
                items.append((int(block), float(rate)))
            except ValueError:
                raise VitpruneError(f"keep schedule item {part.strip()!r} is not BLOCK:RATE (e.g. 3:0.7)") from None
            if not sep:
                raise VitpruneError(f"keep schedule item {part.strip()!r} is not BLOCK:RATE (e.g. 3:0.7)")
    for block, rate in items:
        if not 0.0 < rate <= 1.0:
            raise VitpruneError(f"keep rate before block {block} must be in (0, 1], got {rate}")
    return dict(sorted(items))


def counts_from_rates(num_patches: int, num_blocks: int, rates: dict[int, float]) -> dict[int, int]:
    """Nested keep counts: before block ``b`` keep ``max(1, int(alive · rate))`` of the ``alive`` patches.

    Raises:
        VitpruneError: a block index outside ``1 .. num_blocks - 1`` (before block 0 is token-drop's place).
    """
    counts, alive = {}, num_patches
    for block, rate in sorted(rates.items()):
        if not 1 <= block < num_blocks:
            raise VitpruneError(f"pruning before block {block}: the model has blocks 0..{num_blocks - 1}; use 1..{num_blocks - 1}")
        alive = max(1, int(alive * rate + 1e-9))
        counts[block] = alive
    return counts


def default_min_keep(num_patches: int) -> int:
    """The fewest patch tokens a solver lets a block run on: ``min(10% of the patches, 16)``, at least 1.

    Why a floor: the blocks after the pruning point are the only FLOPs a token method can cut; when the rest of
    the model is large (a dense decoder), a solver chasing a whole-model target drives the last blocks to a
    handful of tokens (issue 27: DINOv2-S/14 at importance-mask ``--flops 0.5`` ran blocks 9-11 on 7, 4 and 2
    tokens) with no warning. The numbers are a default, not a measurement: 16 tokens is a 4x4 grid of a 14x14
    image, and 10% keeps small grids (64 patches: 6) from being floored at a quarter of the image; ``--min-keep``
    sets another."""
    return max(1, min(16, num_patches // 10))


def min_keep_for(vit: ViTGraph, min_keep: int | None) -> int:
    """``min_keep`` (``--min-keep``) checked against the model, or :func:`default_min_keep`.

    Raises:
        VitpruneError: ``min_keep`` outside ``1 .. num_patches``.
    """
    if min_keep is None:
        return default_min_keep(vit.num_patches)
    if not 1 <= int(min_keep) <= vit.num_patches:
        raise VitpruneError(f"--min-keep must be in 1..{vit.num_patches} (the model's patches), got {min_keep}")
    return int(min_keep)


def prunable_share(vit: ViTGraph, total_flops: float, first_block: int) -> float:
    """The share of the model's FLOPs (``total_flops`` per image) in blocks ``first_block ..``: all a token
    method pruning from ``first_block`` on can cut (the patch embedding, the blocks before, the head and a dense
    decoder stay as they are). Each block at the tokens it attends over now (a model vitprune rewrote runs its
    later blocks on fewer: counting them at every token gave shares over 100%)."""
    full = [b.tokens for b in vit.blocks]
    later = block_flops(vit, full) - block_flops(vit, full[:first_block] + [0] * (vit.num_blocks - first_block))
    return later / total_flops if total_flops else 0.0


def prunable_shares(vit: ViTGraph, total_flops: float) -> list[float]:
    """:func:`prunable_share` for a pruning point before each block: ``[share from block 0, from 1, ...]``."""
    return [prunable_share(vit, total_flops, b) for b in range(vit.num_blocks)]


def prunable_share_of(vit: ViTGraph, decisions: dict, total_flops: float) -> float | None:
    """:func:`prunable_share` from the first block a pass's ``decisions`` run on fewer tokens (its
    ``tokens_after_merge`` or ``tokens_per_block``: a list per block, or one int for every block), or None
    when they say nothing of the blocks."""
    per_block = decisions.get("tokens_after_merge") or decisions.get("tokens_per_block")
    if isinstance(per_block, int):
        return prunable_share(vit, total_flops, 0)
    first = next((b for b, n in enumerate(per_block or []) if n < vit.num_tokens), None)
    return None if first is None else prunable_share(vit, total_flops, first)


def _refuse_below(target: float, reachable: float, vit: ViTGraph, total_flops: float, first_block: int,
                  floor: int, how: str, hint: str = "") -> VitpruneError:
    share = prunable_share(vit, total_flops, first_block)
    return VitpruneError(f"FLOPs target {target} is below {reachable:.3f}, the least reachable {how} (at least "
                         f"{floor} patch tokens per block, --min-keep; blocks {first_block}.. hold {share:.0%} of the "
                         f"model's FLOPs, all the method can prune){hint}")


def tokens_per_block(vit: ViTGraph, counts: dict[int, int]) -> list[int]:
    """Tokens (prefix + patches) each block attends over under ``counts``."""
    out, patches = [], vit.num_patches
    for block in range(vit.num_blocks):
        patches = counts.get(block, patches)
        out.append(vit.num_prefix_tokens + patches)
    return out


def block_flops(vit: ViTGraph, tokens: list[int]) -> int:
    """Predicted FLOPs of all blocks when block ``i`` sees ``tokens[i]`` tokens, and of the readout's part that
    grows with the tokens the last block hands it (``vit.readout.flops_per_token``: an attention pool's key and
    value projections and its attention)."""
    return sum(b.linear_flops_per_token * n + 4 * b.attention_heads * (b.head_dim or b.dim // b.heads) * n * n
               for b, n in zip(vit.blocks, tokens)) + vit.readout.flops_per_token * (tokens[-1] if tokens else 0)


def scoring_flops(vit: ViTGraph, counts: dict[int, int], score: str | None, stages: str = "each") -> int:
    """FLOPs per image of scoring the patches at the pruning points of ``counts`` with ``score`` beyond what
    the model computes anyway (:func:`vitprune.ops.token_ops.score_flops`): at each point that drops tokens
    (``stages="each"``, importance-mask), or once over every patch at the first (``"first"``, lifespan-gather)."""
    from vitprune.ops.token_ops import score_flops

    if score is None:
        return 0
    alive, out = vit.num_patches, 0
    for b, k in sorted(counts.items()):
        if k < alive:
            out += score_flops(score, alive, vit.blocks[b].dim)
            alive = k
            if stages == "first":
                break
    return out


def predicted_ratio(vit: ViTGraph, counts: dict[int, int], total_flops: int, score: str | None = None,
                    stages: str = "each", overhead: float | None = None) -> float:
    """Predicted FLOPs ratio to the original for ``counts``; ``total_flops``: the original's, per image;
    ``score``: the patch score the pruning points compute (its cost: :func:`scoring_flops`); ``overhead``: the
    inserted modules' own FLOPs per image as the counter measured them, counted instead of that estimate."""
    full = block_flops(vit, [vit.num_tokens] * vit.num_blocks)
    fixed = total_flops - full
    tokens = block_flops(vit, tokens_per_block(vit, counts))
    extra = scoring_flops(vit, counts, score, stages) if overhead is None else overhead
    return (fixed + tokens + extra) / total_flops


def solve_for_flops(vit: ViTGraph, target: float, total_flops: int, first_block: int = 3, score: str | None = None,
                    stages: str = "each", min_keep: int | None = None, option: str = "--first-block",
                    overhead: float | None = None) -> dict[int, int]:
    """Per-block keep counts whose predicted FLOPs ratio (with ``score``'s cost, or the measured ``overhead``
    of the inserted modules: :func:`predicted_ratio`) is closest to ``target``.

    vitprune's schedule shape (the paper tunes counts per layer by an error tolerance): blocks before
    ``first_block`` keep every token; from ``first_block`` on, each block keeps the same fraction ``r`` of
    the patches alive before it (a geometric decay, nested by construction), ``r`` found by bisection; no
    block keeps fewer than ``min_keep`` patches (default :func:`default_min_keep`).

    Raises:
        VitpruneError: ``target`` outside (0, 1], ``first_block`` outside the model, or a target below
            what keeping ``min_keep`` patches from ``first_block`` on can reach (the message names that
            minimum, the share of the FLOPs the blocks from ``first_block`` hold, and ``option``, the command-line
            option that sets ``first_block``).
    """
    if not 0.0 < target <= 1.0:
        raise VitpruneError(f"FLOPs target must be in (0, 1], got {target}")
    if not 1 <= first_block < vit.num_blocks:
        raise VitpruneError(f"first pruned block must be in 1..{vit.num_blocks - 1}, got {first_block}")

    least = min_keep_for(vit, min_keep)

    def counts_for(r: float) -> dict[int, int]:
        counts = counts_from_rates(vit.num_patches, vit.num_blocks, {b: r for b in range(first_block, vit.num_blocks)})
        return {b: max(k, least) for b, k in counts.items()}

    def ratio(counts: dict[int, int]) -> float:
        return predicted_ratio(vit, counts, total_flops, score, stages, overhead)

    floor = ratio({b: least for b in range(first_block, vit.num_blocks)})
    if target < floor - 1e-9:
        raise _refuse_below(target, floor, vit, total_flops, first_block, least,
                            f"when blocks 0..{first_block - 1} keep every token",
                            f"; or prune from an earlier block ({option} {first_block - 1} or lower; in Python "
                            f"{option.lstrip('-').replace('-', '_')}=...)" if first_block > 1 else "")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if ratio(counts_for(mid)) > target:
            hi = mid
        else:
            lo = mid
    candidates = [counts_for(lo), counts_for(hi)]
    best = min(candidates, key=lambda c: abs(ratio(c) - target))
    return {b: k for b, k in best.items() if k < vit.num_patches or b == first_block}


# --------------------------------------------------------------------------------------------
# token merging (ToMe): a block merges r tokens between its attention and its MLP


def merge_schedule(vit: ViTGraph, r: int, first_block: int = 0, last_block: int | None = None,
                   min_keep: int = 1) -> dict[int, int]:
    """ToMe's schedule for a constant ``r``: every block from ``first_block`` (to ``last_block``, inclusive;
    default the last) merges ``min(r, P_b // 2)`` of the ``P_b`` patch tokens alive there (merge.py caps ``r``
    at half the tokens the same way, bipartite matching merging at most one set into the other); blocks that
    would merge nothing are left out; no block merges below ``min_keep`` patch tokens left.

    Returns:
        ``{block: tokens merged in that block}``, every value ``>= 1``.
    """
    return _capped_schedule(vit, lambda block: r, first_block, last_block, min_keep)


def _capped_schedule(vit: ViTGraph, wanted, first_block: int, last_block: int | None, min_keep: int) -> dict[int, int]:
    """:func:`merge_schedule` with ``wanted(block)`` tokens asked of each block (then capped the same way)."""
    merges, alive = {}, vit.num_patches
    end = vit.num_blocks if last_block is None else min(vit.num_blocks, last_block + 1)
    for block in range(first_block, end):
        merged = max(0, min(wanted(block), alive // 2, alive - min_keep))
        if merged > 0:
            merges[block] = merged
            alive -= merged
    return merges


def merge_tokens_per_block(vit: ViTGraph, merges: dict[int, int]) -> list[int]:
    """Tokens (prefix + patches) each block's attention sees when block ``b`` merges ``merges[b]`` tokens
    after its attention (its MLP sees ``merges[b]`` fewer)."""
    out, tokens = [], vit.num_tokens
    for block in range(vit.num_blocks):
        out.append(tokens)
        tokens -= merges.get(block, 0)
    return out


def merge_flops(vit: ViTGraph, merges: dict[int, int], mlp_flops_per_token: list[int]) -> int:
    """Predicted FLOPs of all blocks under ``merges`` (the counter's view, as :func:`block_flops`).

    A merging block with ``N`` tokens, ``r`` merged: its attention branch costs
    ``(linear_flops_per_token - mlp) · N + 4 · heads · head_dim · N²``, its MLP branches ``mlp · (N - r)``
    (``mlp_flops_per_token[b]``: the linear FLOPs per token of the residual branches after the attention),
    and the merge its two matmuls (:func:`vitprune.ops.token_ops.bipartite_soft_matching`'s similarities
    ``2 · |A| · |B| · head_dim``, :func:`~vitprune.ops.token_ops.merge_tokens`'s assignment
    ``2 · (N - r) · r · (C + 1)``).
    """
    total, n, r = 0, vit.num_tokens, 0
    for b, n, mlp in zip(vit.blocks, merge_tokens_per_block(vit, merges), mlp_flops_per_token):
        r = merges.get(b.index, 0)
        head_dim = b.head_dim or b.dim // b.heads
        total += (b.linear_flops_per_token - mlp) * n + 4 * b.attention_heads * head_dim * n * n + mlp * (n - r)
        if r:
            patches = n - vit.num_prefix_tokens
            total += 2 * (patches - patches // 2) * (patches // 2) * head_dim + 2 * (n - r) * r * (b.dim + 1)
    return total + vit.readout.flops_per_token * (n - r)  # the readout reads what the last block leaves


def merge_predicted_ratio(vit: ViTGraph, merges: dict[int, int], total_flops: int,
                          mlp_flops_per_token: list[int]) -> float:
    """Predicted FLOPs ratio to the original under ``merges``; ``total_flops``: the original's, per image."""
    fixed = total_flops - block_flops(vit, [vit.num_tokens] * vit.num_blocks)
    return (fixed + merge_flops(vit, merges, mlp_flops_per_token)) / total_flops


def solve_merge_for_flops(vit: ViTGraph, target: float, total_flops: int, mlp_flops_per_token: list[int],
                          first_block: int = 0, last_block: int | None = None, min_keep: int | None = None) -> int:
    """The constant ``r`` (ToMe's schedule, :func:`merge_schedule`, in blocks ``first_block`` to ``last_block``,
    default the last) whose predicted FLOPs ratio is closest to ``target``, by bisection (the ratio falls as
    ``r`` grows); no block is left with fewer than ``min_keep`` patch tokens (default :func:`default_min_keep`).

    Raises:
        VitpruneError: ``target`` outside (0, 1], ``first_block`` outside the model, or a target below what
            merging as much as bipartite matching and the floor allow in those blocks can reach.
    """
    if not 0.0 < target <= 1.0:
        raise VitpruneError(f"FLOPs target must be in (0, 1], got {target}")
    if not 0 <= first_block < vit.num_blocks:
        raise VitpruneError(f"first merging block must be in 0..{vit.num_blocks - 1}, got {first_block}")

    least = min_keep_for(vit, min_keep)

    def ratio(r: int) -> float:
        return merge_predicted_ratio(vit, merge_schedule(vit, r, first_block, last_block, least), total_flops,
                                     mlp_flops_per_token)

    most = vit.num_patches // 2
    floor = ratio(most)
    if target < floor - 0.01:
        raise _refuse_below(target, floor, vit, total_flops, first_block, least,
                            f"by merging up to half the patch tokens in every block from block {first_block} on"
                            + (f" to block {last_block}" if last_block is not None else ""))
    lo, hi = 0, most  # ratio(lo) >= target > ratio(hi) once the loop ends (or lo == hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ratio(mid) >= target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda r: abs(ratio(r) - target))


def refine_merge_schedule(vit: ViTGraph, r: int, target: float, total_flops: int, mlp_flops_per_token: list[int],
                          first_block: int = 0, last_block: int | None = None, min_keep: int = 1) -> dict[int, int]:
    """The schedule closest to ``target`` among those that merge ``s`` or ``s + 1`` tokens per block, for ``s``
    in ``r - 1`` and ``r`` (the solved constant and the one below it; each count capped as in
    :func:`merge_schedule`): the first ``j`` or the last ``j`` merging blocks merge ``s + 1``, the others
    ``s``, ``j`` from 0 to every block. One more token merged in one block is the finest step an integer per
    block allows (merging late saves less than merging early, so the two orders interleave their steps);
    ToMe's constant ``r`` alone can miss a FLOPs target by a whole ``r`` step (0.57 for 0.6 on a small SigLIP).
    Every count is a Python int. Returns ``{block: tokens merged}``, as :func:`merge_schedule`.
    """
    end = vit.num_blocks if last_block is None else min(vit.num_blocks, last_block + 1)
    blocks = list(range(first_block, end))
    best, best_gap = merge_schedule(vit, r, first_block, last_block, min_keep), None
    for base in (max(0, r - 1), r):
        for j in range(len(blocks) + 1):
            for more in (set(blocks[:j]), set(blocks[len(blocks) - j:])):
                merges = _capped_schedule(vit, lambda b, more=more, base=base: base + (b in more), first_block,
                                          last_block, min_keep)
                gap = abs(merge_predicted_ratio(vit, merges, total_flops, mlp_flops_per_token) - target)
                if best_gap is None or gap < best_gap - 1e-12:
                    best, best_gap = merges, gap
    return best
