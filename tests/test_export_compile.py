"""ONNX export parity and torch.compile without recompilation, for every method."""

import json

import onnx
import pytest
import torch

import vitprune
from conftest import load_example
from vitprune.ship.export_onnx import export_onnx

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
METHODS = {
    "original": None,
    "token-drop-magnitude": ("token-drop", dict(keep_rate=0.5, at_inference=True, selection="magnitude")),
    "token-drop-random": ("token-drop", dict(keep_rate=0.5, at_inference=True)),
    "importance-mask": ("importance-mask", dict(keep="1:0.5,2:0.5")),
    "importance-mask-static": ("importance-mask", dict(keep="1:0.5,2:0.5", mode="static",
                                                       calibration=torch.randn(4, 3, 32, 32))),
    "lifespan-gather": ("lifespan-gather", dict(flops=0.7, after_block=1)),
}


def build(name):
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224", model_args=TINY)
    if METHODS[name] is None:
        return vitprune.capture(model)
    method, params = METHODS[name]
    return vitprune.rewrite(model, method, **params)[0]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_onnx_export_parity(name, tmp_path):
    model = build(name)
    report = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    if name == "token-drop-random":
        assert not report.parity_comparable and set(report.parity) == {1, 8}  # finite and shaped, not equal draws
    else:
        assert all(d <= 1e-4 for d in report.parity.values()), report.parity
    assert "GatherElements" not in report.op_types  # flat Gather on flattened indices
    assert report.nodes_after_optimize <= report.nodes_before_optimize
    if name != "original":
        assert report.op_types.get("Gather", 0) >= 1
    # static token counts survive: the shapes inferred inside the graph hold the kept count, not the original
    tokens = {d.dim_value for v in proto.graph.value_info for d in v.type.tensor_type.shape.dim[1:2]}
    if name.startswith("token-drop") or name.startswith("importance"):
        assert 1 + 8 in tokens  # 16 patches kept to 8 (+1 CLS)
    if name == "lifespan-gather":
        assert {1 + k for k in model.meta["vitprune"]["recipe"][0]["decisions"]["keep_counts"].values()} <= tokens


@pytest.mark.parametrize("name", ["token-drop-magnitude", "importance-mask", "importance-mask-static", "lifespan-gather"])
def test_compile_one_graph_for_every_batch_size(name):
    from torch._dynamo.utils import counters

    model = build(name).eval()
    torch._dynamo.reset()
    counters.clear()
    fast = vitprune.compile(model, fullgraph=True)  # inductor, no graph break (every method: test_device_dtype.py)
    with torch.no_grad():
        for b in (1, 2):  # warm-up: dynamo specialises batch 1, every other batch shares one graph
            fast(torch.randn(b, 3, 32, 32))
        graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
        for b in (1, 2, 7, 32):
            x = torch.randn(b, 3, 32, 32)
            torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs and counters["frames"]["ok"] == frames
    assert graphs <= 2
    # the caller's tensor is not marked dynamic: another compiled model given it would recompile
    assert not getattr(x, "_dynamo_dynamic_indices", None)


def test_export_and_bench_cli(cli_inprocess, tmp_path):
    model = build("importance-mask")
    vitprune.save(model, tmp_path / "im")
    vitprune.save(build("original"), tmp_path / "orig")
    code, out, err = cli_inprocess("export", tmp_path / "im", "-o", tmp_path / "im.onnx", "--json")
    assert code == 0, err
    assert json.loads(out)["parity"]["8"] <= 1e-4
    code, _, err = cli_inprocess("export", tmp_path / "im", "-o", tmp_path / "im.onnx")
    assert code == 1 and "exists" in err
    code, out, err = cli_inprocess("bench", tmp_path / "orig", tmp_path / "im", "--batch", "1,4",
                                   "--backend", "eager,onnxruntime", "--repeats", "2", "--json", "--quiet",
                                   "--plot", tmp_path / "p.png")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert len(rows) == 2 * 2 * 2  # models x backends x batches
    by = {(r["model"], r["backend"], r["batch"]): r for r in rows}
    im = by[(str(tmp_path / "im"), "eager", 4)]
    assert im["images_per_s"] > 0 and im["peak_memory_bytes"] > 0 and 0 <= im["token_op_share"] < 1
    assert by[(str(tmp_path / "im"), "onnxruntime", 1)]["latency_ms_p50"] > 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    code, _, err = cli_inprocess("bench", "timm:vit_small_patch16_224", "--backend", "tpu")
    assert code == 2 and "unknown backend" in err
    code, _, err = cli_inprocess("bench", "timm:vit_small_patch16_224", tmp_path / "im", "--batch", "2", "--quiet")
    assert code == 1 and "same input size" in err and len(err.strip().splitlines()) == 1


def test_bench_with_data_reports_accuracy(cli_inprocess, tmp_path):
    example = load_example("digits")
    example.write_image_folders(tmp_path / "d", max_train=10, max_val=40)
    torch.manual_seed(0)
    model = vitprune.load("timm:vit_small_patch16_224", model_args={**TINY, "num_classes": 10})
    vitprune.save(vitprune.capture(model), tmp_path / "orig")
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.25, at_inference=True)
    vitprune.save(rewritten, tmp_path / "td")
    code, out, err = cli_inprocess("bench", tmp_path / "orig", tmp_path / "td", "--batch", "4", "--repeats", "1",
                                   "--data", tmp_path / "d" / "val", "--json", "--quiet", "--plot", tmp_path / "p.png")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    expected = vitprune.evaluate(model, tmp_path / "d" / "val", seed=0)["rows"][0]["top1"]
    assert rows[0]["accuracy"] == expected and 0 <= rows[1]["accuracy"] <= 1
    assert (tmp_path / "p.png").is_file()
