"""The old corpus's unverified cases (issue 25): a SIGKILL while ``rewrite`` / ``export`` / ``finetune`` write
their output, ``--input-size`` that the patch does not divide on every command that takes it, and ``eval``
on a folder holding only some of the classes a model was fine-tuned on.

The kill is deterministic: the CLI runs in a subprocess whose ``os.replace`` / ``os.rename`` pause when
they would move a vitprune temporary (``*.tmp-PID-*``) into place, so the kill lands after the temporary
is written and before the output exists. Then: no output at the final path, the temporary is there (the
kill was mid-write), and the next run (in-process) succeeds and leaves no temporary behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitprune
from test_bad_input import _check_one_line, _snapshot

ARCH = "timm:vit_small_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
SMALL = [a for k, v in TINY.items() for a in ("--model-arg", f"{k}={v}")]

# os.replace / os.rename of a vitprune temporary whose name starts with WHICH: announce it in FLAG, then wait
# to be killed
PAUSING_CLI = """
import os, sys, time
flag, which, args = sys.argv[1], sys.argv[2], sys.argv[3:]
def pausing(real):
    def move(src, dst, *a, **k):
        name = os.path.basename(os.fspath(src))
        if ".tmp-" in name and name.startswith(which):
            with open(flag, "w") as f:
                f.write(os.fspath(src))
            time.sleep(600)
        return real(src, dst, *a, **k)
    return move
os.replace, os.rename = pausing(os.replace), pausing(os.rename)
from vitprune.cli.main import main
main(args)
"""


def _images(folder: Path, classes: str, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A saved token-drop model (1 block, width 32, 16 patches), images of classes a, b, c, and a fine-tune of
    the model on them (it records the classes)."""
    d = tmp_path_factory.mktemp("interrupted")
    torch.manual_seed(0)
    rewritten, _ = vitprune.rewrite(vitprune.load(ARCH, model_args=TINY), "token-drop", keep_rate=0.5)
    vitprune.save(rewritten, d / "sm")
    _images(d / "data", "abc")
    vitprune.finetune(vitprune.load(d / "sm"), d / "data", d / "ft", epochs=1, batch_size=9, lr=1e-2,
                      device="cpu", progress=False)
    (d / "script.py").write_text(textwrap.dedent(PAUSING_CLI))
    return d


def _kill_mid_write(ws: Path, flag: Path, which: str, *argv) -> Path:
    """Run the CLI until it is about to move its temporary named ``which*`` into place, SIGKILL it; returns the
    temporary."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    proc = subprocess.Popen([sys.executable, ws / "script.py", flag, which, *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the command ended before writing: " + proc.stderr.read().decode()[-2000:]
    time.sleep(0.05)  # the flag is written before the pause: let it be one
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return Path(flag.read_text())


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp-*"))


@pytest.mark.parametrize("command", ["rewrite", "export"])
def test_sigkill_mid_write_leaves_no_output_and_the_next_run_cleans_up(command, ws, tmp_path, cli_inprocess):
    out = tmp_path / ("o" if command == "rewrite" else "o.onnx")
    argv = ["rewrite", ARCH, *SMALL, "--keep-rate", "0.5", "-o", out] if command == "rewrite" else \
        ["export", ws / "sm", "-o", out]
    before = _snapshot(ws)
    temp = _kill_mid_write(ws, tmp_path / "flag", f".{out.name}.tmp-", *argv)
    assert not out.exists() and temp.parent == tmp_path and temp.exists()  # killed mid-write: temp, no output
    assert _temporaries(tmp_path) == [temp.name]
    code, _, err = cli_inprocess(*argv)
    assert code == 0, err
    assert _temporaries(tmp_path) == []  # the killed run's temporary is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["flag", out.name])
    vitprune.load(out)  # a whole model
    assert _snapshot(ws) == before  # the input was not touched


def test_sigkill_mid_checkpoint_then_resume_is_bit_exact(ws, tmp_path, cli_inprocess, one_thread):
    """``finetune`` killed while moving epoch 2's checkpoint into place: ``--resume`` runs epoch 2 again from
    epoch 1's checkpoint, removes the half-written one, and ends with the weights of an uninterrupted run (both
    on one thread: the subprocess and this process sum in the same order)."""
    common = ["finetune", ws / "sm", "--data", ws / "data", "--epochs", "3", "--batch-size", "9", "--lr", "1e-2",
              "--quiet", "--device", "cpu"]
    code, _, err = cli_inprocess(*common, "-o", tmp_path / "full")
    assert code == 0, err
    part = tmp_path / "part"
    temp = _kill_mid_write(ws, tmp_path / "flag", ".epoch-0002.tmp-", *common, "-o", part)
    assert temp.parent == part / "checkpoints" and temp.exists() and not (part / "model").exists()
    assert sorted(p.name for p in temp.parent.iterdir()) == sorted(["epoch-0001", temp.name])
    code, _, err = cli_inprocess(*common, "-o", part, "--resume")
    assert code == 0, err
    assert _temporaries(part) == []  # the killed run's half checkpoint is gone
    full, resumed = (load_file(str(p / "model" / "tensors.safetensors")) for p in (tmp_path / "full", part))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    start = load_file(str(ws / "sm" / "tensors.safetensors"))
    assert any(not torch.equal(full[k], start[k]) for k in start)  # it did train


# ----- --input-size the patch does not divide, on every command that takes it --------------------------------


@pytest.mark.parametrize("argv", [
    ["eval", "{d}/sm", "--data", "{d}/data"],
    ["finetune", "{d}/sm", "--data", "{d}/data", "--epochs", "1", "-o", "{d}/run"],
    ["export", "{d}/sm", "-o", "{d}/x.onnx"],
    ["bench", "{d}/sm", "--batch", "1", "--iters", "1", "--repeats", "1"],
], ids=lambda a: a[0])
def test_input_size_the_patch_does_not_divide_is_one_line(argv, ws, cli_inprocess):
    """``--input-size 3,33,33`` for a 32x32 model with 8x8 patches (inspect, rewrite and show: tests/test_bad_input.py):
    eval raised the patch embedding's AssertionError, finetune ignored the option, export blamed the exporter."""
    before = _snapshot(ws)
    code, _, err = cli_inprocess(*[str(a).format(d=ws) for a in argv], "--input-size", "3,33,33")
    _check_one_line(code, err, "33, 33]")
    assert _snapshot(ws) == before


