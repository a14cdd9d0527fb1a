"""Leaf modules vitprune inserts into captured graphs.

They stay leaves when a rewritten model is traced again (``capture`` treats every class registered
here as a leaf) and they serialise by their :meth:`config` (plain JSON), never by pickle.
Their state (a keep count, a selection mode) is plain Python ints and strings fixed at rewrite time,
so compiled and exported graphs see static token counts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from vitprune.ops import token_ops

#: class name -> class, for every leaf module vitprune may insert (used by capture and serialize).
LEAF_MODULES: dict[str, type[nn.Module]] = {}


def register_leaf(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` a vitprune leaf module (traced as one node, saved by config)."""
    LEAF_MODULES[cls.__name__] = cls
    return cls


class TokenModule(nn.Module):
    """Base of the leaf modules that change the token count of the residual stream.

    When ``record_kept`` is set, each forward stores ``last_kept`` ``[B, K]``: the indices of the kept
    patch tokens among *this module's input* patch tokens (compose them in graph order to get grid
    positions; ``vitprune show`` does). With ``return_kept`` (a constructor argument, set by
    :mod:`vitprune.passes.token_restore`) the forward returns those indices too, as a graph value, so the
    dropped tokens can be put back before a dense reader.
    """

    num_patches: int
    num_prefix_tokens: int
    record_kept: bool = False
    return_kept: bool = False
    last_kept: torch.Tensor | None = None

    def _restore_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` plus ``return_kept`` when it is set (so older saved configs stay valid)."""
        return {**config, "return_kept": True} if self.return_kept else config

    def _keep(self, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tokens, kept = out
        if self.record_kept:
            self.last_kept = kept.detach()
        return (tokens, kept) if self.return_kept else tokens

    def _all_kept(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` unchanged (with ``return_kept``: and every patch index, ``[B, P]``)."""
        if not self.return_kept:
            return x
        kept = torch.arange(x.shape[1] - self.num_prefix_tokens, device=x.device).expand(x.shape[0], -1)
        return x, kept

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON values; ``type(self)(**self.config())`` rebuilds it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


@register_leaf
class TokenDrop(TokenModule):
    """PatchDropout / PSS token drop: keep ``keep_count`` of the patch tokens, prefix tokens always.

    Follows PatchDropout (arXiv 2208.07220, §3): placed after the position embedding, keeps a random
    subset of patch tokens per image in original order. ``selection="magnitude"`` keeps the tokens of
    largest L1 norm instead (Patch Sampling Schedule, arXiv 2208.09520, §3.2); ``"distinct"`` drops
    near-duplicate patches first (:func:`token_ops.distinct_scores`, for dense models). Active in training;
    in eval mode only when ``at_inference`` (vitprune's option; the papers drop in training only).

    Shapes: ``[B, num_prefix_tokens + num_patches, C] -> [B, num_prefix_tokens + keep_count, C]``
    when active, identity otherwise.
    """

    def __init__(
        self,
        num_prefix_tokens: int,
        num_patches: int,
        keep_count: int,
        selection: str = "random",
        at_inference: bool = False,
        return_kept: bool = False,
    ) -> None:
        super().__init__()
        self.return_kept = bool(return_kept)
        if selection not in token_ops.SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; expected one of {token_ops.SELECTIONS}")
        if not 1 <= keep_count <= num_patches:
            raise ValueError(f"keep_count must be in [1, {num_patches}], got {keep_count}")
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_patches = int(num_patches)
        self.keep_count = int(keep_count)
        self.selection = selection
        self.at_inference = bool(at_inference)
        # Set only by `force_keep_all` during verification: run the gather with every patch kept.
        self._force_keep_all = False

    def config(self) -> dict[str, Any]:
        return {
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_patches": self.num_patches,
            "keep_count": self.keep_count,
            "selection": self.selection,
            "at_inference": self.at_inference,
        } | ({"return_kept": True} if self.return_kept else {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._force_keep_all:  # every patch of the input (earlier stages may keep all too)
            keep = x.shape[1] - self.num_prefix_tokens
            return self._keep(token_ops.drop_patch_tokens(x, self.num_prefix_tokens, keep, self.selection))
        if not (self.training or self.at_inference):
            self.last_kept = None
            return self._all_kept(x)
        return self._keep(token_ops.drop_patch_tokens(x, self.num_prefix_tokens, self.keep_count, self.selection))


def token_modules(model: nn.Module) -> list[TokenModule]:
    """The vitprune token modules inside ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, TokenModule)]


