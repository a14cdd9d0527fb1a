"""Saved models reload (also in a fresh process) with identical outputs; outputs are written safely."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitprune
from conftest import small_model
from vitprune.errors import SaveError


def _outputs(model, x):
    outs = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(123)
            outs[mode] = model(x)
    return outs


def test_round_trip_in_a_fresh_process(tmp_path):
    model = vitprune.load("timm:vit_small_patch16_224",
                          model_args=dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                          drop_rate=0.1, drop_path_rate=0.1))
    x = torch.randn(2, 3, 32, 32)
    rewritten, report = vitprune.rewrite(model, "token-drop", keep_rate=0.5, example_input=x)
    vitprune.save(rewritten, tmp_path / "td", report=report.to_dict())
    expected = _outputs(rewritten, x)
    save_file({"x": x, **expected}, str(tmp_path / "expected.safetensors"))
    child = f"""
import torch, vitprune
from safetensors.torch import load_file
e = load_file({str(tmp_path / 'expected.safetensors')!r})
m = vitprune.load({str(tmp_path / 'td')!r})
for mode in ("eval", "train"):
    m.train(mode == "train")
    with torch.no_grad():
        torch.manual_seed(123)
        assert torch.equal(m(e["x"]), e[mode]), mode
print("identical")
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "identical" in done.stdout
    assert not torch.equal(expected["eval"], expected["train"])  # train mode really drops tokens
    meta = json.loads((tmp_path / "td" / "graph.json").read_text())["metadata"]
    assert meta["recipe"][0]["pass"] == "token-drop" and meta["recipe"][0]["decisions"]["keep_count"] == 32
    assert meta["source"]["arch"] == "timm:vit_small_patch16_224"


def test_saved_model_keeps_its_recipe_and_can_be_inspected(tmp_path):
    model = small_model("registers")
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.25, at_inference=True)
    vitprune.save(rewritten, tmp_path / "m")
    again = vitprune.load(tmp_path / "m")
    vit = vitprune.inspect_model(again)  # input size comes from the recipe
    assert vit.num_prefix_tokens == 5 and vit.token_ops[0]["config"]["keep_count"] == 4
    assert again.meta["vitprune"]["recipe"][0]["params"]["keep_rate"] == 0.25


def test_existing_output_is_not_replaced(tmp_path):
    model = small_model("vit_cls")
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.5)
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(SaveError, match="exists"):
        vitprune.save(rewritten, target)
    with pytest.raises(SaveError, match="not a model saved by vitprune"):
        vitprune.save(rewritten, target, overwrite=True)
    assert (target / "precious.txt").read_text() == "keep me"
    saved = tmp_path / "saved"
    vitprune.save(rewritten, saved)
    first = load_file(str(saved / "tensors.safetensors"))
    with torch.no_grad():
        next(rewritten.parameters()).add_(1.0)
    vitprune.save(rewritten, saved, overwrite=True)
    second = load_file(str(saved / "tensors.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "saved"]  # no temporary folders left
