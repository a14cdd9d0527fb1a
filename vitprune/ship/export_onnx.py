"""Export a (rewritten) model to optimised ONNX with a dynamic batch axis, and check it.

Pipeline: ``torch.onnx.export(dynamo=True)`` with the batch dimension dynamic (token counts stay the
static ints fixed at rewrite time) -> onnx-graphsurgeon constant folding + cleanup + toposort ->
``onnx.shape_inference.infer_shapes(strict_mode=True)`` -> ``onnx.checker.check_model(full_check=True)``
-> ONNX Runtime parity against PyTorch at batch 1 and 8. vitprune's gathers are flat ``index_select``
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
from vitprune.io.origin import check_runs_on
from vitprune.io.origin import example_input as make_example_input
from vitprune.ops.modules import TokenDrop, token_modules


@dataclass
class ExportReport:
    """What the export wrote and checked. ``parity`` maps batch size -> max abs diff ORT vs PyTorch."""

    path: str
    opset: int
    nodes_before_optimize: int
    nodes_after_optimize: int
    op_types: dict[str, int]
    parity: dict[int, float | None] = field(default_factory=dict)
    parity_comparable: bool = True
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _random_selection(model: nn.Module) -> bool:
    return any(isinstance(m, TokenDrop) and m.selection == "random" and (m.at_inference or m.training)
               for m in token_modules(model))


def optimize(model_proto):
    """Constant folding and dead-node cleanup with onnx-graphsurgeon; returns a new ModelProto."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model_proto)
    graph.fold_constants().cleanup().toposort()
    return gs.export_onnx(graph)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, example_input: torch.Tensor | None = None,
                opset: int = 18, optimize_graph: bool = True, parity_batches: tuple[int, ...] = (1, 8),
                tolerance: float = 1e-4) -> ExportReport:
    """Export ``model`` in eval mode to ONNX at ``path`` (written atomically).

    Args:
        model: a vitprune-rewritten GraphModule or any exportable model; input ``[B, C, H, W]``.
        path: the ``.onnx`` file to write.
        example_input: a batch at the model's input size (default: from the model / its recipe).
        opset: ONNX opset (18 exports attention as MatMul/Softmax/MatMul; 23 as one ``Attention`` op).
        optimize_graph: fold constants and clean up with onnx-graphsurgeon.
        parity_batches: batch sizes at which ONNX Runtime is compared with PyTorch.
        tolerance: max abs difference allowed in the parity check.

    Returns:
        An :class:`ExportReport`.

    Raises:
        VitpruneError: the exporter fails, the exported graph fails the checker, or parity exceeds
            ``tolerance`` (nothing is written then).
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.parent.is_dir():
        raise VitpruneError(f"the folder {path.parent} does not exist")
    model = copy.deepcopy(model).eval()
    x = example_input if example_input is not None else make_example_input(model)
    check_runs_on(model, x)  # a size the model refuses, said as such (not as an exporter failure)
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
    if optimize_graph:
        proto = optimize(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise VitpruneError(f"the exported ONNX graph fails onnx's checker: {str(exc).splitlines()[0]}") from exc

    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    comparable = not _random_selection(model)
    parity: dict[int, float | None] = {}
    gen = torch.Generator().manual_seed(0)
    for b in parity_batches:
        xb = torch.randn(b, *x.shape[1:], generator=gen)
        got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
        if not np.isfinite(got).all():
            raise VitpruneError(f"ONNX Runtime gives non-finite outputs at batch {b}")
        with torch.no_grad():
            ref = model(xb).numpy()
        if got.shape != ref.shape:
            raise VitpruneError(f"ONNX output shape {got.shape} != PyTorch {ref.shape} at batch {b}")
        parity[b] = float(np.abs(got - ref).max()) if comparable else None
        if comparable and parity[b] > tolerance:
            raise VitpruneError(f"ONNX Runtime differs from PyTorch by {parity[b]:.3g} at batch {b} "
                                f"(tolerance {tolerance:g}); nothing was written")

    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return ExportReport(path=str(path), opset=opset, nodes_before_optimize=before,
                        nodes_after_optimize=len(proto.graph.node), op_types=dict(sorted(ops.items())),
                        parity=parity, parity_comparable=comparable, bytes=len(data))
