"""Draw which patches a rewritten ViT keeps: ``vitprune show MODEL IMAGE -o PNG``.

One panel shows the input image with all ``P`` patches, then one panel per pruning stage (a vitprune
token module, in graph order) with the dropped patches darkened and tinted blue; panels wrap
:data:`PANELS_PER_ROW` to a row. For ``token-drop`` the stage is
PatchDropout (arXiv 2208.07220) or, with ``selection="magnitude"``, the L1-norm selection of the
Patch Sampling Schedule (arXiv 2208.09520); a token drop that is active in training only is switched
on for the one forward drawn here, so the picture shows what a training step would keep.

    from vitprune.ship.show import show
    stages = show(vitprune.load("vit_s_td"), "cat.jpg", "cat_kept.png")

Pieces (usable alone): :func:`load_image` (read, resize, crop, normalise), :func:`kept_patches`
(grid positions kept at each stage) and :func:`draw` (the picture). Plotting uses matplotlib's Agg
canvas directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx, nn

from vitprune.device import autocast, resolve_device, resolve_dtype
from vitprune.errors import VitpruneError
from vitprune.io.images import load_image
from vitprune.io.outputs import atomic_file, same_file
from vitprune.ops.modules import TokenModule
from vitprune.io.preprocess import resolve_preprocessing

#: brightness factor of a dropped patch in :func:`draw`.
DROPPED_BRIGHTNESS = 0.25
#: colour blended into a dropped patch, so dropped patches of a dark background still show.
DROPPED_TINT = np.array([0.10, 0.20, 0.55], dtype=np.float32)
#: panels per row of :func:`draw`'s picture (ten side by side were unreadable without zoom).
PANELS_PER_ROW = 4


def _token_modules_in_graph_order(gm: fx.GraphModule) -> list[tuple[str, TokenModule]]:
    """(node name, module) for every call of a vitprune token module, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, TokenModule):
                found.append((node.name, mod))
    return found


def kept_patches(model: nn.Module, x: torch.Tensor, *, device: str | torch.device | None = "cpu",
                 dtype: str | torch.dtype | None = None) -> list[dict[str, Any]]:
    """The patch-grid positions kept at each pruning stage for image 0 of ``x``.

    Runs one forward of ``model`` in eval mode under ``torch.no_grad`` with torch's RNG seeded to 0
    (forked, so the caller's RNG state is untouched) and every :class:`~vitprune.ops.modules.TokenModule`
    recording ``last_kept`` ``[B, K]`` (kept indices into *that module's input* patch tokens). A token
    module active in training only (``at_inference=False``, as in PatchDropout, arXiv 2208.07220) is
    switched on for this forward. The modules' flags and the model's train/eval mode are restored after.
    The forward runs on ``device`` (``None``: CUDA when available) under autocast to ``dtype`` (default float32;
    :mod:`vitprune.device`); the model is moved back where it was.

    Stages follow the modules' order in the fx graph; grid positions compose: before the first
    stage they are ``arange(P)``, after each stage ``positions = positions[last_kept]``. A token module
    that did not run or drop (``last_kept`` is None) gives no stage.

    Args:
        model: a model with vitprune token modules (a ``torch.fx.GraphModule`` from
            :func:`vitprune.rewrite` / :func:`vitprune.load`, or a module fx can capture).
        x: ``[B, C, H, W]`` normalised images (:func:`load_image`), at the model's input size.

    Returns:
        One dict per stage: ``{"before_block": int, "kept": LongTensor [K] of grid positions (indices
        into the row-major ``h x w`` patch grid, ascending), "num_patches": P}``.

    Raises:
        VitpruneError: the model has no token module, or none drops tokens in this forward.
        CaptureError, AnalysisError: as :func:`vitprune.inspect_model`.
    """
    return _kept_patches(model, x, device, dtype)[0]


