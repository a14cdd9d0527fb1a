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
    """Base of the leaf modules that change the token count of the residual stream."""

    num_patches: int

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
        if self._force_keep_all:
            return token_ops.drop_patch_tokens(x, self.num_prefix_tokens, self.num_patches, self.selection)
        if not (self.training or self.at_inference):
            return x
        return token_ops.drop_patch_tokens(x, self.num_prefix_tokens, self.keep_count, self.selection)


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
