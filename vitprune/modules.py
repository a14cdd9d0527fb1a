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

from vitprune import token_ops

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
    positions; ``vitprune show`` does).
    """

    num_patches: int
    record_kept: bool = False
    last_kept: torch.Tensor | None = None

    def _keep(self, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, kept = out
        if self.record_kept:
            self.last_kept = kept.detach()
        return tokens

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
    largest L1 norm instead (Patch Sampling Schedule, arXiv 2208.09520, §3.2). Active in training;
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
    ) -> None:
        super().__init__()
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
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._force_keep_all:  # every patch of the input (earlier stages may keep all too)
            keep = x.shape[1] - self.num_prefix_tokens
            return self._keep(token_ops.drop_patch_tokens(x, self.num_prefix_tokens, keep, self.selection))
        if not (self.training or self.at_inference):
            self.last_kept = None
            return x
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
    """Keep the ``keep_count`` patch tokens the previous block's attention rates highest.

    Dynamic (input-dependent) form of Patch Slimming (arXiv 2106.02852, DPS-ViT) with the one-row
    score of EViT (arXiv 2202.07800): ``softmax(q_cls · Kᵀ · scale)`` averaged over heads, from the
    attention block just before the pruning point (see :func:`token_ops.attention_patch_scores`).
    With ``source="attn"`` the scores are read from an explicit attention map ``[B, H, N, N]`` instead.
    Active in train and eval mode; the kept count is static.

    Shapes: ``x [B, num_prefix_tokens + num_patches, C]``, ``q, k [B, H, N, d]`` (or ``attn``)
    -> ``[B, num_prefix_tokens + keep_count, C]``.
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, keep_count: int, scale: float | None = None,
                 score: str = "cls", cls_index: int = 0, source: str = "qk") -> None:
        super().__init__()
        if not 1 <= keep_count <= num_patches:
            raise ValueError(f"keep_count must be in [1, {num_patches}], got {keep_count}")
        if score not in token_ops.SCORES or source not in ("qk", "attn"):
            raise ValueError(f"unknown score {score!r} or source {source!r}")
        self.num_prefix_tokens, self.num_patches, self.keep_count = int(num_prefix_tokens), int(num_patches), int(keep_count)
        self.scale, self.score, self.cls_index, self.source = scale, score, int(cls_index), source
        self._force_keep_all = False

    def config(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches,
                "keep_count": self.keep_count, "scale": self.scale, "score": self.score,
                "cls_index": self.cls_index, "source": self.source}

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        if self.source == "qk":
            scores = token_ops.attention_patch_scores(q, k, self.num_prefix_tokens, self.scale, self.score, self.cls_index)
        else:  # q is the attention map [B, H, N, N]
            rows = q[:, :, self.cls_index] if self.score == "cls" else q.mean(dim=2)
            scores = rows.mean(dim=1)[:, self.num_prefix_tokens:]
        keep = x.shape[1] - self.num_prefix_tokens if self._force_keep_all else self.keep_count
        return self._keep(token_ops.keep_patch_tokens(x, self.num_prefix_tokens, token_ops.top_patch_indices(scores, keep)))


@register_leaf
class StaticTokenSelect(TokenModule):
    """Keep a fixed, image-independent set of patch tokens (static Patch Slimming, PS-ViT, arXiv 2106.02852).

    ``kept`` are indices into this module's input patch tokens, chosen at rewrite time from
    calibration images; the graph does no scoring at run time, only one constant-index gather.

    Shapes: ``[B, num_prefix_tokens + num_patches, C] -> [B, num_prefix_tokens + len(kept), C]``.
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int, kept: list[int]) -> None:
        super().__init__()
        kept = [int(i) for i in kept]
        if not kept or sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= num_patches:
            raise ValueError(f"kept must be ascending distinct indices in [0, {num_patches})")
        self.num_prefix_tokens, self.num_patches, self.kept = int(num_prefix_tokens), int(num_patches), kept
        self.keep_count = len(kept)
        index = list(range(num_prefix_tokens)) + [num_prefix_tokens + i for i in kept]
        self.register_buffer("token_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self._force_keep_all = False

    def config(self) -> dict[str, Any]:
        return {"num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches, "kept": self.kept}

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, num_patches={self.num_patches}, keep_count={self.keep_count}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._force_keep_all:
            return x
        if self.record_kept:
            self.last_kept = torch.tensor(self.kept, device=x.device).expand(x.shape[0], -1)
        return x.index_select(1, self.token_index)
