"""A corpus of bad input (issue 10): one line on stderr, a non-zero exit, nothing written, no input changed.

The cases are data: ``(argv, expected substring of the error line)``, with ``{d}`` standing for a
workspace holding tiny models, images and data folders (built once). Each case runs in-process (the
``cli_inprocess`` fixture); the few that need a real interpreter (warnings printed by torch) run in a
subprocess. Before and after every case the whole workspace is listed and hashed: nothing may appear,
disappear or change. Also here: the attacks of issue 10 on outputs and class names, as tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitprune
from conftest import run_cli, write_model_files

ARCH = "timm:vit_small_patch16_224"
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=3)
SMALL = [a for k, v in TINY.items() for a in ("--model-arg", f"{k}={v}")]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _images(folder: Path, classes: list[str], per_class: int = 2, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace: models of every kind, pictures, data folders, and a user's files and folders."""
    d = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    base = vitprune.load(ARCH, model_args=TINY)
    write_model_files(d, base)
    rewritten, _ = vitprune.rewrite(base, "token-drop", keep_rate=0.5)
    vitprune.save(rewritten, d / "sm")  # a saved model (an input: never written into)
    _images(d / "data", ["a", "b", "c"])
    vitprune.finetune(vitprune.load(d / "sm"), d / "data", d / "ft", epochs=1, batch_size=4, device="cpu",
                      progress=False)  # records the class names a, b, c
    _images(d / "data_one", ["a"])
    _images(d / "data_renamed", ["x", "y", "z"])
    _images(d / "data_four", ["a", "b", "c", "d"])
    _images(d / "data_corrupt", ["a", "b"])
    (d / "data_corrupt" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "data_empty").mkdir()
    (d / "data_noimg" / "a").mkdir(parents=True)
    (d / "data_noimg" / "a" / "readme.txt").write_text("no images here")
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(d / "photo.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "existing.png").write_bytes(b"the user's picture")
    (d / "existing.txt").write_text("the user's notes")
    (d / "existing.onnx").write_bytes(b"the user's onnx")
    (d / "file.txt").write_text("a regular file: nothing can be created under it")
    (d / "userproj").mkdir()
    (d / "userproj" / "graph.json").write_text('{"nodes": []}')
    (d / "userproj" / "important.txt").write_text("precious")
    (d / "notamodel").mkdir()
    (d / "notamodel" / "readme.txt").write_text("hi")
    (d / "badjson").mkdir()
    (d / "badjson" / "graph.json").write_text("{not json")
    (d / "run").mkdir()
    (d / "run" / "notes.txt").write_text("a folder that is not a finetune run")
    (d / "dir.png").mkdir()
    torch.save(base, d / "legacy_pickled.pt", _use_new_zipfile_serialization=False, pickle_protocol=1)
    if not IS_ROOT:
        (d / "ro").mkdir()
        os.chmod(d / "ro", 0o500)
    return d


# (argv, expected substring of the one error line); {d} is the workspace.
CASES: list[tuple[list[str], str]] = [
    # usage: commands, options, values
    (["frobnicate"], "No such command"),
    (["rewrite"], "Missing argument"),
    (["rewrite", ARCH, *SMALL], "Missing option"),
    (["rewrite", ARCH, *SMALL, "--bogus", "-o", "{d}/o"], "No such option"),
    (["rewrite", ARCH, *SMALL, "--method", "merge", "-o", "{d}/o"], "'merge' is not"),
    (["rewrite", ARCH, *SMALL, "--keep-rate", "0", "-o", "{d}/o"], "(0, 1]"),
    (["rewrite", ARCH, *SMALL, "--keep-rate", "1.5", "-o", "{d}/o"], "(0, 1]"),
    (["rewrite", ARCH, *SMALL, "--keep-rate", "-1", "-o", "{d}/o"], "(0, 1]"),
    (["rewrite", ARCH, *SMALL, "--keep-rate", "abc", "-o", "{d}/o"], "not a valid float"),
    (["rewrite", ARCH, *SMALL, "--keep-rate", "nan", "-o", "{d}/o"], "(0, 1]"),
    (["rewrite", ARCH, *SMALL, "--method", "importance-mask", "--flops", "0", "-o", "{d}/o"], "(0, 1]"),
    (["rewrite", ARCH, *SMALL, "--method", "importance-mask", "--flops", "2", "-o", "{d}/o"], "(0, 1]"),
    (["rewrite", ARCH, *SMALL, "--method", "lifespan-gather", "--flops", "-0.5", "-o", "{d}/o"], "(0, 1]"),
    (["rewrite", ARCH, *SMALL, "--method", "importance-mask", "--keep-rate", "0.5", "-o", "{d}/o"],
     "does not apply"),
    (["rewrite", ARCH, *SMALL, "--method", "token-drop", "--flops", "0.5", "-o", "{d}/o"], "does not apply"),
    (["rewrite", ARCH, *SMALL, "--selection", "best", "-o", "{d}/o"], "'best' is not"),
    (["rewrite", ARCH, *SMALL, "--mode", "static", "--method", "importance-mask", "--keep", "1:0.5",
      "--calibration", "{d}/nowhere", "-o", "{d}/o"], "nowhere"),
    (["rewrite", ARCH, *SMALL, "--seed", "x", "-o", "{d}/o"], "not a valid integer"),
    (["inspect", ARCH, *SMALL, "--input-size", "3,32"], "C,H,W"),
    (["inspect", ARCH, *SMALL, "--input-size", "abc"], "C,H,W"),
    (["inspect", ARCH, *SMALL, "--input-size", "0,32,32"], "C,H,W"),
    (["inspect", ARCH, *SMALL, "--input-size", "3,-32,32"], "C,H,W"),
    (["inspect", ARCH, *SMALL, "--input-size", "3,33,33"], "input-size"),
    (["rewrite", ARCH, *SMALL, "--input-size", "3,33,33", "-o", "{d}/o"], "input-size"),
    (["show", "{d}/sm", "{d}/photo.png", "--input-size", "3,36,36", "-o", "{d}/k.png"], "input-size"),
    (["export", "{d}/sm", "--opset", "abc", "-o", "{d}/x.onnx"], "not a valid integer"),
    (["bench", "{d}/sm", "--batch", "0"], "positive integers"),
    (["bench", "{d}/sm", "--batch", "abc"], "positive integers"),
    (["bench", "{d}/sm", "--backend", "tensorrt"], "unknown backend"),
    (["bench", "{d}/sm", "--repeats", "0"], ">= 1"),
    (["bench", "{d}/sm", "--iters", "0"], ">= 1"),
    (["bench"], "Missing argument"),
    # model sources
    (["inspect", "{d}/nope.pt"], "no such file"),
    (["inspect", "{d}/corrupt.pt"], "cannot read"),
    (["inspect", "{d}/truncated.safetensors", "--arch", ARCH, *SMALL], "not a valid safetensors"),
    (["inspect", "{d}/weights.safetensors"], "--arch"),
    (["inspect", "{d}/state.pt"], "--arch"),
    (["inspect", "{d}/weights.safetensors", "--arch", "resnet18"], "timm:NAME"),
    (["inspect", "{d}/state.pt", "--arch", ARCH], "do not match"),
    (["inspect", ARCH, *SMALL, "--weights", "{d}/nope.safetensors"], "no such weights file"),
    (["inspect", ARCH, "--model-arg", "depth=1", "--weights", "{d}/weights.safetensors"], "do not match"),
    (["inspect", "{d}/pickled.pt"], "--trust-pickle"),
    (["inspect", "{d}/corrupt.png"], "cannot read"),
    (["inspect", "timm:vit_does_not_exist"], "unknown timm architecture"),
    (["inspect", "timm:"], "unknown timm architecture"),
    (["inspect", ARCH, "--model-arg", "depth"], "KEY=VALUE"),
    (["inspect", ARCH, "--model-arg", "=3"], "KEY=VALUE"),
    (["inspect", ARCH, "--model-arg", "1x=2"], "KEY=VALUE"),
    (["inspect", ARCH, *SMALL, "--model-arg", "img_size=-5"], "img_size=-5"),
    (["inspect", ARCH, *SMALL, "--model-arg", "img_size=abc"], "img_size='abc'"),
    (["inspect", ARCH, *SMALL, "--model-arg", "foo=1"], "foo"),
    (["inspect", ARCH, *SMALL, "--model-arg", "patch_size=0"], "patch_size=0"),
    (["inspect", ARCH, *SMALL, "--model-arg", "num_heads=3"], "num_heads=3"),
    (["inspect", ARCH, *SMALL, "--model-arg", "depth=x"], "depth='x'"),
    (["inspect", ARCH, *SMALL, "--model-arg", "embed_dim=1.5"], "embed_dim=1.5"),
    (["inspect", "{d}/notamodel"], "not a model saved by vitprune"),
    (["inspect", "{d}/badjson"], "not valid JSON"),
    (["inspect", "{d}/userproj"], "graph.json"),
    (["inspect", "{d}/data_empty"], "not a model saved by vitprune"),
    (["rewrite", "timm:resnet18", "--model-arg", "num_classes=3", "--input-size", "3,32,32", "-o", "{d}/o"],
     "not a ViT"),
    # outputs: rewrite
    (["rewrite", ARCH, *SMALL, "-o", "{d}/userproj", "--overwrite"], "not a model saved by vitprune"),
    (["rewrite", ARCH, *SMALL, "-o", "{d}/notamodel", "--overwrite"], "not a model saved by vitprune"),
    (["rewrite", ARCH, *SMALL, "-o", "{d}/sm"], "--overwrite"),
    (["rewrite", "{d}/sm", "-o", "{d}/sm", "--overwrite"], "is the input"),
    (["rewrite", "{d}/ft", "-o", "{d}/ft/model", "--overwrite"], "the input"),
    (["rewrite", "{d}/sm", "-o", "{d}/sm/inner"], "inside the input"),
    (["rewrite", ARCH, *SMALL, "-o", "{d}/existing.txt", "--overwrite"], "not a model saved by vitprune"),
    (["rewrite", ARCH, *SMALL, "-o", "{d}/existing.txt"], "--overwrite"),
    (["rewrite", ARCH, *SMALL, "-o", "{d}/nodir/o"], "does not exist"),
    (["rewrite", ARCH, *SMALL, "-o", "{d}/file.txt/o"], "does not exist"),
    (["rewrite", ARCH, *SMALL, "-o", "/proc/vitprune_o"], "cannot write"),
    (["rewrite", ARCH, *SMALL, "-o", "/sys/vitprune_o"], "cannot write"),
    (["rewrite", "{d}/pickled.pt", "--trust-pickle", "-o", "{d}/pickled.pt", "--overwrite"], "is the input"),
    (["rewrite", ARCH, *SMALL, "-o", "{d}/."], "exists"),
    (["rewrite", "{d}/ft", "-o", "{d}/ft/sub", "--overwrite"], "inside the input"),
    # outputs: export
    (["export", "{d}/sm", "-o", "{d}/sm/x.onnx"], "inside the input"),
    (["export", "{d}/sm", "-o", "{d}/sm/tensors.safetensors", "--overwrite"], "inside the input"),
    (["export", "{d}/sm", "-o", "{d}/existing.onnx"], "--overwrite"),
    (["export", "{d}/sm", "-o", "/proc/x.onnx"], "cannot write"),
    (["export", "{d}/sm", "-o", "/sys/x.onnx"], "cannot write"),
    (["export", "{d}/sm", "-o", "/proc/self/x.onnx"], "cannot write"),
    (["export", "{d}/sm", "-o", "{d}/file.txt/x.onnx"], "does not exist"),
    (["export", "{d}/sm", "-o", "{d}/dir.png", "--overwrite"], "directory"),
    (["export", "{d}/pickled.pt", "--trust-pickle", "-o", "{d}/pickled.pt", "--overwrite"], "is the input"),
    (["export", "{d}/sm", "-o", "{d}/ft/model/x.onnx"], "inside the model folder"),
    # outputs: show
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/sm/tensors.safetensors"], "picture format"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/sm/kept.png"], "inside the input"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/existing.png"], "--overwrite"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/existing.txt"], "picture format"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/existing.txt", "--overwrite"], "picture format"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/file.xyz"], "picture format"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/kept"], "picture format"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/photo.png", "--overwrite"], "is the input"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/dir.png", "--overwrite"], "directory"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "/proc/k.png"], "cannot write"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "/sys/k.png"], "cannot write"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/nodir/k.png"], "does not exist"),
    (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/file.txt/k.png"], "does not exist"),
    (["show", "{d}/sm", "{d}/nope.png", "-o", "{d}/k.png"], "no such image"),
    (["show", "{d}/sm", "{d}/corrupt.png", "-o", "{d}/k.png"], "cannot read image"),
    (["show", ARCH, *SMALL, "{d}/photo.png", "-o", "{d}/k.png"], "token"),
    (["show", "{d}/sm", "{d}/photo.png", "--mean", "1,2", "-o", "{d}/k.png"], "--mean"),
    (["show", "{d}/sm", "{d}/photo.png", "--std", "0,0,0", "-o", "{d}/k.png"], "--std"),
    (["show", "{d}/sm", "{d}/photo.png", "--mean", "a,b,c", "-o", "{d}/k.png"], "--mean"),
    # outputs: bench --plot
    (["bench", "{d}/sm", "--plot", "{d}/p.txt"], "PNG"),
    (["bench", "{d}/sm", "--plot", "{d}/existing.png"], "--overwrite"),
    (["bench", "{d}/sm", "--plot", "{d}/sm/p.png"], "inside the input"),
    (["bench", "{d}/sm", "--plot", "/proc/p.png"], "cannot write"),
    # outputs and data: finetune
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/sm"], "the input"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/sm/run"], "input"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/data/run"], "input"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/run"], "--overwrite"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/run", "--overwrite"], "not a vitprune finetune output"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/userproj", "--overwrite"], "not a vitprune"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "/proc/run"], "cannot write"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/file.txt/run"], "does not exist"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/fresh", "--resume"], "no checkpoint"),
    (["finetune", "{d}/sm", "--data", "{d}/data_one", "-o", "{d}/fresh"], "at least two"),
    (["finetune", "{d}/sm", "--data", "{d}/data_corrupt", "-o", "{d}/fresh", "--batch-size", "4"], "cannot read image"),
    (["finetune", "{d}/sm", "--data", "{d}/data_empty", "-o", "{d}/fresh"], "no class sub-folders"),
    (["finetune", "{d}/sm", "--data", "{d}/data_noimg", "-o", "{d}/fresh"], "has no images"),
    (["finetune", "{d}/sm", "--data", "{d}/nowhere", "-o", "{d}/fresh"], "no such folder"),
    (["finetune", "{d}/sm", "--data", "{d}/data_four", "-o", "{d}/fresh"], "4 classes"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--val", "{d}/data_renamed", "-o", "{d}/fresh"], "differ"),
    (["finetune", "{d}/ft", "--data", "{d}/data_renamed", "-o", "{d}/fresh"], "fine-tuned on"),
    (["finetune", "{d}/ft", "--data", "{d}/data", "--val", "{d}/data_four", "-o", "{d}/fresh"], "differ"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--epochs", "0", "-o", "{d}/fresh"], "--epochs"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--lr", "-1", "-o", "{d}/fresh"], "--lr"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--batch-size", "0", "-o", "{d}/fresh"], "--batch-size"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--label-smoothing", "1", "-o", "{d}/fresh"], "--label-smoothing"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--scale", "0,1", "-o", "{d}/fresh"], "--scale"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--scale", "1", "-o", "{d}/fresh"], "--scale"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--schedule", "zigzag", "-o", "{d}/fresh"], "'zigzag' is not"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--workers", "-1", "-o", "{d}/fresh"], "workers"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--device", "tpu9", "-o", "{d}/fresh"], "--device"),
    (["finetune", "{d}/sm", "--data", "{d}/data", "--teacher", "{d}/nope", "-o", "{d}/fresh"], "no such file"),
    (["finetune", ARCH, *SMALL, "--data", "{d}/data", "--schedule", "linear", "-o", "{d}/fresh"], "token-drop"),
    # data: eval
    (["eval", "{d}/ft", "--data", "{d}/data_renamed"], "fine-tuned on"),
    (["eval", "{d}/ft", "--data", "{d}/data_four"], "4 classes"),
    (["eval", "{d}/sm", "--data", "{d}/data_four"], "4 classes"),
    (["eval", "{d}/sm", "--data", "{d}/nowhere"], "no such folder"),
    (["eval", "{d}/sm", "--data", "{d}/data_empty"], "no class sub-folders"),
    (["eval", "{d}/sm", "--data", "{d}/data", "--batch-size", "0"], "--batch-size"),
    (["eval", "{d}/sm", "--data", "{d}/data", "--keep-rate", "0"], "(0, 1]"),
    (["eval", "{d}/sm", "--data", "{d}/data", "--keep-rate", "a,b"], "--keep-rate"),
    (["eval", ARCH, *SMALL, "--data", "{d}/data", "--keep-rate", "0.5"], "TokenDrop"),
    (["eval", "{d}/sm", "--data", "{d}/data", "--device", "nope"], "--device"),
]
if not IS_ROOT:  # as root a chmod'ed folder stays writable: file.txt/..., /proc and /sys cover that there
    CASES += [
        (["rewrite", ARCH, *SMALL, "-o", "{d}/ro/o"], "cannot write"),
        (["export", "{d}/sm", "-o", "{d}/ro/x.onnx"], "cannot write"),
        (["show", "{d}/sm", "{d}/photo.png", "-o", "{d}/ro/k.png"], "cannot write"),
        (["finetune", "{d}/sm", "--data", "{d}/data", "-o", "{d}/ro/run"], "cannot write"),
    ]

