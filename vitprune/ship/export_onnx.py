"""Export a (rewritten) model to optimised ONNX with a dynamic batch axis, and check it.

Pipeline: ``torch.onnx.export(dynamo=True)`` with the batch dimension dynamic (token counts stay the
static ints fixed at rewrite time) -> ``onnx.shape_inference.infer_shapes(strict_mode=True)`` ->
``onnx.checker.check_model(full_check=True)`` -> optimisation, float16 / int8
(:mod:`vitprune.ship.onnx_optimize`: ``none``, ``basic`` = onnx-graphsurgeon constant folding,
``ort`` = ONNX Runtime's transformer optimizer) -> ONNX Runtime against the PyTorch float32 model at
batch 1 and 8 (and on ``check_images``) -> written atomically. The check's criterion per variant:

- float32: max abs diff ≤ ``tolerance`` (1e-4);
- float16: max abs diff / max abs PyTorch output (the output's scale) ≤ ``float16_tolerance`` (1e-2:
  float16 keeps 11 significant bits, ~5e-4 relative per op, a few ulps through a dozen blocks);
- int8 (``quantize="dynamic"``): top-1 agreement with PyTorch ≥ ``min_top1_agreement`` (0.95) on
  ``check_images`` (real images: the metric a user of a quantised classifier cares about); without
  images the agreement on the random batches is reported but not enforced, and the relative diff must
  stay ≤ ``int8_tolerance`` (0.25). vitprune's gathers are flat ``index_select``
calls, so they export as one ``Gather`` (faster in ORT than TopK + Expand + GatherElements, as measured in
``shared/DESIGN.md``: 6.8 ms vs 15.2 ms at B=32, N=196).

Random token selection (token-drop ``selection="random"``) draws from ORT's generator in the exported
graph, so its outputs cannot match PyTorch's draw: parity is then reported as not comparable, and the
outputs are only checked to be finite and of the right shape.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitprune.errors import VitpruneError
from vitprune.io.outputs import atomic_file
from vitprune.io.images import image_batches, is_path
from vitprune.io.origin import check_runs_on
from vitprune.io.origin import example_input as make_example_input
from vitprune.ops.modules import TokenDrop, token_modules
from vitprune.ship.onnx_optimize import check_options, finish, fold_constants, op_counts


@dataclass
class ExportReport:
    """What the export wrote and checked. ``parity`` maps batch size -> max abs diff ORT vs PyTorch;
    ``relative_diff`` the same divided by the PyTorch output's max abs value (float16 / int8);
    ``top1_agreement`` the share of inputs whose ORT argmax equals PyTorch's, measured on
    ``agreement_inputs`` (``"images"`` or ``"random"``); ``fused_before`` / ``fused_after`` the op counts
    of :data:`~vitprune.ship.onnx_optimize.FUSION_OPS` around ORT's optimizer (``optimize="ort"``)."""

    path: str
    opset: int
    nodes_before_optimize: int
    nodes_after_optimize: int
    op_types: dict[str, int]
    parity: dict[int, float | None] = field(default_factory=dict)
    parity_comparable: bool = True
    bytes: int = 0
    optimize: str = "basic"
    dtype: str = "float32"
    quantize: str = "none"
    relative_diff: float | None = None
    tolerance: float | None = None
    top1_agreement: float | None = None
    agreement_inputs: str | None = None
    min_top1_agreement: float | None = None
    fused_before: dict[str, int] | None = None
    fused_after: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _random_selection(model: nn.Module) -> bool:
    return any(isinstance(m, TokenDrop) and m.selection == "random" and (m.at_inference or m.training)
               for m in token_modules(model))


def _check_batches(model: nn.Module, x: torch.Tensor, parity_batches, check_images):
    """``(name, batch)`` pairs the check runs: random batches at ``parity_batches``, then the images."""
    gen = torch.Generator().manual_seed(0)
    batches = [(f"batch {b}", torch.randn(b, *x.shape[1:], generator=gen)) for b in parity_batches]
    if check_images is not None:
        if is_path(check_images):
            from vitprune.io.preprocess import resolve_preprocessing

            prep = resolve_preprocessing(model, channels=x.shape[1])
            check_images = torch.cat(list(image_batches(check_images, tuple(x.shape[1:]), mean=prep.mean,
                                                        std=prep.std)))
        if tuple(check_images.shape[1:]) != tuple(x.shape[1:]):
            raise VitpruneError(f"check images are {tuple(check_images.shape[1:])}, the model takes {tuple(x.shape[1:])}")
        batches.append(("the check images", check_images.float()))
    return batches


