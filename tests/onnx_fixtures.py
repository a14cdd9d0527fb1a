"""Small ONNX Vision Transformers written the way third-party exporters write them, for the ONNX frontend.

Families (random init, seeded, every parameter then nudged by seeded noise so no two initializers are equal;
32x32 input, patch 4 -> 64 patches, width 64, 4 blocks, 4 heads):

* ``timm-cls``  timm VisionTransformer, CLS token readout (65 tokens)
* ``timm-reg``  the same with 4 register tokens (69 tokens; CLS readout)
* ``timm-gap``  no class token, mean-pool readout (64 tokens)
* ``hf-vit``    transformers ViTForImageClassification (65 tokens), wrapped to return the logits tensor only

plus ``make_dense_model()``: a dense-head model (patch tokens back to an 8x8 grid, 1x1 conv) whose rewrite
restores every token.

Kinds (how the file was written):

* ``ts14`` / ``ts17``  ``torch.onnx.export(dynamo=False)`` (TorchScript exporter) at opset 14 / 17
* ``dynamo18`` / ``dynamo23``  ``torch.onnx.export(dynamo=True)`` at opset 18 / 23
* ``ort-fused``  the ts17 file run through ``onnxruntime.transformers.optimizer.optimize_model``
  (model_type "vit", default opt_level): com.microsoft SkipLayerNormalization and BiasGelu in every family,
  com.microsoft Attention in hf-vit only (see ``_legacy_hf_attention``; timm's attention stays unfused)

Every file has one input ``pixel_values`` [batch, 3, 32, 32] and one output ``logits`` with a dynamic batch.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import torch

FAMILIES = ("timm-cls", "timm-reg", "timm-gap", "hf-vit")
KINDS = ("ts14", "ts17", "dynamo18", "dynamo23", "ort-fused")

IMG, PATCH, WIDTH, DEPTH, HEADS, CLASSES = 32, 4, 64, 4, 4, 10
GRID = IMG // PATCH  # 8
NUM_PATCHES = GRID * GRID  # 64
TOKENS = {"timm-cls": 65, "timm-reg": 69, "timm-gap": 64, "hf-vit": 65, "dense": 65}
TOLERANCE = 1e-4


class _LogitsOnly(torch.nn.Module):
    """A Hugging Face image classifier whose forward(pixel_values) returns the logits tensor only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class _DenseHead(torch.nn.Module):
    """Patch tokens (CLS dropped) back to the [B, C, 8, 8] grid, then a 1x1 conv to 11 classes."""

    def __init__(self, backbone: torch.nn.Module, classes: int = 11):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Conv2d(WIDTH, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(x)  # [B, 65, C] (num_classes=0, global_pool='': forward_head returns the tokens)
        patches = tokens[:, 1:]
        b, n, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, GRID, GRID)
        return self.head(grid)


def _distinct(model: torch.nn.Module) -> torch.nn.Module:
    """Add small seeded noise to every parameter. Fresh timm / HF init leaves many parameters equal (zero biases,
    unit LayerNorm weights); both ONNX exporters then share one initializer among them (TorchScript through
    Identity nodes, dynamo by reusing the name), which trained checkpoints never show, and unit / zero
    LayerNorm affine parameters would hide a frontend that drops them."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


def _example() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _timm(**kwargs) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, **kwargs)


def make_model(family: str):
    """``(model in eval mode, example input [2, 3, 32, 32])`` for ``family`` (seeded: deterministic)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    torch.manual_seed(0)
    if family == "timm-cls":
        model = _timm(num_classes=CLASSES)
    elif family == "timm-reg":
        model = _timm(num_classes=CLASSES, reg_tokens=4)
    elif family == "timm-gap":
        model = _timm(num_classes=CLASSES, class_token=False, global_pool="avg")
    else:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=IMG, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                           num_attention_heads=HEADS, intermediate_size=128, num_labels=CLASSES,
                           attn_implementation="sdpa")  # the transformers 5 default, spelled out
        model = _LogitsOnly(ViTForImageClassification(config))
    return _distinct(model).eval(), _example()


def make_dense_model():
    """``(model, example)``: a timm ViT backbone + a dense (per-patch, 1x1 conv) head: token restore gives it every
    token back."""
    torch.manual_seed(0)
    return _distinct(_DenseHead(_timm(num_classes=0, global_pool=""))).eval(), _example()


class _DinoStandIn(torch.nn.Module):
    """An untrained stand-in for a third-party DINOv2 dense model: a Hugging Face ``Dinov2Model`` (LayerScale,
    CLS token, the position embedding stored for a 14x14 grid and resampled in the graph by bicubic
    interpolation to the 8x8 grid of a 32x32 input) and a convolutional decoder of two ``ConvTranspose``
    layers to ``[B, 1, 32, 32]``. Sizes chosen to coincide: width, the first decoder's channels (its weight is
    ``[64, 64, 2, 2]``) and its learned bias ``[1, 64, 1, 1]`` all equal the 64 patches."""

    def __init__(self):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        config = Dinov2Config(image_size=56, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=2,
                              num_attention_heads=HEADS, mlp_ratio=1, attn_implementation="sdpa")
        self.encoder = Dinov2Model(config)
        self.up1 = torch.nn.ConvTranspose2d(WIDTH, NUM_PATCHES, kernel_size=2, stride=2)
        self.bias = torch.nn.Parameter(torch.zeros(1, NUM_PATCHES, 1, 1))
        self.up2 = torch.nn.ConvTranspose2d(NUM_PATCHES, 1, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(pixel_values=x).last_hidden_state  # [B, 65, C]
        patches = tokens[:, 1:]
        b, n, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, GRID, GRID)
        return self.up2(torch.nn.functional.gelu(self.up1(grid) + self.bias))