def _kept_patches(model: nn.Module, x: torch.Tensor, device: Any = "cpu", dtype: Any = None):
    """:func:`kept_patches`, plus the :class:`~vitprune.graph.analysis.ViTGraph` it analysed."""
    from vitprune.frontends.capture import capture
    from vitprune.rewrite import inspect_model

    if not any(isinstance(m, TokenModule) for m in model.modules()):
        raise VitpruneError("MODEL has no token ops to show: rewrite it first")
    gm = capture(model, x)  # a GraphModule is returned as it is; otherwise shares model's submodules
    ops = _token_modules_in_graph_order(gm)
    if not ops:
        raise VitpruneError("MODEL has no token ops to show: rewrite it first")

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    param = next(gm.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    x = x.to(home)
    was_training = gm.training
    saved = [(m, m.record_kept, getattr(m, "at_inference", None)) for _, m in ops]
    try:
        gm.eval()
        # the analysis tells batch from other axes best with B >= 2
        vit = inspect_model(gm, example_input=x if x.shape[0] >= 2 else torch.cat([x, x]))
        for _, m in ops:
            m.record_kept = True
            m.last_kept = None
            if getattr(m, "at_inference", None) is False:
                m.at_inference = True
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), autocast(dev, dt):
            torch.manual_seed(0)
            gm.to(dev)(x.to(dev))
    finally:
        gm.to(home)
        for m, record, at_inference in saved:
            m.record_kept = record
            if at_inference is not None:
                m.at_inference = at_inference
        gm.train(was_training)

    before = {op["node"]: op["before_block"] for op in vit.token_ops}
    num_patches = vit.num_patches
    positions = torch.arange(num_patches)
    stages = []
    for name, m in ops:
        if m.last_kept is None:
            continue
        kept = m.last_kept[0].detach().to("cpu", torch.long)
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= positions.numel()):
            raise VitpruneError(f"token op {name!r} kept index {int(kept.max())} of {positions.numel()} patch tokens")
        lives = getattr(m, "last_lives", None)
        if lives is not None:  # lifespan-gather: one panel of the predicted lives, in grid order
            grid_lives = torch.empty(num_patches)
            grid_lives[positions] = lives[0].detach().float().cpu()
            stages.append({"lives": grid_lives, "range": (m.first_block, m.num_blocks), "num_patches": num_patches})
        positions = positions[kept]
        if positions.numel() == num_patches:
            continue  # a reordering (lifespan sort) keeps every patch: nothing to draw
        stages.append({"before_block": int(before.get(name, -1)), "kept": positions.clone(), "num_patches": num_patches})
    if not stages:
        raise VitpruneError("MODEL's token ops drop no tokens in eval mode, so there is nothing to show")
    return stages, vit


