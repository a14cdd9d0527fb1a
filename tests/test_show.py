"""``vitprune show``: kept grid positions per stage, the picture, and refused inputs/outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vitprune
from vitprune.io.origin import default_input_size
from vitprune.ops.modules import TokenDrop
from vitprune.ship.show import DROPPED_BRIGHTNESS, DROPPED_TINT, _panels, draw, kept_patches, load_image

ARGS = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2)
CLI_ARGS = [a for k, v in ARGS.items() for a in ("--model-arg", f"{k}={v}")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A magnitude token-drop model (keep 16 of 64) saved by vitprune, and a real photograph."""
    from skimage import data

    d = tmp_path_factory.mktemp("show")
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224", model_args=ARGS)
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.25, selection="magnitude", at_inference=True)
    vitprune.save(rewritten, d / "m")
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")
    return d


def _drop_input(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = module.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return seen[0]


def test_load_image(files):
    x, display = load_image(files / "astronaut.png", (3, 64, 48), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 64, 48) and x.dtype == torch.float32
    assert display.shape == (64, 48, 3) and display.min() >= 0 and display.max() <= 1
    assert torch.allclose(x[0].permute(1, 2, 0), torch.from_numpy(display).float() * 2 - 1, atol=1e-6)


def test_kept_patches_are_the_largest_l1_tokens(files):
    model = vitprune.load(files / "m")
    x, _ = load_image(files / "astronaut.png", default_input_size(model), (0.5,) * 3, (0.5,) * 3)
    stages = kept_patches(model, x)
    assert len(stages) == 1
    kept = stages[0]["kept"]
    assert stages[0]["before_block"] == 0 and stages[0]["num_patches"] == 64
    assert kept.dtype == torch.long and kept.numel() == 16
    assert len(set(kept.tolist())) == 16 and 0 <= int(kept.min()) and int(kept.max()) < 64
    # the tokens entering the drop: the 16 patch tokens (after the CLS token) of largest L1 norm
    (drop,) = [m for m in model.modules() if isinstance(m, TokenDrop)]
    norms = _drop_input(model, drop, x)[0, 1:].abs().sum(-1)
    assert sorted(kept.tolist()) == sorted(torch.topk(norms, 16).indices.tolist())
    assert not drop.record_kept  # flags restored


def test_stages_compose_in_graph_order(files):
    """A second drop after block 0 keeps 8 of the 16: its indices map through the first stage's."""
    model = vitprune.load(files / "m")
    first = next(n for n in model.graph.nodes if n.op == "call_module" and isinstance(
        model.get_submodule(n.target), TokenDrop))
    last_add = vitprune.inspect_model(model).blocks[0].residual_adds[-1]  # block 0's MLP residual add
    block0_end = next(n for n in model.graph.nodes if n.name == last_add)
    second = TokenDrop(num_prefix_tokens=1, num_patches=16, keep_count=8, selection="magnitude")  # training only
    model.add_submodule("second_drop", second)
    with model.graph.inserting_after(block0_end):
        node = model.graph.call_module("second_drop", (block0_end,))
    block0_end.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    model.recompile()

    x, _ = load_image(files / "astronaut.png", (3, 64, 64), (0.5,) * 3, (0.5,) * 3)
    stages = kept_patches(model, x)
    assert [s["before_block"] for s in stages] == [0, 1]
    assert [s["kept"].numel() for s in stages] == [16, 8]
    assert set(stages[1]["kept"].tolist()) <= set(stages[0]["kept"].tolist())
    assert second.at_inference is False and first.name == "token_drop"  # at_inference restored
    second.at_inference = True
    norms = _drop_input(model, second, x)[0, 1:].abs().sum(-1)
    local = torch.sort(torch.topk(norms, 8).indices).values
    assert stages[1]["kept"].tolist() == stages[0]["kept"][local].tolist()


def test_draw_darkens_dropped_patches(tmp_path):
    display = np.random.default_rng(0).uniform(size=(16, 24, 3))
    stages = [{"before_block": 0, "kept": torch.tensor([0, 5]), "num_patches": 6}]  # 2x3 grid of 8x8 patches
    (img0, title0), (img1, title1) = _panels(display, (2, 3), (8, 8), stages)
    assert (title0, title1) == ("all 6 patches", "before block 0: 2 of 6 patches")
    assert np.array_equal(img0, display)
    kept = np.zeros((16, 24), dtype=bool)
    kept[:8, :8] = kept[8:, 16:] = True  # grid positions 0 (row 0, col 0) and 5 (row 1, col 2)
    assert np.allclose(img1[kept], display[kept])
    assert np.allclose(img1[~kept], display[~kept] * DROPPED_BRIGHTNESS + (1 - DROPPED_BRIGHTNESS) * DROPPED_TINT)
    out = draw(display, [2, 3], [8, 8], stages, tmp_path / "d.png")
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["d.png"]  # no temp file left


def test_cli_writes_png(files, cli_inprocess):
    out = files / "kept.png"
    code, stdout, err = cli_inprocess("show", files / "m", files / "astronaut.png", "-o", out)
    assert code == 0, err
    assert stdout.strip() == f"wrote {out} (1 stage)"
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG" and img.width > img.height  # two panels side by side


def _one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("vitprune: error:"), err
    return lines[0]


def test_cli_missing_image(files, cli_inprocess):
    code, _, err = cli_inprocess("show", files / "m", files / "nope.png", "-o", files / "x.png")
    assert "no such image file" in _one_line_error(code, err)
    assert not (files / "x.png").exists()


def test_cli_unreadable_image(files, cli_inprocess):
    (files / "fake.png").write_bytes(b"not an image" * 10)
    code, _, err = cli_inprocess("show", files / "m", files / "fake.png", "-o", files / "y.png")
    assert "cannot read image" in _one_line_error(code, err)


def test_cli_model_without_token_ops(files, cli_inprocess):
    code, _, err = cli_inprocess("show", "timm:vit_small_patch16_224", *CLI_ARGS, files / "astronaut.png",
                                 "-o", files / "z.png")
    assert "no token ops to show: rewrite it first" in _one_line_error(code, err)


def test_cli_refuses_to_overwrite_the_image(files, cli_inprocess):
    image = files / "astronaut.png"
    before = image.read_bytes()
    for output in (image, files / "." / ".." / files.name / "astronaut.png"):
        code, _, err = cli_inprocess("show", files / "m", image, "-o", output)
        assert "is the input" in _one_line_error(code, err)
    assert image.read_bytes() == before


def test_draw_wraps_many_stages_into_rows(tmp_path):
    from vitprune.ship.show import PANELS_PER_ROW

    display = np.random.default_rng(0).uniform(size=(16, 24, 3))
    stages = [{"before_block": b, "kept": torch.arange(6 - b), "num_patches": 6} for b in range(5)]  # 6 panels
    with Image.open(draw(display, [2, 3], [8, 8], stages, tmp_path / "many.png")) as wrapped:
        wide, tall = wrapped.size
    with Image.open(draw(display, [2, 3], [8, 8], stages[:1], tmp_path / "two.png")) as one_row:
        two_wide, two_tall = one_row.size
    assert PANELS_PER_ROW == 4 and wide == 2 * two_wide  # 4 panels in a row where 2 were
    assert tall > 1.8 * two_tall  # a second row for panels 5 and 6, not ten in one row
