"""The closed allowlist of what a saved graph (``graph.json``) may call.

Every ``call_function`` target, ``call_method`` name, attribute read through ``getattr`` and
``call_module`` class a saved graph may name is listed here by exact name; :mod:`vitprune.io.serialize`
saves nothing else and loads nothing else. A name is resolved through a fixed table built from these
strings (a dict lookup), never by walking a path from the file, so a name that is not written here
cannot be reached by any spelling.

How the sets were enumerated (torch 2.14.1, timm 1.0.31, torchvision 0.29.1): every op in the graphs
that ``vitprune.frontends.capture`` produces, and that ``vitprune.rewrite`` produces with token-drop (random and
magnitude), importance-mask (dynamic and static), lifespan-gather (soft and exact) and token-merge, in train
and eval mode, with timm's fused attention on and off, for timm vit_small_patch16_224 (class token;
``class_token=False, global_pool="avg"``; ``qk_norm=True``; dropout and drop path),
deit_tiny_distilled_patch16_224, deit3_small_patch16_224 (LayerScale), vit_small_patch14_dinov2,
vit_small_patch14_reg4_dinov2, vit_xsmall_patch16_clip_224 (pre-norm), flexivit_small, the token-indexed
families (eva02_small_patch14_224 and vit_base_patch16_rope_224 with RoPE, beit_base_patch16_224 and
vit_relpos_small_patch16_224 with relative-position bias), vit_base_patch16_siglip_224 (attention pool),
vit_small_patch16_18x2_224 (parallel blocks: ``torch.stack(...).sum(dim=0)``), Hugging Face BLIP vision
(symbolic trace of vitprune's wrapper: ``torch.matmul``, ``F.softmax``, ``gelu``, ``x.size()``)
and torchvision's VisionTransformer. ``tests/test_serialize.py::test_allowlist_covers_what_vitprune_produces``
re-derives the sets (every family captured; the passes, which add only vitprune leaves and getitem, on six
of them: a class token, a mean pool, a dense head, RoPE, relative bias, an attention pool) and asserts they
equal these, so a new op from timm or a pass is a failing test, not a silent save failure, and a name
nothing needs any more is one too.

Before adding a name, read what it does: it must be a pure function of its arguments. Nothing that
touches files, processes, the network, storages or shared memory (``from_file``, ``save``, ``load``,
``untyped_storage``, ``share_memory_``, ``set_``), converts a tensor to other Python objects
(``numpy``, ``tolist``), or calls or looks up code it is given (``register_hook``, ``apply_``,
``map_``, ``attrgetter``) may ever be listed.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import operator
from typing import Any, Callable

import torch
from torch import nn

from vitprune.ops.modules import LEAF_MODULES

FUNCTIONS = frozenset({
    # Python operators fx records for `a + b`, `x[i]`, `q @ k`, and attribute reads (see ATTRIBUTES)
    "builtins.getattr",
    "operator.add", "operator.eq", "operator.floordiv", "operator.getitem", "operator.matmul",
    "operator.mul", "operator.neg", "operator.sub", "operator.truediv",
    # torch
    "torch._C._nn.scaled_dot_product_attention",  # = torch.nn.functional.scaled_dot_product_attention
    "torch._assert",  # torchvision's input-shape check
    "torch._C._nn.linear",  # = torch.nn.functional.linear (EVA-02's fused qkv with its own bias)
    "torch.cat",
    "torch.matmul",  # Hugging Face BLIP's attention (torch.matmul(q, kᵀ)), traced through its wrapper
    "torch.nn.functional.softmax",  # ... its softmax
    "torch._C._nn.gelu",  # = torch.nn.functional.gelu (BLIP's MLP)
    "torch.stack",  # RoPE: interleaves the rotated halves
    "torch.nn.functional.layer_norm",
    "torch.nn.functional.interpolate",  # dense heads upsample their grid of patch logits to the pixels
    # timm functions fx keeps as leaves in non-fused attention: add an optional mask to the scores
    "timm.layers.attention.maybe_add_mask",
    "timm.layers.attention.resolve_self_attn_mask",
})

#: aten operators (``packet.overload``) in the graphs ``torch.export`` captures (vitprune.frontends.export),
#: stored as ``torch.ops.aten.PACKET.OVERLOAD``. Enumerated over the export families the tests rewrite
#: (Hugging Face ViT, DeiT with teacher, DINOv2 with and without head, CLIP vision, DINOv3 (its RoPE tables are
#: computed in the graph: arange, meshgrid, cos/sin; queries split off the prefix tokens); torchvision's
#: VisionTransformer; timm vit_small_patch16_224; the DINOv2 dense stand-in of ``examples/dinov2_dense.py``
#: (its stored position embedding resampled by bicubic upsampling, a ConvTranspose decoder); every method);
#: ``tests/test_frontends.py`` re-derives it.
#: _assert_tensor_metadata only checks; dropout is random, not effectful; embedding is a lookup.
ATEN_OPS = frozenset({
    "_assert_tensor_metadata.default", "add.Tensor", "arange.default", "arange.start", "cat.default",
    "contiguous.default", "conv2d.default", "conv_transpose2d.input", "cos.default", "div.Tensor", "dropout.default", "embedding.default",
    "expand.default", "flatten.using_ints", "ge.Scalar", "gelu.default", "layer_norm.default", "linear.default",
    "mean.dim", "meshgrid.indexing", "mul.Tensor", "neg.default", "permute.default", "reshape.default",
    "scaled_dot_product_attention.default", "select.int", "sigmoid.default", "sin.default", "slice.Tensor",
    "split_with_sizes.default", "squeeze.dim", "stack.default", "sub.Tensor", "sym_size.int", "tile.default",
    "to.dtype", "transpose.int", "unbind.int", "unflatten.int", "unsqueeze.default", "upsample_bicubic2d.vec",
    "view.default",
})

#: torch.Tensor methods a ``call_method`` node may name (the receiver must be a node's value).
#: bernoulli_, div_, new_empty: timm's drop path in training; they write only the fresh tensor.
METHODS = frozenset({
    "bernoulli_", "chunk", "contiguous", "dim", "div_", "expand", "flatten", "mean", "new_empty", "permute",
    "reshape", "size", "softmax", "sum", "to", "transpose", "type_as", "unbind", "unsqueeze", "view",
})

#: attributes ``builtins.getattr`` may read (always a literal name).
ATTRIBUTES = frozenset({"dtype", "ndim", "shape"})

#: torch.nn classes fx keeps as leaf modules in those graphs; vitprune's own leaves
#: (``vitprune.ops.modules.LEAF_MODULES``) are added by :func:`module_classes`.
TORCH_MODULES = (
    nn.Conv2d, nn.Dropout, nn.GELU, nn.Identity, nn.LayerNorm, nn.Linear, nn.MultiheadAttention,
    nn.ReLU, nn.SiLU,  # vit_relpos's bias MLP; EVA-02's SwiGLU
)

# The only modules names are looked up in; timm's is imported here by this fixed name, never a name from a file.
_HOMES = ("builtins", "operator", "torch", "torch._C._nn", "torch.nn.functional", "timm.layers.attention")
# Homes whose names differ between admitted releases (timm 1.0.20 has no timm.layers.attention.resolve_self_attn_mask):
# a name the installed release lacks is left out, since no graph captured with that release can call it.
_OPTIONAL_HOMES = ("timm.layers.attention",)


@functools.cache
def functions() -> dict[str, Callable[..., Any]]:
    """Stored name -> callable, for every name in :data:`FUNCTIONS`."""
    table = {}
    for name in sorted(FUNCTIONS):
        home, _, attr = name.rpartition(".")
        assert home in _HOMES, name  # a typo in FUNCTIONS, not user input
        if home in _OPTIONAL_HOMES:
            try:
                module = importlib.import_module(home)
            except ImportError:  # an admitted timm release without this module: its graphs cannot call it
                continue
            if attr not in vars(module):
                continue
        else:
            module = builtins if home == "builtins" else operator if home == "operator" else importlib.import_module(home)
        table[name] = vars(module)[attr]  # vars(): never a module __getattr__
    for name in sorted(ATEN_OPS):  # fixed strings from this file, never from a saved graph
        packet, _, overload = name.partition(".")
        table[f"torch.ops.aten.{name}"] = getattr(getattr(torch.ops.aten, packet), overload)
    return table


@functools.cache
def function_names() -> dict[Callable[..., Any], str]:
    """Callable -> its stored name (the inverse of :func:`functions`)."""
    return {fn: name for name, fn in functions().items()}


def class_name(cls: type) -> str:
    """How a module class is stored: ``module:qualname``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def module_classes() -> dict[str, type[nn.Module]]:
    """Stored ``module:qualname`` -> class, for the torch.nn classes above and vitprune's leaves."""
    return {class_name(c): c for c in (*TORCH_MODULES, *LEAF_MODULES.values())}


def legacy_module_classes() -> dict[str, type[nn.Module]]:
    """Names earlier vitprune versions stored for its leaves (``vitprune.modules:TokenDrop``, before the
    module moved to ``vitprune.ops.modules``): accepted when loading, never written."""
    return {f"vitprune.modules:{c.__qualname__}": c for c in LEAF_MODULES.values()}