def _compare(session, model, batches, comparable, dtype, quantize, tolerances) -> dict[str, Any]:
    """Run every batch through ORT and PyTorch float32; the measured diffs and agreement (raises when a
    variant's criterion fails, module docstring)."""
    tolerance, float16_tolerance, int8_tolerance, min_agreement = tolerances
    exact = dtype == "float32" and quantize == "none"
    parity: dict[int, float | None] = {}
    worst_rel, agree, agree_images, total, total_images = 0.0, 0, 0, 0, 0
    for name, xb in batches:
        got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
        if not np.isfinite(got).all():
            raise VitpruneError(f"ONNX Runtime gives non-finite outputs on {name}")
        with torch.no_grad():
            ref = model(xb).numpy()
        if got.shape != ref.shape:
            raise VitpruneError(f"ONNX output shape {got.shape} != PyTorch {ref.shape} on {name}")
        diff = float(np.abs(got - ref).max())
        if name.startswith("batch "):
            parity[xb.shape[0]] = diff if comparable else None
        if not comparable:
            continue
        worst_rel = max(worst_rel, diff / max(float(np.abs(ref).max()), 1e-12))
        same = int((got.argmax(-1) == ref.argmax(-1)).sum()) if got.ndim == 2 else 0
        if name.startswith("batch "):
            agree, total = agree + same, total + got.shape[0]
        else:
            agree_images, total_images = agree_images + same, total_images + got.shape[0]
        if exact and diff > tolerance:
            raise VitpruneError(f"ONNX Runtime differs from PyTorch by {diff:.3g} on {name} "
                                f"(tolerance {tolerance:g}); nothing was written")
    out: dict[str, Any] = {"parity": parity}
    if exact or not comparable:
        return {**out, "tolerance": tolerance if exact else None}
    what = "float16" if dtype == "float16" else "int8"
    limit = float16_tolerance if dtype == "float16" else int8_tolerance
    out.update(relative_diff=worst_rel, tolerance=limit)
    if quantize == "dynamic":
        images = total_images > 0
        share = agree_images / total_images if images else agree / max(total, 1)
        out.update(top1_agreement=share, agreement_inputs="images" if images else "random",
                   min_top1_agreement=min_agreement if images else None)
        if images and share < min_agreement:
            raise VitpruneError(f"the int8 export agrees with PyTorch's top-1 on {share:.1%} of the check images "
                                f"(at least {min_agreement:.0%} required); nothing was written")
        if images:
            return out  # the images' agreement is the criterion; the diff is reported
    if worst_rel > limit:
        raise VitpruneError(f"the {what} export differs from PyTorch float32 by {worst_rel:.3g} of the output's "
                            f"scale (tolerance {limit:g}); nothing was written")
    return out


def export_onnx(model: nn.Module, path: str | os.PathLike, *, example_input: torch.Tensor | None = None,
                opset: int = 18, optimize: str = "basic", dtype: str = "float32", quantize: str = "none",
                check_images: torch.Tensor | str | os.PathLike | None = None,
                parity_batches: tuple[int, ...] = (1, 8), tolerance: float = 1e-4,
                float16_tolerance: float = 1e-2, int8_tolerance: float = 0.25,
                min_top1_agreement: float = 0.95) -> ExportReport:
    """Export ``model`` in eval mode to ONNX at ``path`` (written atomically), checked first (module docstring).

    Args:
        model: a vitprune-rewritten GraphModule or any exportable model; input ``[B, C, H, W]``.
        path: the ``.onnx`` file to write.
        example_input: a batch at the model's input size (default: from the model / its recipe).
        opset: ONNX opset (18 exports attention as MatMul/Softmax/MatMul; 23 as one ``Attention`` op).
        optimize: ``"none"``, ``"basic"`` (onnx-graphsurgeon constant folding) or ``"ort"`` (ONNX
            Runtime's transformer optimizer), see :mod:`vitprune.ship.onnx_optimize`.
        dtype: ``"float32"`` or ``"float16"`` (float32 inputs and outputs, float16 weights).
        quantize: ``"none"`` or ``"dynamic"`` (int8 weights, ``onnxruntime.quantization.quantize_dynamic``).
        check_images: ``[B, C, H, W]`` normalised images, or a folder of image files (read with the
            model's normalisation), on which the int8 top-1 agreement is measured.
        parity_batches: batch sizes of the random inputs at which ONNX Runtime is compared with PyTorch.
        tolerance: float32: max abs difference allowed.
        float16_tolerance: float16: max abs difference / max abs PyTorch output allowed.
        int8_tolerance: int8 without check images: max abs difference / max abs PyTorch output allowed.
        min_top1_agreement: int8 with check images: least share of images with PyTorch's top-1 class.

    Returns:
        An :class:`ExportReport`.

    Raises:
        VitpruneError: an unknown option or combination, the exporter fails, the exported graph fails the
            checker or ORT's shape inference (``optimize="ort"``), or the check fails its criterion
            (nothing is written then).
    """
    import onnx
    import onnxruntime as ort

    check_options(optimize, dtype, quantize)
    path = Path(path)
    if not path.parent.is_dir():
        raise VitpruneError(f"the folder {path.parent} does not exist")
    model = copy.deepcopy(model).eval()
    x = example_input if example_input is not None else make_example_input(model)
    check_runs_on(model, x)  # a size the model refuses, said as such (not as an exporter failure)
    batches = _check_batches(model, x, parity_batches, check_images)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), opset_version=opset,
                                        input_names=["image"], output_names=["logits"], verbose=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitpruneError(f"torch.onnx could not export the model: {first}") from exc
    proto = program.model_proto
    before = len(proto.graph.node)
    if optimize != "none":
        proto = fold_constants(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise VitpruneError(f"the exported ONNX graph fails onnx's checker: {str(exc).splitlines()[0]}") from exc
    # ORT's fused ops (com.microsoft) are outside onnx's checker: it has seen the standard graph above
    proto, info = finish(proto, optimize=optimize, dtype=dtype, quantize=quantize)

    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    comparable = not _random_selection(model)
    checked = _compare(session, model, batches, comparable, dtype, quantize,
                       (tolerance, float16_tolerance, int8_tolerance, min_top1_agreement))
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return ExportReport(path=str(path), opset=opset, nodes_before_optimize=before,
                        nodes_after_optimize=len(proto.graph.node), op_types=op_counts(proto),
                        parity_comparable=comparable, bytes=len(data), optimize=optimize, dtype=dtype,
                        quantize=quantize, **checked, **info)