@contextlib.contextmanager
def force_keep_all(model: nn.Module) -> Iterator[None]:
    """Run every token module's selection and gather, keeping every patch token.

    Used by verification: the inserted nodes execute (so their indexing is tested) yet the model
    must reproduce the original output, since transformer blocks are permutation-equivariant and
    the original order is kept.
    """
    mods = token_modules(model)
    for m in mods:
        m._force_keep_all = True
    try:
        yield
    finally:
        for m in mods:
            m._force_keep_all = False


@register_leaf
class AttentionTopK(TokenModule):
    """Keep the ``keep_count`` patch tokens scored highest at the pruning point.

    Dynamic (input-dependent) form of Patch Slimming (arXiv 2106.02852, DPS-ViT). By default the score is
    the one-row score of EViT (arXiv 2202.07800): ``softmax(q_cls · Kᵀ · scale)`` averaged over heads, from
    the attention block just before the pruning point; ``score`` picks another of
    :data:`token_ops.SCORES` (:func:`token_ops.patch_scores`; ``"l1"`` / ``"l2"`` read ``x`` alone).
    With ``source="attn"`` the scores are read from an explicit attention map ``[B, H, N, N]`` instead.
    Active in train and eval mode; the kept count is static.

    Shapes: ``x [B, num_prefix_tokens + num_patches, C]``, ``q, k [B, H, N, d]`` (or ``attn``)
    -> ``[B, num_prefix_tokens + keep_count, C]``.
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, keep_count: int, scale: float | None = None,
                 score: str = "cls", cls_index: int = 0, source: str = "qk", return_kept: bool = False) -> None:
        super().__init__()
        self.return_kept = bool(return_kept)
        if not 1 <= keep_count <= num_patches:
            raise ValueError(f"keep_count must be in [1, {num_patches}], got {keep_count}")
        if score not in token_ops.SCORES or source not in ("qk", "attn"):
            raise ValueError(f"unknown score {score!r} or source {source!r}")
        self.num_prefix_tokens, self.num_patches, self.keep_count = int(num_prefix_tokens), int(num_patches), int(keep_count)
        self.scale, self.score, self.cls_index, self.source = scale, score, int(cls_index), source
        self._force_keep_all = False

    def config(self) -> dict[str, Any]:
        return self._restore_config({"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches,
                                     "keep_count": self.keep_count, "scale": self.scale, "score": self.score,
                                     "cls_index": self.cls_index, "source": self.source})

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> torch.Tensor:
        # q is the attention map [B, H, N, N] with source="attn"; norm scores read x alone
        maps = {"q": q, "k": k, "scale": self.scale} if self.source == "qk" else {"attn": q}
        scores = token_ops.patch_scores(x, self.num_prefix_tokens, self.score, cls_index=self.cls_index, **maps)
        keep = x.shape[1] - self.num_prefix_tokens if self._force_keep_all else self.keep_count
        return self._keep(token_ops.keep_patch_tokens(x, self.num_prefix_tokens, token_ops.top_patch_indices(scores, keep)))


@register_leaf
class StaticTokenSelect(TokenModule):
    """Keep a fixed, image-independent set of patch tokens (static Patch Slimming, PS-ViT, arXiv 2106.02852).

    ``kept`` are indices into this module's input patch tokens, chosen at rewrite time from
    calibration images; the graph does no scoring at run time, only one constant-index gather.

    Shapes: ``[B, num_prefix_tokens + num_patches, C] -> [B, num_prefix_tokens + len(kept), C]``.
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, kept: list[int], return_kept: bool = False) -> None:
        super().__init__()
        self.return_kept = bool(return_kept)
        kept = [int(i) for i in kept]
        if not kept or sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= num_patches:
            raise ValueError(f"kept must be ascending distinct indices in [0, {num_patches})")
        self.num_prefix_tokens, self.num_patches, self.kept = int(num_prefix_tokens), int(num_patches), kept
        self.keep_count = len(kept)
        index = list(range(num_prefix_tokens)) + [num_prefix_tokens + i for i in kept]
        self.register_buffer("token_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self._force_keep_all = False

    def config(self) -> dict[str, Any]:
        return self._restore_config({"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches,
                                     "kept": self.kept})

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, num_patches={self.num_patches}, keep_count={self.keep_count}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._force_keep_all:
            return self._all_kept(x)
        tokens = x.index_select(1, self.token_index)
        kept = self.token_index[self.num_prefix_tokens:] - self.num_prefix_tokens
        return self._keep((tokens, kept.expand(x.shape[0], -1)))


def annealed_tau(start: float, end: float, progress: float) -> float:
    """Soft-survival temperature: geometric from ``start`` to ``end`` as training ``progress`` goes 0 -> 1."""
    return start * (end / start) ** min(max(progress, 0.0), 1.0)


@register_leaf
class LifespanGather(TokenModule):
    """Life Regression (arXiv 2304.04926): predict every patch token's lifespan once, sort tokens by it.

    The paper's idea: one small regressor early in the network predicts, for each patch token, the
    number of blocks it stays alive; vitprune counts a life as the blocks that process the token, so it
    is alive at block ``l`` iff ``life > l``.
    vitprune's choices (the paper has no public code):

    - life = ``k0 - ½ + (num_blocks - k0 + ½) · sigmoid(a · z + mlp(x) + b)`` blocks (``k0 = first_block``;
      a life rounding to k0 ends at the regressor's own block), where
      ``z`` is the per-image standardised log of the patch's attention score from the block just before
      (the one-row q_cls·Kᵀ score of importance-mask) and ``mlp`` a LayerNorm-Linear-GELU-Linear on the
      token. ``mlp``'s last layer starts at zero and ``a`` at 4, so before fine-tuning the lives rank
      patches by attention importance and the rewritten model is already sensible;
    - the patch tokens are then sorted by life, longest first (prefix tokens stay first), so every later
      block keeps a *prefix* of fixed length (:class:`PrefixSlice`): one gather, then slices;
    - in training, :class:`SurvivalGate` scales residual updates by ``sigmoid((life - l) / tau)`` and
      :meth:`aux_loss` is ``budget_weight · (implied FLOPs ratio - target)²``, the implied token count at
      block ``l`` being ``prefix + Σ sigmoid((life - l) / tau)``.

    Shapes: ``x [B, prefix + P, C]``, ``q, k [B, H, N, d]`` -> ``(x sorted [B, prefix + P, C], lives [B, P])``
    with lives sorted descending (``lives[:, i]`` is the life of token ``prefix + i``).
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, dim: int, first_block: int, num_blocks: int,
                 scale: float, score: str = "cls", cls_index: int = 0, hidden: int = 0,
                 block_linear: list | None = None, block_attention: list | None = None, fixed_flops: float = 0.0,
                 target: float = 1.0, budget_weight: float = 2.0, tau_start: float = 1.0, tau_end: float = 0.1,
                 return_kept: bool = False) -> None:
        super().__init__()
        self.return_kept = bool(return_kept)
        self.num_prefix_tokens, self.num_patches, self.dim = int(num_prefix_tokens), int(num_patches), int(dim)
        self.first_block, self.num_blocks = int(first_block), int(num_blocks)
        self.scale, self.score, self.cls_index = float(scale), score, int(cls_index)
        self.hidden = int(hidden) or self.default_hidden(dim)
        self.block_linear = [float(v) for v in (block_linear or [])]
        self.block_attention = [float(v) for v in (block_attention or [])]
        self.fixed_flops, self.target, self.budget_weight = float(fixed_flops), float(target), float(budget_weight)
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.score_weight = nn.Parameter(torch.tensor(4.0))
        self.bias = nn.Parameter(torch.tensor(0.0))
        self.progress = 0.0  # set by the fine-tuning loop (0 -> 1) to anneal tau
        self.last_lives: torch.Tensor | None = None
        self._force_keep_all = False

    @staticmethod
    def default_hidden(dim: int) -> int:
        """Width of the regressor's token MLP for a ``dim``-wide stream."""
        return max(16, dim // 4)

    def config(self) -> dict[str, Any]:
        keys = ("num_prefix_tokens", "num_patches", "dim", "first_block", "num_blocks", "scale", "score", "cls_index",
                "hidden", "block_linear", "block_attention", "fixed_flops", "target", "budget_weight", "tau_start",
                "tau_end")
        return self._restore_config({k: getattr(self, k) for k in keys})

    def extra_repr(self) -> str:
        return f"num_patches={self.num_patches}, lives in [{self.first_block}, {self.num_blocks}], target={self.target}"

    @property
    def tau(self) -> float:
        """Temperature of the soft survival, annealed geometrically from ``tau_start`` to ``tau_end``."""
        return annealed_tau(self.tau_start, self.tau_end, self.progress)

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    def lives(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Predicted lives ``[B, P]`` (in blocks, within ``(first_block - ½, num_blocks)``), in token order."""
        scores = token_ops.patch_scores(x, self.num_prefix_tokens, self.score, q=q, k=k, scale=self.scale,
                                        cls_index=self.cls_index)
        return self.lives_from_scores(x, scores)

    def lives_from_scores(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """:meth:`lives` from the patches' scores ``[B, P]`` (:func:`token_ops.patch_scores`; stream
        ``x [B, prefix + P, C]``)."""
        z = scores.float().clamp_min(1e-12).log()  # float32 in any model dtype: 1e-12 is 0 in float16 (log: -inf)
        z = (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-6)
        logit = self.score_weight * z + self.mlp(x[:, self.num_prefix_tokens:]).squeeze(-1) + self.bias
        low = self.first_block - 0.5  # a life that rounds to first_block ends at the regressor's block
        return low + (self.num_blocks - low) * torch.sigmoid(logit)

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lives = self.lives(x, q, k)
        # longest life first; topk over all patches (sorted) exports to ONNX as one TopK (sort does not)
        order = torch.topk(lives, lives.shape[1], dim=1, largest=True, sorted=True).indices
        if self._force_keep_all:  # verification: the gathers run, every token stays in its place
            order = order.sort(dim=1).values
        tokens, _ = token_ops.keep_patch_tokens(x, self.num_prefix_tokens, order)
        sorted_lives = torch.gather(lives, 1, order)
        if self.record_kept:
            self.last_kept, self.last_lives = order.detach(), lives.detach()
        self._sorted_lives = sorted_lives if self.training else None
        return (tokens, sorted_lives, order) if self.return_kept else (tokens, sorted_lives)

    def aux_loss(self) -> torch.Tensor | None:
        """Budget loss of the last training forward: ``budget_weight · (implied FLOPs ratio - target)²``."""
        lives = getattr(self, "_sorted_lives", None)
        if lives is None or not self.block_linear:
            return None
        flops = lives.new_tensor(self.fixed_flops)
        full = self.fixed_flops
        n_all = self.num_prefix_tokens + self.num_patches
        for block, (lin, att) in enumerate(zip(self.block_linear, self.block_attention)):
            full += lin * n_all + att * n_all * n_all
            if block < self.first_block:
                flops = flops + lin * n_all + att * n_all * n_all
                continue
            n = self.num_prefix_tokens + torch.sigmoid((lives - block) / self.tau).sum(dim=1)  # [B]
            flops = flops + (lin * n + att * n * n).mean()
        return self.budget_weight * (flops / full - self.target) ** 2


@register_leaf
class PrefixSlice(TokenModule):
    """Keep the first ``num_prefix_tokens + keep_count`` tokens of a life-sorted stream (eval mode).

    Part of lifespan-gather (:class:`LifespanGather`): the tokens are sorted by predicted life once, so
    the patches still alive at block ``block`` are a prefix; ``keep_count`` is the static per-block budget.
    ``exact=True`` (batch 1 only) keeps exactly the tokens whose life > ``block``: a data-dependent
    token count, so no static shapes (torch.compile recompiles per count, ONNX export needs dynamic
    axes) and batches cannot mix counts without padding. Identity in training (soft survival instead).

    Shapes: ``x [B, N, C]``, ``lives [B, P]`` -> ``[B, num_prefix_tokens + keep_count, C]``.
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, keep_count: int, block: int, exact: bool = False,
                 return_kept: bool = False) -> None:
        super().__init__()
        self.return_kept = bool(return_kept)
        self.num_prefix_tokens, self.num_patches, self.keep_count = int(num_prefix_tokens), int(num_patches), int(keep_count)
        self.block, self.exact = int(block), bool(exact)
        self._force_keep_all = False

    def config(self) -> dict[str, Any]:
        return self._restore_config({"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches,
                                     "keep_count": self.keep_count, "block": self.block, "exact": self.exact})

    def forward(self, x: torch.Tensor, lives: torch.Tensor) -> torch.Tensor:
        if self.training or self._force_keep_all:
            return self._all_kept(x)
        count = self.keep_count
        if self.exact:
            if x.shape[0] != 1:
                raise ValueError("PrefixSlice(exact=True) takes batch 1: per-image token counts differ")
            count = int((lives[0] > self.block).sum())
        count = min(count, x.shape[1] - self.num_prefix_tokens)
        kept = torch.arange(count, device=x.device).expand(x.shape[0], -1)
        return self._keep((x[:, : self.num_prefix_tokens + count], kept))


class _SoftSurvival(nn.Module):
    """Shared state of the training-only soft-survival modules: the block, and ``tau`` annealed
    geometrically from ``tau_start`` to ``tau_end`` as :func:`set_training_progress` reports progress."""

    def __init__(self, num_prefix_tokens: int, block: int, tau_start: float = 1.0, tau_end: float = 0.1) -> None:
        super().__init__()
        self.num_prefix_tokens, self.block = int(num_prefix_tokens), int(block)
        self.tau_start, self.tau_end, self.progress = float(tau_start), float(tau_end), 0.0

    def config(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens, "block": self.block,
                "tau_start": self.tau_start, "tau_end": self.tau_end}

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    @property
    def tau(self) -> float:
        return annealed_tau(self.tau_start, self.tau_end, self.progress)


@register_leaf
class SurvivalGate(_SoftSurvival):
    """Soft survival in training: scale a residual branch's update of each patch token by
    ``sigmoid((life - block) / tau)`` (prefix tokens: 1). Identity in eval mode. ``tau`` comes from the
    :class:`LifespanGather` schedule, copied in by :func:`set_training_progress`.

    Shapes: ``update [B, prefix + P, C]``, ``lives [B, P]`` -> ``[B, prefix + P, C]``.
    """

    def forward(self, update: torch.Tensor, lives: torch.Tensor) -> torch.Tensor:
        if not self.training or update.shape[1] != self.num_prefix_tokens + lives.shape[1]:
            return update
        gate = torch.sigmoid((lives - self.block) / self.tau).to(update.dtype)  # lives are float32 (LifespanGather)
        gate = torch.cat([gate.new_ones(gate.shape[0], self.num_prefix_tokens), gate], dim=1)
        return update * gate.unsqueeze(-1)


@register_leaf
class SurvivalKeyMask(_SoftSurvival):
    """Soft survival for attention keys in training: an additive SDPA mask ``log sigmoid((life - block) / tau)``
    on each patch key (0 on prefix keys), so tokens past their life fade out of other tokens' attention as
    they will be absent at inference. ``None`` in eval mode (the block keeps its unmasked fused kernel).

    Shapes: ``lives [B, P]`` -> ``[B, 1, 1, prefix + P]`` float, or ``None``.
    """

    def forward(self, lives: torch.Tensor) -> torch.Tensor | None:
        if not self.training:
            return None
        bias = torch.nn.functional.logsigmoid((lives - self.block) / self.tau)
        bias = torch.cat([bias.new_zeros(bias.shape[0], self.num_prefix_tokens), bias], dim=1)
        return bias[:, None, None, :]


def set_training_progress(model: nn.Module, progress: float) -> None:
    """Tell every module with a training schedule (lifespan-gather's tau) how far training is (0..1)."""
    for m in model.modules():
        if hasattr(m, "set_progress") and type(m) in LEAF_MODULES.values():
            m.set_progress(progress)


def auxiliary_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum of the vitprune modules' auxiliary losses from the last training forward (lifespan budget)."""
    losses = [m.aux_loss() for m in model.modules() if hasattr(m, "aux_loss") and type(m) in LEAF_MODULES.values()]
    losses = [l for l in losses if l is not None]
    return sum(losses) if losses else None


@register_leaf
class TokenMerge(TokenModule):
    """ToMe token merging (Bolya et al., arXiv 2210.09461, §3): merge ``r`` tokens into others between a
    block's attention and its MLP.

    Bipartite soft matching (:func:`token_ops.bipartite_soft_matching`) on the block's attention keys
    averaged over heads (ToMe's metric): the patch tokens alternate into sets A and B, each A token's most
    similar B token (cosine) is its match, and the ``r`` A tokens with the closest matches are merged into
    them by size-weighted average (:func:`token_ops.merge_tokens`). Prefix tokens are never merged and
    never merged into. The tokens that stay keep their original order. Active in train and eval mode, as
    in ToMe; ``r`` is a Python int, so every shape is static. Verification's keep-all
    (:func:`force_keep_all`) merges nothing: the output is the input, sizes unchanged.

    Shapes: ``x [B, num_prefix_tokens + num_patches, C]``, ``k [B, H, N, d]`` (the same ``N``),
    ``size [B, N, 1]`` (or ``None``: ones, before the first merge) -> ``(x [B, N - r, C], size [B, N - r, 1])``.
    With ``record_kept``, ``last_kept`` ``[B, num_patches - r]`` holds the patch tokens that stay. With
    ``return_kept`` a third output follows: ``kept [B, num_patches - r]`` (those indices: a merged token sits
    at its destination's grid position, so RoPE tables and relative-position biases follow it); with
    ``return_sources`` as well a fourth, ``sources [B, num_patches]`` (:func:`token_ops.merge_sources`: which
    output patch token holds each input patch, for unmerging before a dense reader; computed only then).

    Raises:
        ValueError: at construction, ``r`` outside ``[0, num_patches // 2]`` (bipartite matching merges at
            most half the patch tokens).
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, r: int, block: int, return_kept: bool = False,
                 return_sources: bool = False) -> None:
        super().__init__()
        if not 0 <= r <= num_patches // 2:
            raise ValueError(f"r must be in [0, {num_patches // 2}] for {num_patches} patch tokens, got {r}")
        self.num_prefix_tokens, self.num_patches, self.r, self.block = (int(num_prefix_tokens), int(num_patches),
                                                                        int(r), int(block))
        self.keep_count = self.num_patches - self.r
        self.return_kept = bool(return_kept)
        self.return_sources = bool(return_sources)
        self._force_keep_all = False

    def config(self) -> dict[str, Any]:
        config = self._restore_config({"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches,
                                       "r": self.r, "block": self.block})
        return {**config, "return_sources": True} if self.return_sources else config

    def forward(self, x: torch.Tensor, k: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        r = 0 if self._force_keep_all else self.r
        kept, src, dst = token_ops.bipartite_soft_matching(k.mean(dim=1), self.num_prefix_tokens, r)
        patches = kept[:, self.num_prefix_tokens:] - self.num_prefix_tokens
        if self.record_kept:
            self.last_kept = patches.detach()
        merged = token_ops.merge_tokens(x, size, kept, src, dst)
        if not self.return_kept:
            return merged
        if not self.return_sources:
            return (*merged, patches)
        return (*merged, patches, token_ops.merge_sources(kept, src, dst, self.num_prefix_tokens))


@register_leaf
class ProportionalAttentionMask(nn.Module):
    """ToMe's proportional attention (arXiv 2210.09461, §3 "Proportional attention") as an SDPA mask:
    ``log(size)`` added to every query's score of each key, so a token holding ``s`` merged tokens weighs
    as ``s`` keys would. An additive float mask keeps the block's fused SDPA kernel. Sizes of one give a
    mask of zeros.

    Shapes: ``size [B, N, 1]`` -> ``[B, 1, 1, N]`` (broadcast over heads and queries). With the SDPA's own
    mask ``base`` (float, added: a relative-position bias ``[B or 1, H, N, N]``; boolean: ``-inf`` where it is
    False) -> the broadcast of both.
    """

    def config(self) -> dict[str, Any]:
        """No arguments: ``ProportionalAttentionMask()`` rebuilds it."""
        return {}

    def forward(self, size: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        mask = size.log().transpose(1, 2).unsqueeze(1)
        if base is None:
            return mask
        if base.dtype == torch.bool:
            return mask.masked_fill(~base, float("-inf"))
        return base + mask


@register_leaf
class TokenPositions(nn.Module):
    """Follow the grid position of every live patch token through the pruning points, and (``canvas``) keep
    every patch's last features for :class:`TokenRestore`.

    Placed beside each token module (a :class:`TokenModule` built with ``return_kept``): it composes the module's
    kept indices with the positions so far and, with ``canvas``, writes the tokens alive at that point into the
    canvas (:func:`token_ops.update_canvas`). Not on the residual stream: the blocks never read it.

    Shapes: ``x [B, prefix + K_in, C]`` (the token module's input), ``kept [B, K_out]`` (its kept indices among
    those ``K_in`` patch tokens), ``positions [B, K_in]`` and ``canvas [B, P, C]`` from the previous point (``None``
    at the first) -> ``(canvas [B, P, C] or None, positions [B, K_out])``.
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, canvas: bool = True) -> None:
        super().__init__()
        self.num_prefix_tokens, self.num_patches, self.canvas = int(num_prefix_tokens), int(num_patches), bool(canvas)

    def config(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches, "canvas": self.canvas}

    def forward(self, x: torch.Tensor, kept: torch.Tensor, positions: torch.Tensor | None = None,
                canvas: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not self.canvas:
            if positions is None:
                positions = torch.arange(x.shape[1] - self.num_prefix_tokens, device=x.device).expand(x.shape[0], -1)
            return None, positions.gather(1, kept)
        canvas, positions = token_ops.update_canvas(x, self.num_prefix_tokens, positions, canvas)
        return canvas, positions.gather(1, kept)


@register_leaf
class TokenHolders(nn.Module):
    """Follow which merged token holds each grid position through the merges (for :class:`TokenUnmerge`).

    Placed beside each :class:`TokenMerge` built with ``return_kept``. Not on the residual stream.

    Shapes: ``sources [B, K_in]`` (the merge's: output patch index holding each input patch), ``holders [B, P]``
    from the previous merge (``None`` at the first: grid position ``p`` is input patch ``p``) -> ``[B, P]``.
    """

    def config(self) -> dict[str, Any]:
        """No arguments: ``TokenHolders()`` rebuilds it."""
        return {}

    def forward(self, sources: torch.Tensor, holders: torch.Tensor | None = None) -> torch.Tensor:
        return sources if holders is None else sources.gather(1, holders)


@register_leaf
class TokenUnmerge(nn.Module):
    """Every patch token back in grid order before a reader that needs all of them, after token merging:
    each position takes its merged token's features (:func:`token_ops.unmerge_tokens`). Static shapes.

    Shapes: ``x [B, prefix + K, C]``, ``holders [B, P]`` -> ``[B, prefix + P, C]``.
    """

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)

    def config(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens}

    def forward(self, x: torch.Tensor, holders: torch.Tensor) -> torch.Tensor:
        return token_ops.unmerge_tokens(x, self.num_prefix_tokens, holders)


