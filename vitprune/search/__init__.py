"""``vitprune.search``: the per-block schedule that keeps the most of a model's output at a FLOPs and/or latency budget.

For users who cannot fine-tune: Patch Slimming (Tang et al., arXiv 2106.02852, §3.3) searches each layer's
kept-patch count top-down under an error tolerance on calibration data; DiffRate (Chen et al., arXiv
2305.17997) learns per-layer prune and merge rates under a FLOPs constraint. vitprune searches the same
object, a static per-block schedule, without gradients and without fine-tuning: every candidate is a real
rewrite of the captured graph (the same pass ``vitprune rewrite`` runs), scored by how close its output
stays to the original's on calibration images.

Search space (every count a Python int, the rewrite's static shapes):

- ``importance-mask`` (dynamic mode: each image keeps its top-k patches by a patch score, step 0 below):
  nested keep counts, ``a[b]`` patches alive at block ``b``, ``a[0] = P`` (block 0 sees every
  patch: dropping there is token-drop's place), non-increasing. The pass takes rates; exact counts are
  written as rates ``(k + 0.5) / alive`` (:func:`rates_for_counts`).
- ``token-merge`` (ToMe, arXiv 2210.09461): ``r[b]`` tokens merged in block ``b``, at most half the patch
  tokens alive there (bipartite matching), as the pass's per-block list ``r=[r0, r1, ...]``.

FLOPs are predicted exactly from the graph analysis (:mod:`vitprune.graph.keep_counts`; the same model the
passes use); a schedule is admissible iff its predicted ratio is ``<= target + 0.005``.

Algorithm (deterministic, at most ``budget`` evaluations; one evaluation = one rewrite + one forward of the
calibration images; a schedule already scored costs nothing):

0. importance-mask's patch score (:data:`SEARCHED_SCORES`: the CLS row, the mean query's, L1/L2 norm, CLS row
   x norm) is chosen on the default schedule: no score wins on every model
   (``benchmarks/results/importance_scores.md``), so each is scored once and the best is kept for the rest.
1. Seeds, per method: the pass's own default for the target (importance-mask: geometric decay from block 3,
   :func:`~vitprune.graph.keep_counts.solve_for_flops`; token-merge: ToMe's constant ``r`` from block 0,
   :func:`~vitprune.graph.keep_counts.solve_merge_for_flops`), always evaluated first, then the same solvers
   from every other first block (spread evenly when they do not fit in half the budget). A seed whose
   closest-to-target solution overshoots the tolerance is repaired by lowering its last blocks.
2. Refinement of the best seed by greedy coordinate moves: give ``δ`` more tokens to block ``i`` and
   re-solve block ``j``'s count so the predicted FLOPs is admissible and as close to the target as it can
   be, or take ``δ`` from block ``i`` and re-solve ``j`` upward (nesting kept: raising a block raises the
   earlier ones below it, lowering one lowers the later ones above it). Pairs are tried nearest first,
   a move is accepted only if the calibration cosine strictly improves, ``δ`` starts at 4% of the patches
   and halves after a full round of moves without improvement.

The result is never worse on calibration than the best seed, so never worse than a method's default when
that default is admissible.

Latency targets (``latency_ms``, alone or with ``flops``): a schedule is admissible iff its predicted
latency fits (:class:`~vitprune.search.latency.LatencyModel`: the original's measured time times the FLOPs
ratio, plus each merging block's ``TokenMerge`` time, measured alone on the backend and batch at a few token
counts, since a merge's ~20 small kernels cost time its FLOPs do not show); seeds are solved at ``flops`` or,
alone, at ``latency_ms / original ms``, and token-merge's seeds include merging in the first blocks only.
The schedule found is timed (:func:`vitprune.ship.bench.bench`); if it misses, the model is scaled by
measured / predicted and the search runs again (at most twice, half the budget each).
"""

from vitprune.errors import SearchError
from vitprune.search.engine import search
from vitprune.search.schedule import SearchResult, load_schedule, read_schedule
from vitprune.search.spaces import FLOPS_TOLERANCE, METHODS, SEARCHED_SCORES, rates_for_counts

__all__ = ["FLOPS_TOLERANCE", "METHODS", "SEARCHED_SCORES", "SearchError", "SearchResult", "load_schedule",
           "rates_for_counts", "read_schedule", "search"]
