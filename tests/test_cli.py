"""The command line: JSON outputs, and bad input -> one line on stderr, exit != 0, nothing written."""

import json

import pytest
import torch

from conftest import run_cli, small_model, write_model_files

SMALL = ["--model-arg", "img_size=32", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=64",
         "--model-arg", "depth=2", "--model-arg", "num_heads=2"]


def test_inspect_json(cli_inprocess):
    code, out, err = cli_inprocess("inspect", "timm:vit_small_patch16_224", *SMALL, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["num_blocks"], d["num_prefix_tokens"], d["num_patches"]) == (2, 1, 64)
    assert d["readout"]["kind"] == "token" and d["readout"]["token_indices"] == [0]
    assert [(b["heads"], b["dim"]) for b in d["blocks"]] == [(2, 64), (2, 64)]


def test_inspect_text(cli_inprocess):
    code, out, _ = cli_inprocess("inspect", "timm:deit_tiny_distilled_patch16_224", "--model-arg", "depth=1")
    assert code == 0
    assert "prefix tokens    2 (cls, distillation)" in out and "block  0  sdpa" in out


def test_rewrite_json_vit_small_224(cli_inprocess, tmp_path):
    out_dir = tmp_path / "vit_s_td"
    code, out, err = cli_inprocess("rewrite", "timm:vit_small_patch16_224", "--method", "token-drop",
                                   "--keep-rate", "0.5", "--at-inference", "-o", out_dir, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert 0.45 <= d["flops_after"] / d["flops_before"] <= 0.55
    assert d["keep_all_max_abs_diff"] <= 1e-5
    assert d["output"] == str(out_dir) and (out_dir / "graph.json").is_file()
    code, out, _ = cli_inprocess("inspect", out_dir, "--json")
    d = json.loads(out)
    assert d["recipe"][0]["pass"] == "token-drop" and d["blocks"][0]["tokens"] == 99


@pytest.fixture
def files(tmp_path):
    write_model_files(tmp_path, small_model("vit_cls"))
    return tmp_path


BAD = {
    "missing file": (["rewrite", "{d}/nope.pt", "-o", "{d}/out"], "no such file"),
    "corrupt file": (["rewrite", "{d}/corrupt.pt", "-o", "{d}/out"], "cannot read"),
    "truncated safetensors": (["rewrite", "{d}/truncated.safetensors", "--arch", "timm:vit_small_patch16_224",
                               *SMALL, "-o", "{d}/out"], "not a valid safetensors"),
    "weights without arch": (["rewrite", "{d}/weights.safetensors", "-o", "{d}/out"], "--arch"),
    "weights for another arch": (["rewrite", "{d}/state.pt", "--arch", "timm:vit_small_patch16_224",
                                  "-o", "{d}/out"], "do not match"),
    "non-ViT": (["rewrite", "timm:resnet18", "--input-size", "3,64,64", "-o", "{d}/out"], "not a ViT"),
    "Swin": (["inspect", "timm:swin_tiny_patch4_window7_224", "--model-arg", "depths=(1,1,1,1)"], "windowed"),
    "keep rate 0": (["rewrite", "{d}/pickled.pt", "--trust-pickle", "--keep-rate", "0", "-o", "{d}/out"], "(0, 1]"),
    "keep rate above 1": (["rewrite", "{d}/pickled.pt", "--trust-pickle", "--keep-rate", "1.5", "-o", "{d}/out"],
                          "(0, 1]"),
    "unknown method": (["rewrite", "{d}/pickled.pt", "--trust-pickle", "--method", "merge", "-o", "{d}/out"],
                       "'merge' is not"),
    "output equals input": (["rewrite", "{d}/pickled.pt", "--trust-pickle", "-o", "{d}/pickled.pt"], "is the input"),
    "pickle without consent": (["rewrite", "{d}/pickled.pt", "-o", "{d}/out"], "--trust-pickle"),
    "unknown timm arch": (["inspect", "timm:vit_does_not_exist"], "unknown timm architecture"),
    "bad model arg": (["inspect", "timm:vit_small_patch16_224", "--model-arg", "depth"], "KEY=VALUE"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, files, cli_inprocess):
    args, message = BAD[case]
    before = {p.name: p.read_bytes() for p in files.iterdir()}
    code, out, err = cli_inprocess(*[a.format(d=files) for a in args])
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vitprune: error: ") and message in lines[0]
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in files.iterdir()} == before  # nothing written, nothing changed


def test_bad_input_in_a_real_shell(files):
    """The installed entry point, in a subprocess: one line, exit 1, no traceback."""
    done = run_cli("rewrite", files / "pickled.pt", "-o", files / "out")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "unpickling runs code" in done.stderr
    assert not (files / "out").exists()


def test_version_names_the_stack_it_runs_with(cli_inprocess):
    import timm

    code, out, _ = cli_inprocess("--version")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["torch"] == torch.__version__.split("+")[0] or lines["torch"] == torch.__version__
    assert lines["timm"] == timm.__version__ and lines["vitprune"] and lines["onnxruntime"]