# Cases that need a real interpreter: torch prints warnings (pickle protocol) that pytest would capture.
SUBPROCESS_CASES: list[tuple[list[str], str]] = [
    (["inspect", "{d}/legacy_pickled.pt"], "{d}/legacy_pickled.pt"),
    (["rewrite", "{d}/legacy_pickled.pt", "-o", "{d}/o"], "{d}/legacy_pickled.pt"),
    (["inspect", ARCH, *SMALL, "--input-size", "3,33,33"], "input-size"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (files with a hash of their bytes, folders and links marked), and the mode of
    the workspace's own entries."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            p = Path(dirpath, name)
            found[str(p.relative_to(root))] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def _check_one_line(code, err: str, expected: str) -> None:
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr has {len(lines)} lines:\n{err}"
    assert lines[0].startswith("vitprune: error: "), lines[0]
    assert expected.lower() in lines[0].lower(), lines[0]


def _ids(cases):
    return [" ".join(argv).replace("{d}/", "")[:90] for argv, _ in cases]


@pytest.mark.parametrize("argv,expected", CASES, ids=_ids(CASES))
def test_bad_input_corpus(argv, expected, ws, cli_inprocess, monkeypatch):
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    code, _out, err = cli_inprocess(*[a.format(d=ws) for a in argv])
    _check_one_line(code, err, expected.format(d=ws))
    assert _snapshot(ws) == before  # nothing written, nothing removed, no input changed
    assert not Path("/proc/vitprune_o").exists() and not Path("/sys/vitprune_o").exists()


@pytest.mark.parametrize("argv,expected", SUBPROCESS_CASES, ids=_ids(SUBPROCESS_CASES))
def test_bad_input_corpus_in_a_real_shell(argv, expected, ws):
    before = _snapshot(ws)
    done = run_cli(*[a.format(d=ws) for a in argv], cwd=ws)
    _check_one_line(done.returncode, done.stderr, expected.format(d=ws))
    assert _snapshot(ws) == before


def test_the_corpus_is_large():
    assert len(CASES) + len(SUBPROCESS_CASES) >= 100


# ----- the attacks of issue 10, as they were tried -----

def _rewrite(cli_inprocess, out: Path, *extra: str):
    return cli_inprocess("rewrite", ARCH, *SMALL, "--keep-rate", "0.5", "-o", out, *extra)


def test_overwrite_keeps_a_users_folder_with_a_graph_json(tmp_path, cli_inprocess):
    user = tmp_path / "userproj"
    user.mkdir()
    (user / "graph.json").write_text("{}")
    (user / "important.txt").write_text("precious")
    code, _, err = _rewrite(cli_inprocess, user, "--overwrite")
    assert code == 1 and "not a model saved by vitprune" in err
    assert (user / "important.txt").read_text() == "precious" and (user / "graph.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userproj"]  # no temporary left either


def test_overwrite_replaces_a_saved_model_but_not_a_file_added_to_it(tmp_path, cli_inprocess):
    out = tmp_path / "m"
    assert _rewrite(cli_inprocess, out)[0] == 0
    marker = json.loads((out / "vitprune.json").read_text())
    assert marker["format"] == "vitprune-model"
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir())
    assert _rewrite(cli_inprocess, out, "--overwrite")[0] == 0  # ours: replaced
    (out / "notes.txt").write_text("mine")
    code, _, err = _rewrite(cli_inprocess, out, "--overwrite")
    assert code == 1 and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


def test_show_never_writes_into_a_model_or_over_a_file(tmp_path, cli_inprocess):
    model = tmp_path / "sm"
    assert _rewrite(cli_inprocess, model)[0] == 0
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    weights = (model / "tensors.safetensors").read_bytes()
    for target in ("sm/tensors.safetensors", "sm/kept.png"):
        code, _, err = cli_inprocess("show", model, tmp_path / "photo.png", "-o", tmp_path / target, "--overwrite")
        assert code != 0 and len(err.strip().splitlines()) == 1
    assert (model / "tensors.safetensors").read_bytes() == weights
    vitprune.load(model)  # still loads
    (tmp_path / "existing.png").write_bytes(b"mine")
    code, _, err = cli_inprocess("show", model, tmp_path / "photo.png", "-o", tmp_path / "existing.png")
    assert code == 1 and "--overwrite" in err and (tmp_path / "existing.png").read_bytes() == b"mine"
    code, _, _ = cli_inprocess("show", model, tmp_path / "photo.png", "-o", tmp_path / "existing.png", "--overwrite")
    assert code == 0 and (tmp_path / "existing.png").read_bytes().startswith(b"\x89PNG")
    code, _, err = cli_inprocess("show", model, tmp_path / "photo.png", "-o", tmp_path / "kept.xyz")
    assert code == 2 and "picture format" in err and not (tmp_path / "kept.xyz").exists()
    code, _, _ = cli_inprocess("show", model, tmp_path / "photo.png", "-o", tmp_path / "kept.svg")
    assert code == 0 and b"<svg" in (tmp_path / "kept.svg").read_bytes()[:400]


def test_a_killed_saves_temporary_folder_is_cleaned_on_the_next_save(tmp_path, cli_inprocess):
    out = tmp_path / "m"
    assert _rewrite(cli_inprocess, out)[0] == 0
    # what a save killed half way leaves: a hidden copy next to the destination (a pid that is gone, or none)
    for stale in (".m.tmp-999999999-abcd", ".m.tmp-k3j2h1", ".m.old-999999999"):
        shutil.copytree(out, tmp_path / stale)
    (tmp_path / ".other.tmp-999999999-x").mkdir()  # another destination's: not ours to clean
    assert _rewrite(cli_inprocess, out, "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-999999999-x", "m"]


def test_a_failed_save_leaves_no_temporary(tmp_path, monkeypatch):
    import importlib

    save_module = importlib.import_module("vitprune.io.save")

    model, _ = vitprune.rewrite(vitprune.load(ARCH, model_args=TINY), "token-drop", keep_rate=0.5)

    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save_module, "save_graph_module", broken)
    with pytest.raises(vitprune.VitpruneError, match="No space left"):
        vitprune.save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_eval_maps_classes_by_name_and_refuses_unknown_ones(tmp_path, cli_inprocess):
    model = tmp_path / "sm"
    assert _rewrite(cli_inprocess, model)[0] == 0
    _images(tmp_path / "train", ["1", "2", "5"], per_class=3)
    ft = vitprune.finetune(vitprune.load(model), tmp_path / "train", tmp_path / "ft", epochs=1, batch_size=4,
                           device="cpu", progress=False)
    assert vitprune.load(tmp_path / "ft").meta["vitprune"]["classes"] == ["1", "2", "5"]
    full = vitprune.evaluate(ft.model, tmp_path / "train", progress=False)["rows"][0]["top1"]
    # a folder holding only class 5: scored as class 5 (index 2), not as index 0
    (tmp_path / "only5").mkdir()
    shutil.copytree(tmp_path / "train" / "5", tmp_path / "only5" / "5")
    logits = vitprune.evaluate(ft.model, tmp_path / "only5", progress=False)
    with torch.no_grad():
        from vitprune.train.data import eval_transform, image_folder

        ds = image_folder(tmp_path / "only5", eval_transform((3, 32, 32)))
        preds = ft.model.eval()(torch.stack([ds[i][0] for i in range(len(ds))])).argmax(1)
    assert logits["rows"][0]["top1"] == pytest.approx(float((preds == 2).float().mean()))
    assert 0 <= full <= 1
    (tmp_path / "renamed").mkdir()
    for a, b in (("1", "one"), ("2", "two"), ("5", "five")):
        shutil.copytree(tmp_path / "train" / a, tmp_path / "renamed" / b)
    code, _, err = cli_inprocess("eval", tmp_path / "ft", "--data", tmp_path / "renamed")
    assert code == 1 and "fine-tuned on" in err and len(err.strip().splitlines()) == 1


