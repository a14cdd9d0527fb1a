"""The README's "Command line" block runs as written, top to bottom, in one fresh folder.

Every line of the ```bash block after "## Command line" is run in order in one empty temporary folder
(``vitprune`` lines in-process, ``python`` lines in a subprocess) and must exit 0. To run in about a
few minutes on 2 CPU cores the test makes a few small, explicit substitutions (:data:`SUBSTITUTIONS`): the
224x224 ViT-S becomes the same architecture at 32x32 with 6 narrow blocks, 10 epochs become 1, the
bench times fewer rounds, eager only; the script path points into this repository. The block
uses three files a reader brings along and the block itself does not make; the test makes them first
(:func:`_users_files`):
``my_vit.pt`` (a pickled whole-module ViT, 10 blocks so ``--keep 3:..,6:..,9:..`` applies),
``weights.safetensors`` (weights of the 10-class architecture the block names), ``photo.png`` and
``their_vit.onnx`` (the 10-block ViT exported by the TorchScript exporter, as third-party ONNX files are).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import vitprune

REPO = Path(__file__).resolve().parent.parent
ARCH = "timm:vit_small_patch16_224"
SMALL_ARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2)
SMALL = " ".join(f"--model-arg {k}={v}" for k, v in SMALL_ARGS.items())

#: (README text, what the test runs instead): small models, short runs; nothing else changes.
SUBSTITUTIONS = [
    (ARCH, f"{ARCH} {SMALL}"),
    ("--epochs 10", "--epochs 1"),
    ("--batch 1,32", "--batch 1,4 --repeats 1 --iters 1"),
    # compiling and exporting the three models take minutes on 2 CPU cores (the export line above, and
    # tests/test_export_compile.py, cover those backends)
    ("--backend eager,compile,onnxruntime", "--backend eager"),
    ("-o schedule.json", "--budget 6 -o schedule.json"),  # the search scores 6 rewrites instead of 48
    ("python examples/digits.py", f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'examples' / 'digits.py'))}"),
]


def readme_commands() -> list[str]:
    """The command lines of the README's "Command line" bash block, as written (comments kept)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Command line\n+```bash\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no ```bash block after '## Command line'"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _users_files(folder: Path) -> None:
    """What the block expects a reader to have: a pickled model, a weights file, a photo, an ONNX file."""
    torch.manual_seed(0)
    torch.save(vitprune.load(ARCH, model_args={**SMALL_ARGS, "depth": 10}), folder / "my_vit.pt")
    weights = vitprune.load(ARCH, model_args={**SMALL_ARGS, "num_classes": 10}).state_dict()
    save_file(weights, str(folder / "weights.safetensors"))
    onnx_model = vitprune.load(ARCH, model_args={**SMALL_ARGS, "depth": 10}).eval()
    with torch.no_grad():
        torch.onnx.export(onnx_model, (torch.randn(2, 3, 32, 32),), str(folder / "their_vit.onnx"), dynamo=False,
                          opset_version=17, input_names=["pixel_values"],
                          dynamic_axes={"pixel_values": {0: "batch"}})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "photo.png")


def test_the_block_is_what_this_test_expects():
    lines = readme_commands()
    assert len(lines) >= 15
    assert all(line.startswith(("vitprune ", "python ")) for line in lines), lines
    for old, _ in SUBSTITUTIONS:
        assert any(old in line for line in lines), f"{old!r} is no longer in the README block"


def test_readme_command_line_block_runs_top_to_bottom(tmp_path, monkeypatch, cli_inprocess):
    monkeypatch.chdir(tmp_path)
    _users_files(tmp_path)
    for line in readme_commands():
        for old, new in SUBSTITUTIONS:
            line = line.replace(old, new)
        argv = shlex.split(line, comments=True)
        if argv[0] == "vitprune":
            code, _, err = cli_inprocess(*argv[1:])
        else:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            code, err = done.returncode, done.stderr
        assert code == 0, f"{line}\nexit {code}\n{err[-2000:]}"
    for made in ("vit_s_td", "vs_im", "my_ps", "vit_s_td_ft/model", "vit_s_pss/model", "my_searched"):
        assert (tmp_path / made / "vitprune.json").is_file(), made
    assert (tmp_path / "kept.png").is_file() and (tmp_path / "vs_im.onnx").is_file()
    assert (tmp_path / "their_vit_im.onnx").is_file()