@register_leaf
class TokenIndexedGather(nn.Module):
    """A tensor indexed by token position (RoPE table, relative-position bias, a late position embedding),
    gathered per image for the live tokens: :func:`token_ops.gather_token_axes`.

    Shapes: ``table`` (broadcasting against a rank-``rank`` operand), ``positions [B, K]`` -> ``[B, ...]`` of rank
    ``rank``, each token axis ``K`` (or ``num_prefix_tokens + K``) long.
    """

    def __init__(self, num_prefix_tokens: int, rank: int, token_axes: list) -> None:
        super().__init__()
        self.num_prefix_tokens, self.rank = int(num_prefix_tokens), int(rank)
        self.token_axes = [[int(a), bool(p)] for a, p in token_axes]

    def config(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens, "rank": self.rank, "token_axes": self.token_axes}

    def forward(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return token_ops.gather_token_axes(table, positions, self.num_prefix_tokens, self.rank,
                                           [(a, p) for a, p in self.token_axes])


@register_leaf
class TokenRestore(nn.Module):
    """Put every dropped token back in its grid position before a reader that needs all of them in place
    (a dense head's grid reshape, a token-sequence output, an intermediate layer read by a DPT-style head):
    :func:`token_ops.restore_tokens`. Static shapes: ``P`` is the model's patch count.

    ``rule`` (:data:`token_ops.RESTORE_RULES`): what a dropped token comes back with, its last features
    (``"last"``) or its most similar kept token's current ones (``"nearest"``, which reads ``reference``: every
    patch at the first pruning point, the first canvas).

    Shapes: ``x [B, prefix + K, C]``, ``canvas [B, P, C]``, ``positions [B, K]``, ``reference [B, P, C]`` or
    ``None`` -> ``[B, prefix + P, C]``.
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, rule: str = "last") -> None:
        super().__init__()
        if rule not in token_ops.RESTORE_RULES:
            raise ValueError(f"unknown restore rule {rule!r}; expected one of {', '.join(token_ops.RESTORE_RULES)}")
        self.num_prefix_tokens, self.num_patches, self.rule = int(num_prefix_tokens), int(num_patches), rule

    def config(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches, "rule": self.rule}

    def forward(self, x: torch.Tensor, canvas: torch.Tensor, positions: torch.Tensor,
                reference: torch.Tensor | None = None) -> torch.Tensor:
        return token_ops.restore_tokens(x, self.num_prefix_tokens, canvas, positions, self.rule, reference)