def _lives_panel(display: np.ndarray, grid: tuple[int, int], patch_size: tuple[int, int],
                 stage: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The image under a viridis map of each patch's predicted life (lifespan-gather), scaled to this
    image's lowest .. highest life (possible lives span ``stage["range"]``)."""
    from matplotlib import colormaps

    gh, gw = grid
    ph, pw = patch_size
    lives = stage["lives"].numpy().reshape(gh, gw)
    low, high = float(lives.min()), float(lives.max())  # the image's own range, for contrast
    colours = colormaps["viridis"](np.clip((lives - low) / max(high - low, 1e-6), 0, 1))[..., :3].astype(np.float32)
    overlay = np.array(display, dtype=np.float32, copy=True)
    tinted = np.kron(colours, np.ones((ph, pw, 1), dtype=np.float32))
    overlay[: gh * ph, : gw * pw] = 0.35 * overlay[: gh * ph, : gw * pw] + 0.65 * tinted
    return overlay, f"predicted life: {low:.1f} (dark) .. {high:.1f} (bright) blocks"


def _panels(display: np.ndarray, grid: tuple[int, int], patch_size: tuple[int, int],
            stages: list[dict[str, Any]]) -> list[tuple[np.ndarray, str]]:
    """(image ``[H, W, 3]``, title) per panel: the image, then each stage with dropped patches darkened and tinted."""
    gh, gw = grid
    ph, pw = patch_size
    height, width = display.shape[:2]
    total = gh * gw
    panels = [(display, f"all {total} patches")]
    for stage in stages:
        if "lives" in stage:
            panels.append(_lives_panel(display, grid, patch_size, stage))
            continue
        kept = np.zeros(total, dtype=bool)
        kept[np.asarray(stage["kept"], dtype=np.int64)] = True
        mask = np.full((height, width), DROPPED_BRIGHTNESS, dtype=np.float32)
        patch_mask = np.where(kept.reshape(gh, gw), 1.0, DROPPED_BRIGHTNESS).astype(np.float32)
        mask[: gh * ph, : gw * pw] = np.kron(patch_mask, np.ones((ph, pw), dtype=np.float32))
        title = f"before block {stage['before_block']}: {int(kept.sum())} of {stage['num_patches']} patches"
        dropped = (1.0 - mask[:, :, None]) / (1.0 - DROPPED_BRIGHTNESS)  # 1 where dropped, 0 where kept
        panels.append((display * mask[:, :, None] + dropped * (1.0 - DROPPED_BRIGHTNESS) * DROPPED_TINT, title))
    return panels


def draw(
    display: np.ndarray,
    grid: Sequence[int],
    patch_size: Sequence[int],
    stages: list[dict[str, Any]],
    path: str | os.PathLike,
) -> Path:
    """Draw the image and the patches kept at each stage, :data:`PANELS_PER_ROW` panels a row, and write it to
    ``path``.

    Panel 0 is the image ("all N patches"); then one panel per stage, dropped patches darkened (times
    :data:`DROPPED_BRIGHTNESS`, tinted blue), titled "before block b: K of P patches". A faint line marks the patch
    grid. The file is written to a temporary file in ``path``'s folder then renamed over ``path``, so
    a failure leaves no partial picture. The format follows the suffix (``.png``, ``.jpg``, ``.pdf``,
    ``.svg``, ...; PNG when matplotlib does not know it).

    Args:
        display: ``[H, W, 3]`` image in ``[0, 1]`` (:func:`load_image`).
        grid: ``[h, w]`` patch grid (``ViTGraph.grid``); ``h * w`` is each stage's ``num_patches``.
        patch_size: ``[ph, pw]`` pixels per patch (``ViTGraph.patch_size``).
        stages: :func:`kept_patches`'s result.
        path: output file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        VitpruneError: the folder of ``path`` does not exist, or the grid does not fit the image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise VitpruneError(f"the folder {path.parent} for -o does not exist")
    gh, gw = (int(v) for v in grid)
    ph, pw = (int(v) for v in patch_size)
    height, width = display.shape[:2]
    if gh * ph > height or gw * pw > width:
        raise VitpruneError(f"a {gh}x{gw} grid of {ph}x{pw} patches does not fit a {height}x{width} image")

    for stage in stages:
        kept = np.asarray(stage.get("kept", []), dtype=np.int64)
        if kept.size and (kept.min() < 0 or kept.max() >= gh * gw):
            raise VitpruneError(f"a kept patch position ({kept.max()}) is outside the {gh}x{gw} patch grid")
    panels = _panels(display, (gh, gw), (ph, pw), stages)

    panel_in = 3.2
    cols = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(panel_in * cols, rows * (panel_in * height / width + 0.5)), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()  # the last row's empty places
    for i, (ax, (img, title)) in enumerate(zip(axes, panels)):
        ax.imshow(np.clip(img, 0.0, 1.0), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if i:
            for r in range(1, gh):
                ax.axhline(r * ph - 0.5, color="white", linewidth=0.3, alpha=0.35)
            for col in range(1, gw):
                ax.axvline(col * pw - 0.5, color="white", linewidth=0.3, alpha=0.35)
    fig.tight_layout()

    fmt = path.suffix[1:].lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        fmt = "png"
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return path


def show(
    model: nn.Module,
    image: str | os.PathLike,
    output: str | os.PathLike,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    protect: Sequence[str | os.PathLike] = (),
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Draw ``image`` with the patches ``model`` keeps at each stage into ``output``.

    :func:`load_image` at ``input_size`` (default :func:`vitprune.io.origin.default_input_size`), then
    :func:`kept_patches`, then :func:`draw` with the grid and patch size of the graph analysis.

    Args:
        model: a rewritten model (see :func:`kept_patches`).
        image: the picture to draw on.
        output: the file to write (PNG by default).
        mean, std: normalisation of the model's inputs; default: the model's own
            (:func:`vitprune.io.preprocess.resolve_preprocessing`).
        input_size: ``(C, H, W)`` when it cannot be read from the model.
        protect: other input files ``output`` must not be (the model file, ...); ``image`` always is.
        device, dtype: where and in which autocast precision the forward runs (:func:`kept_patches`; default
            CUDA when available, float32).

    Returns:
        :func:`kept_patches`'s stages.

    Raises:
        VitpruneError: ``output`` is ``image`` or a protected file, or a folder; the image is missing or
            unreadable; the model has no token ops; the patch embedding has no grid to draw on; a bad device
            or dtype.
    """
    from vitprune.io.origin import default_input_size

    output, image = Path(output), Path(image)
    for other in [image, *map(Path, protect)]:
        if same_file(output, other):
            raise VitpruneError(f"the output {output} is the input {other}; choose another -o")
    if output.is_dir():
        raise VitpruneError(f"the output {output} is a folder; -o takes an image file name")
    if not output.parent.is_dir():
        raise VitpruneError(f"the folder {output.parent} for -o does not exist")
    size = tuple(input_size) if input_size else default_input_size(model)
    prep = resolve_preprocessing(model, mean, std, channels=size[0])
    x, display = load_image(image, size, prep.mean, prep.std)
    stages, vit = _kept_patches(model, x, device, dtype)
    if not vit.grid or not vit.patch_size:
        raise VitpruneError("the model's patch embedding is not a convolution, so there is no patch grid to draw on")
    if vit.grid[0] * vit.grid[1] != vit.num_patches:
        raise VitpruneError(
            f"the {vit.grid[0]}x{vit.grid[1]} patch grid does not hold the model's {vit.num_patches} patch tokens"
        )
    draw(display, vit.grid, vit.patch_size, stages, output)
    return stages