def make_dino_standin():
    """``(model, example [2, 3, 32, 32])``: :class:`_DinoStandIn`, seeded, parameters made distinct."""
    torch.manual_seed(0)
    return _distinct(_DinoStandIn()).eval(), _example()


def export_static(model: torch.nn.Module, example: torch.Tensor, path, opset: int = 14) -> Path:
    """``model`` written the way most ONNX files are: ``torch.onnx.export(model, (example,), f)``, TorchScript
    exporter, no ``dynamic_axes``, so the input and output keep ``example``'s batch (static)."""
    path = Path(path)
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset)
    return path


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings; tests want none of it."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export(model: torch.nn.Module, example: torch.Tensor, kind: str, path) -> Path:
    """Write ``model`` as an ONNX file of ``kind`` at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("ts14", "ts17"):
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=int(kind[2:]),
                              input_names=["pixel_values"], output_names=["logits"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    elif kind in ("dynamo18", "dynamo23"):
        batch = torch.export.Dim("batch", min=1)
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=int(kind[6:]),
                                        input_names=["pixel_values"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), external_data=False)
            program.save(str(path), external_data=False)
    elif kind == "ort-fused":
        from onnxruntime.transformers.optimizer import optimize_model

        unfused = path.with_name(path.stem + ".ts17.onnx")
        with _legacy_hf_attention(model):
            export(model, example, "ts17", unfused)
        with _quiet():
            # opt_level=None: the default for model_type "vit" (1: onnxruntime's basic graph optimisations, e.g.
            # constant folding, before the Python fusions), what a user running the optimizer gets.
            optimized = optimize_model(str(unfused), model_type="vit", num_heads=HEADS, hidden_size=WIDTH,
                                       opt_level=None)
        unfused.unlink()
        fused = sum(n.op_type == "Attention" and n.domain == "com.microsoft" for n in optimized.model.graph.node)
        if isinstance(model, _LogitsOnly) and not fused:
            import onnxruntime
            import pytest

            # measured: onnxruntime 1.30's fusion_attention.py matches Softmax <- Div <- MatMul only behind a mask
            # Add (or Where); 1.32 also fuses the unmasked pattern a ViT has. A user of 1.30 gets no such file.
            pytest.skip(f"onnxruntime {onnxruntime.__version__}'s optimizer fuses no attention in an unmasked "
                        "Hugging Face ViT: there is no com.microsoft.Attention file to rewrite")
        with _quiet():
            optimized.save_model_to_file(str(path))
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    return path


_LEGACY_ATTENTION = "vitprune_transformers4_eager"


def _legacy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers 4.x ViTSelfAttention's arithmetic: (q @ k^T) / sqrt(head_dim), softmax, @ v."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


@contextlib.contextmanager
def _legacy_hf_attention(model: torch.nn.Module):
    """For ``ort-fused``: a Hugging Face model computes attention as transformers 4.x did while it is exported.

    onnxruntime's ViT/BERT attention fusion (fusion_attention.py) only knows the scores scaled by a Div
    (Softmax <- Div <- MatMul, no mask) or followed by a mask Add; transformers 5's sdpa export (q and k each
    times a constant 0.5) and eager export (scores times 0.25, no Add) leave attention unfused. The ORT-optimised
    Hugging Face ViT files found in the wild were made from transformers 4.x exports, so this gives the same
    numbers (same weights) and the com.microsoft.Attention those files have. timm models are left as they are:
    their packed qkv (Reshape -> Transpose -> Split -> Squeeze) matches no onnxruntime attention fusion."""
    config = getattr(getattr(model, "model", None), "config", None)
    if not isinstance(model, _LogitsOnly) or config is None:
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(_LEGACY_ATTENTION, _legacy_attention)
    before = config._attn_implementation
    config._attn_implementation = _LEGACY_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def cached_onnx(family: str, kind: str, tmp_root) -> Path:
    """The ONNX file of ``family`` (or ``"dense"``) written as ``kind`` under ``tmp_root``, exported once."""
    path = Path(tmp_root) / f"{family}.{kind}.onnx"
    if not path.exists():
        model, example = make_dense_model() if family == "dense" else make_model(family)
        tmp = path.with_name(path.stem + ".partial.onnx")
        export(model, example, kind, tmp)
        tmp.replace(path)
    return path


def run_onnx(path, x: torch.Tensor):
    """The ONNX file's output on ``x`` (onnxruntime, CPU, one thread) as a torch tensor."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)
