"""``vitprune.rewrite_onnx``: load -> analyse -> pass -> lower with onnx-graphsurgeon -> verify in ONNX Runtime.

The ONNX twin of :func:`vitprune.rewrite`, for ONNX files someone else exported (TorchScript or dynamo
exporter, ONNX Runtime's fused transformer graphs): no PyTorch code of the model is needed.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from vitprune.errors import AnalysisError, PassError, VerificationError, VitpruneError
from vitprune.graph.analysis import ViTGraph, analyse_opgraph
from vitprune.io.outputs import atomic_file
from vitprune.rewrite import RewriteReport

if TYPE_CHECKING:
    import onnx

# onnx and onnx-graphsurgeon load on first use (``import vitprune`` stays as fast as the CLI needs)


def inspect_onnx(model: Any, *, input_size: tuple[int, int, int] | None = None) -> ViTGraph:
    """Analyse an ONNX ViT (a path or a ``ModelProto``); returns the :class:`ViTGraph` (node fields hold
    ONNX tensor names).

    Raises:
        VitpruneError: the file is not an ONNX model; AnalysisError: the graph is not a ViT vitprune can
            analyse (the message says what was found and why).
    """
    from vitprune.frontends import onnx as onnx_frontend

    proto = onnx_frontend.load_model(model)
    _refuse_rewritten(proto)
    x = onnx_frontend.example_input(proto, onnx_frontend.analysis_batch(proto), input_size)
    proto, values = _without_noop_masks(proto, x, 1e-5)
    return analyse_opgraph(onnx_frontend.to_opgraph(proto, x, values), list(x.shape))


def onnx_flops_per_image(model: Any, *, input_size: tuple[int, int, int] | None = None) -> float:
    """FLOPs of one run of an ONNX ViT per image (:mod:`vitprune.graph.flops_onnx`), at the batch the analysis
    uses (:func:`vitprune.frontends.onnx.analysis_batch`)."""
    from vitprune.frontends import onnx as onnx_frontend

    proto = onnx_frontend.load_model(model)
    x = onnx_frontend.example_input(proto, onnx_frontend.analysis_batch(proto), input_size)
    return _flops(proto, onnx_frontend.run_values(proto, x), x) / x.shape[0]


#: metadata key of an ONNX model vitprune rewrote: the passes it ran, as JSON
RECIPE_KEY = "vitprune.recipe"


def recipe_of(proto: "onnx.ModelProto") -> list[dict[str, Any]] | None:
    """The passes vitprune ran on this ONNX model (its ``vitprune.recipe`` metadata), or None.

    Raises:
        AnalysisError: the metadata is not vitprune's recipe (not JSON, nested deeper than
            :data:`RECIPE_DEPTH`, not a list of passes): anyone can write metadata into an ONNX file.
    """
    import json

    for prop in proto.metadata_props:
        if prop.key == RECIPE_KEY:
            try:
                recipe = json.loads(prop.value)
            except (ValueError, RecursionError):
                recipe = None
            if not (isinstance(recipe, list) and _depth(recipe) <= RECIPE_DEPTH
                    and all(isinstance(step, dict) and isinstance(step.get("pass"), str) for step in recipe)):
                raise AnalysisError(f"the ONNX metadata {RECIPE_KEY!r} is not a recipe vitprune wrote "
                                    "(a JSON list of passes); remove it or export the model again")
            return recipe
    return None


#: deepest nesting of a recipe vitprune writes is 4 (list, step, params, a per-block dict); deeper JSON would
#: only exhaust the recursion of whatever prints it
RECIPE_DEPTH = 16


def _depth(doc: Any) -> int:
    """How deeply lists and dicts nest in a parsed JSON document (iteratively: it may nest past recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def describe_rewritten_onnx(model: Any, *, input_size: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """What can be read of an ONNX model vitprune rewrote (the analysis does not read its token ops back):
    the recipe from its ``vitprune.recipe`` metadata, the tokens per block the recipe records, the tokens each
    attention op reads (from one ONNX Runtime run of the graph) and the FLOPs per image.

    Returns:
        ``{"recipe": [{"pass", "params", "decisions"}], "tokens_per_block": [int] | None (the recipe's, when it
        records them), "attention_tokens": [{"node", "tokens"}], "flops_per_image": float}``.

    Raises:
        AnalysisError: the model holds no recipe, or a malformed one (:func:`recipe_of`), or its graph does
            not run.
    """
    from vitprune.frontends import onnx as onnx_frontend
    from vitprune.graph.analysis import attention_tokens

    proto = onnx_frontend.load_model(model)
    recipe = recipe_of(proto)
    if not recipe:
        raise AnalysisError("this ONNX model holds no vitprune recipe: inspect analyses it as any ONNX file")
    x = onnx_frontend.example_input(proto, onnx_frontend.analysis_batch(proto), input_size)
    values = onnx_frontend.run_values(proto, x)
    attention = attention_tokens(onnx_frontend.to_opgraph(proto, x, values))
    recorded = recipe[-1].get("decisions")
    per_block = recorded.get("tokens_per_block") if isinstance(recorded, dict) else None
    if isinstance(per_block, int) and not isinstance(per_block, bool):  # token-drop: one count for every block
        per_block = [per_block] * len(attention)
    if not (isinstance(per_block, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in per_block)):
        per_block = None  # anyone can write metadata: a count that is not one is not shown
    return {"recipe": [{"pass": step["pass"], "params": step.get("params") if isinstance(step.get("params"), dict)
                        else {}, "decisions": step.get("decisions")} for step in recipe],
            "tokens_per_block": per_block,
            "attention_tokens": [{"node": n, "tokens": t} for n, t in attention],
            "flops_per_image": _flops(proto, values, x) / x.shape[0]}


def _refuse_rewritten(proto: "onnx.ModelProto") -> None:
    recipe = recipe_of(proto)
    if recipe is not None:  # the key alone says vitprune wrote the file, even with its recipe emptied
        done = ", ".join(step["pass"] for step in recipe) or "no passes recorded"
        raise AnalysisError(f"this ONNX model was already rewritten by vitprune ({done}); its token ops are "
                            "plain ONNX nodes the analysis does not read back: rewrite the original file")


def _without_noop_masks(proto: "onnx.ModelProto", x: np.ndarray, tolerance: float):
    """``(model, values of every tensor on x)`` with the masks that mask nothing dropped
    (:func:`vitprune.frontends.onnx.drop_noop_attention_masks`), checked to leave every output as it was."""
    from vitprune.frontends import onnx as onnx_frontend

    values = onnx_frontend.run_values(proto, x)
    clean, changed = onnx_frontend.drop_noop_attention_masks(proto, values, onnx_frontend.image_input(proto).name)
    if not changed:
        return proto, values
    import onnx_graphsurgeon as gs

    clean = gs.export_onnx(gs.import_onnx(clean).cleanup())  # the mask's own ops are dead now
    again = onnx_frontend.run_values(clean, x)
    for o in proto.graph.output:
        if _relative(values[o.name], again[o.name]) > tolerance:
            raise VerificationError(f"dropping the attention masks that mask nothing ({changed[0]!r}) changed "
                                    f"output {o.name!r}: vitprune cannot rewrite this graph")
    return clean, again


def _flops(proto: onnx.ModelProto, values: dict[str, np.ndarray], x: np.ndarray) -> int:
    from vitprune.frontends import onnx as onnx_frontend
    from vitprune.graph.flops_onnx import count_onnx_flops

    shapes = {k: tuple(v.shape) for k, v in values.items()}
    shapes[onnx_frontend.image_input(proto).name] = tuple(x.shape)
    for init in proto.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return count_onnx_flops(proto, shapes)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return float((a != b).any())
    return float(np.abs(a.astype(np.float64) - b).max(initial=0.0) / (1.0 + np.abs(a).max(initial=0.0)))


def _checked(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes inferred (strict) and the full checker run; graphs over 2 GB are checked from a file."""
    import onnx

    try:
        if proto.ByteSize() < 2 ** 31 - 2 ** 20:
            proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
            onnx.checker.check_model(proto, full_check=True)
        else:
            with tempfile.TemporaryDirectory(prefix="vitprune-check-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                onnx.save(proto, path, save_as_external_data=True, location="model.onnx.data")
                onnx.shape_inference.infer_shapes_path(path, path, check_type=True, strict_mode=True)
                onnx.checker.check_model(path, full_check=True)
                proto = onnx.load(path)
    except Exception as exc:
        raise VerificationError(f"the rewritten ONNX graph fails onnx's checker: {str(exc).strip().splitlines()[0]}") from None
    return proto


def rewrite_onnx(
    model: Any,
    method: str = "token-drop",
    *,
    input_size: tuple[int, int, int] | None = None,
    tolerance: float = 1e-5,
    seed: int = 0,
    **params: Any,
) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite an ONNX ViT so it spends compute on fewer tokens, and verify the result in ONNX Runtime.

    Args:
        model: a path to an ``.onnx`` file (external data beside it is read) or an ``onnx.ModelProto``.
        method: a registered pass (``token-drop``, ``importance-mask``, ``lifespan-gather``); token-drop is
            always active in an ONNX graph (inference), as ``at_inference=True``.
        input_size: ``(C, H, W)`` when the graph's input size is symbolic.
        tolerance: keep-all tolerance: every original tensor and output of the keep-all graph must match
            the original within ``tolerance`` relative to ``1 + max |value|``.
        seed: seed of the example batch ``[2, C, H, W]`` (``[b, C, H, W]`` for a file whose input fixes the
            batch at ``b``: the analysis and the checks run at the file's own batch).
        **params: the method's parameters, as for :func:`vitprune.rewrite`.

    Returns:
        ``(model, report)``: the rewritten ``ModelProto`` (shapes inferred, checked; the batch dynamic as in the
        original, or the original's static batch) and a
        :class:`~vitprune.rewrite.RewriteReport` (FLOPs for one run of the example batch, counted from the
        graph's MatMul/Gemm/Conv/attention shapes: :mod:`vitprune.graph.flops_onnx`).

    Raises:
        VitpruneError: not an ONNX model; AnalysisError: not a ViT vitprune can analyse; PassError: the pass
            refused; VerificationError: keep-all differs, an output is not finite, a token count was not
            re-specialised, or the graph fails onnx's checker.
    """
    from vitprune.frontends import onnx as onnx_frontend
    from vitprune.frontends.onnx_lowering import OnnxLowering, check_token_shapes
    from vitprune.passes import make_pass
    from vitprune.passes.token_restore import restore_points

    start = time.perf_counter()
    proto = onnx_frontend.load_model(model)
    _refuse_rewritten(proto)
    opset = onnx_frontend.opset_of(proto)
    batch = onnx_frontend.static_batch(proto)
    x = onnx_frontend.example_input(proto, batch or 2, input_size, seed)
    proto, values = _without_noop_masks(proto, x, tolerance)
    vit = analyse_opgraph(onnx_frontend.to_opgraph(proto, x, values), list(x.shape))
    pass_ = make_pass(method, **params)
    if not hasattr(pass_, "lower_onnx"):
        raise PassError(f"method {method!r} has no ONNX lowering yet")
    pass_.analysis = vit
    try:
        pass_.requires(None)
    except VitpruneError as exc:
        raise PassError(f"pass {method!r} refused: {exc}") from exc
    end, readers = restore_points(vit)
    if vit.token_indexed:  # dense readers get their tokens back: OnnxLowering.restore_tokens
        raise PassError(f"pass {method!r} refused: tensor {vit.token_indexed[0]['node']!r} is indexed by token "
                        "position, which the ONNX lowering does not follow yet: rewrite the PyTorch model, then "
                        "export it (vitprune export)")
    if (end is not None or readers) and not getattr(pass_, "restores_tokens", False):
        what = f"the readout at node {vit.readout.nodes[0]!r}" if end is not None else f"node {readers[0]['node']!r}"
        raise PassError(f"pass {method!r} refused: {what} needs every token back in place, which {method} cannot give")
    flops_before = _flops(proto, values, x)

    def run_original(names: Iterable[str], images: np.ndarray) -> dict[str, np.ndarray]:
        images = images.astype(np.float32)
        if batch is None:
            return onnx_frontend.run_values(proto, images, names)
        return _in_static_batches(lambda part: onnx_frontend.run_values(proto, part, names), images, batch)

    built = {}
    for keep_all in (True, False):
        ctx = OnnxLowering(proto, vit, opset, x, values, flops_before / x.shape[0], keep_all, run_original)
        try:
            pass_.lower_onnx(ctx)
            if end is not None or readers:
                ctx.restore_tokens(end, readers, pass_.params.get("restore", "last"))
        except VitpruneError as exc:
            raise PassError(f"pass {method!r} refused: {exc}") from exc
        built[keep_all] = (_checked(ctx.finish()), ctx)

    # keep-all: every original tensor and every output as before
    keep_all_model = built[True][0]
    original_names = [o for n in proto.graph.node for o in n.output if o]
    present = {o for n in keep_all_model.graph.node for o in n.output}
    missing = [n for n in original_names if n not in present]
    if missing:
        raise VerificationError(f"tensor {missing[0]!r} of the original graph is not in the rewritten graph "
                                f"({len(missing)} missing): the lowering removed or renamed it")
    kept = onnx_frontend.run_values(keep_all_model, x, original_names)
    worst, worst_name = 0.0, None
    for name in original_names:
        d = _relative(values[name], kept[name])
        if d > worst:
            worst, worst_name = d, name
        if d > tolerance:
            raise VerificationError(f"with every token kept, tensor {name!r} differs from the original by {d:.3g} "
                                    f"(relative; tolerance {tolerance:g}): the rewrite is not exact")
    outputs = [o.name for o in proto.graph.output]
    out_diff = max(float(np.abs(values[o].astype(np.float64) - kept[o]).max(initial=0.0)) for o in outputs)

    # the rewrite: token axes follow the kept counts, outputs finite, batch stays dynamic
    new, ctx = built[False]
    after = onnx_frontend.run_values(new, x)  # every tensor: the FLOPs count needs the new ones too
    check_token_shapes(after, values, ctx)
    finite = all(np.isfinite(after[o]).all() for o in outputs)
    # a dynamic batch stays dynamic (checked at another batch); a static one stays the file's own
    other = onnx_frontend.run_values(new, onnx_frontend.example_input(proto, batch or 3, input_size, seed + 1), outputs)
    if not finite or not all(np.isfinite(v).all() for v in other.values()):
        raise VerificationError("the rewritten ONNX graph gives non-finite outputs")
    if any(other[o].shape[0] != (batch or 3) for o in outputs if other[o].ndim):
        raise VerificationError("the rewritten ONNX graph does not keep the batch dynamic")
    flops_after = _flops(new, after, x)
    import json

    from vitprune.graph.keep_counts import prunable_share_of

    share = prunable_share_of(vit, pass_.record, flops_before / x.shape[0])
    if share is not None:  # what the method can cut at all: the blocks from its pruning point on
        pass_.record["prunable_flops_share"] = share
    recipe = [{"pass": method, "params": {k: v for k, v in pass_.params.items() if k != "calibration"} | (
        {"calibration": str(pass_.params["calibration"])} if pass_.params.get("calibration") else {}),
        "decisions": pass_.record}]
    new.metadata_props.add(key=RECIPE_KEY, value=json.dumps(recipe, default=str))
    report = RewriteReport(
        method=method, params=pass_.params, decisions=pass_.record, input_shape=list(x.shape),
        flops_before=flops_before, flops_after=flops_after, flops_after_train=flops_after,
        keep_all_max_abs_diff=out_diff, keep_all_nodes_compared=len(original_names),
        keep_all_worst_node=worst_name, keep_all_worst_node_diff=worst, outputs_finite=True,
        seconds=time.perf_counter() - start, analysis=vit.to_dict(),
    )
    return new, report


def _in_static_batches(run, images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """``run`` (a graph with a static batch ``batch``) over ``images`` ``[n, C, H, W]`` in chunks of ``batch``
    (the last padded with zeros, the padding cut off again), the values concatenated on the batch axis.
    Values without a batch axis (a shape, a table) are those of the first chunk."""
    n = images.shape[0]
    chunks = []
    for start in range(0, n, batch):
        part = images[start:start + batch]
        if part.shape[0] < batch:
            part = np.concatenate([part, np.zeros((batch - part.shape[0], *part.shape[1:]), part.dtype)])
        chunks.append(run(part))
    out = {}
    for name, first in chunks[0].items():
        if np.ndim(first) and first.shape[0] == batch:
            out[name] = np.concatenate([c[name] for c in chunks])[:n]
        else:
            out[name] = first
    return out


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically (a temporary file beside it, then a rename). With
    ``external_data`` (default: when the model is over 2 GB, protobuf's limit) the weights go to
    ``<name>.data`` beside it (ONNX external data), written first; the graph pointing to it lands last.

    Raises:
        VitpruneError: the folder does not exist or cannot be written.
    """
    import onnx

    path = Path(path)
    if not path.parent.is_dir():
        raise VitpruneError(f"the folder {path.parent} does not exist")
    external = model.ByteSize() >= 2 ** 31 - 2 ** 20 if external_data is None else external_data
    data = path.with_name(path.name + ".data")
    data_exists = VitpruneError(f"{data} exists (the external data of {path.name} would replace it); remove it or "
                                "choose another output")
    if external and (data.exists() or data.is_symlink()):
        raise data_exists
    linked = False
    try:
        with atomic_file(path) as tmp:
            if external:  # the data file lands first under its final name; the graph pointing to it last
                copy = onnx.ModelProto()
                copy.CopyFrom(model)  # onnx.save moves the weights of the model it is given out to the file
                with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent) as staging:
                    # written under a temporary folder (the graph names it ``NAME.data``), then linked into
                    # place: os.link fails on an existing file, so a file that appeared meanwhile is kept
                    onnx.save(copy, os.path.join(staging, path.name), save_as_external_data=True,
                              location=data.name, all_tensors_to_one_file=True)
                    try:
                        os.link(os.path.join(staging, data.name), data)
                        linked = True
                    except FileExistsError:  # it appeared after the check above
                        raise data_exists from None
                    os.replace(os.path.join(staging, path.name), tmp)
            else:
                onnx.save(model, str(tmp))
    except BaseException:
        if linked:  # the graph did not land: the data file it points to goes too
            data.unlink(missing_ok=True)
        raise