def test_finetune_on_one_class_or_a_corrupt_image_writes_nothing(tmp_path, cli_inprocess):
    model = tmp_path / "sm"
    assert _rewrite(cli_inprocess, model)[0] == 0
    _images(tmp_path / "one", ["a"])
    _images(tmp_path / "bad", ["a", "b"])
    (tmp_path / "bad" / "b" / "0.png").write_bytes(b"garbage")
    for data, message in (("one", "at least two"), ("bad", "cannot read image")):
        code, _, err = cli_inprocess("finetune", model, "--data", tmp_path / data, "--epochs", "1", "--batch-size",
                                     "2", "-o", tmp_path / "run", "--quiet")
        assert code == 1 and message in err, err
        assert not (tmp_path / "run").exists()


def test_bare_vitprune_prints_help_and_the_help_teaches(cli_inprocess):
    code, out, err = cli_inprocess()
    assert code == 0 and "Usage: vitprune" in out and not err
    assert out.count("vitprune rewrite") + out.count("vitprune inspect") + out.count("vitprune show") >= 3
    code, out, _ = cli_inprocess("rewrite", "--help")
    assert code == 0
    for form in ("timm:NAME", "--arch", "--trust-pickle", "folder"):
        assert form in out
    flops = " ".join(out.split("--flops", 1)[1].split("--mode")[0].split())
    assert "importance-mask" in flops and "lifespan-gather" in flops
    code, out, _ = cli_inprocess("finetune", "--help")
    keep_end = " ".join(out.split("--keep-end", 1)[1].split("--cooldown-epochs")[0].split())
    assert "default: 0.0" in keep_end and "[bucket, 1]" in keep_end