# ----- eval on some of the classes ---------------------------------------------------------------------------


def _eval_sums(cli_inprocess, model: Path, folder: Path) -> np.ndarray:
    """(loss sum, top-1 hits, images) of ``vitprune eval MODEL --data FOLDER``."""
    code, out, err = cli_inprocess("eval", model, "--data", folder, "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    return np.array([row["loss"] * row["images"], row["top1"] * row["images"], row["images"]])


def test_eval_on_a_class_subset_scores_each_image_as_its_class(ws, tmp_path, cli_inprocess):
    """A folder with only some of the classes the model was fine-tuned on (a, b, c): the per-image losses and
    hits of folder {a} and folder {b, c} add up to those of the whole folder only if b and c are scored as
    classes 1 and 2, not renumbered 0 and 1. The same model without its recorded class names shows it could
    fail: {b, c} then reads as classes 0 and 1 and the sums differ."""
    for name in ("a", "bc"):
        for c in name:
            shutil.copytree(ws / "data" / c, tmp_path / name / c)
    whole = _eval_sums(cli_inprocess, ws / "ft", ws / "data")
    parts = _eval_sums(cli_inprocess, ws / "ft", tmp_path / "a") + _eval_sums(cli_inprocess, ws / "ft", tmp_path / "bc")
    assert parts == pytest.approx(whole, rel=1e-5)
    shutil.copytree(ws / "ft" / "model", tmp_path / "nameless")
    doc = json.loads((tmp_path / "nameless" / "graph.json").read_text())
    del doc["metadata"]["classes"]
    (tmp_path / "nameless" / "graph.json").write_text(json.dumps(doc))
    renumbered = _eval_sums(cli_inprocess, tmp_path / "nameless", tmp_path / "bc")
    assert renumbered[0] != pytest.approx(_eval_sums(cli_inprocess, ws / "ft", tmp_path / "bc")[0], rel=1e-3)


def test_only_a_dead_processs_own_temporaries_are_removed(tmp_path):
    """What the next write removes (:func:`vitprune.io.outputs.clean_stale_temporaries`): a dead process's
    temporary file and its ONNX external-data staging folder; never a live process's, a folder holding anything
    a save does not write, a link, or a file without a PID."""
    from vitprune.io.outputs import clean_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    alive = str(os.getppid())  # this process's parent: alive (this process's own PID counts as done)
    dest = tmp_path / "m.onnx"
    (tmp_path / f".m.onnx.tmp-{dead}-a1.tmp").write_bytes(b"half a graph")
    (tmp_path / f".m.onnx.tmp-{dead}-b2").mkdir()
    for name in ("m.onnx", "m.onnx.data"):
        (tmp_path / f".m.onnx.tmp-{dead}-b2" / name).write_bytes(b"staged")
    kept = [f".m.onnx.tmp-{alive}-c3.tmp", ".m.onnx.tmp-d4.tmp", f".m.onnx.tmp-{dead}-e5", f".m.onnx.tmp-{dead}-f6"]
    (tmp_path / kept[0]).write_bytes(b"another process is writing this")
    (tmp_path / kept[1]).write_bytes(b"no PID: not a name vitprune gives a file")
    (tmp_path / kept[2]).mkdir()
    (tmp_path / kept[2] / "thesis.txt").write_text("years of work")
    os.symlink(tmp_path / kept[2] / "thesis.txt", tmp_path / kept[3])
    removed = clean_stale_temporaries(dest)
    assert sorted(p.name for p in removed) == [f".m.onnx.tmp-{dead}-a1.tmp", f".m.onnx.tmp-{dead}-b2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert (tmp_path / kept[2] / "thesis.txt").read_text() == "years of work"
