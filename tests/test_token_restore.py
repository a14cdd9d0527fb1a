"""Token restore: dense readers (token-sequence outputs, grid heads, intermediate layers read by a DPT-style
head) get every token back in its grid position, dropped tokens with the features they had when dropped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitprune
from vitprune.errors import PassError
from vitprune.ops.modules import TokenModule, TokenRestore

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, CLASSES = 8, 5


def _vit(depth: int = 4) -> nn.Module:
    return vitprune.load("timm:vit_small_patch16_224", model_args=dict(
        img_size=32, patch_size=4, embed_dim=64, depth=depth, num_heads=2, num_classes=0, global_pool=""))


class Features(nn.Module):
    """``forward_features``: the token sequence ``[B, 1 + 64, C]`` is the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = _vit()

    def forward(self, x):
        return self.vit.forward_features(x)


class Segmenter(Features):
    """A linear segmentation head on the patch tokens, reshaped to the grid and upsampled to the pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x):
        logits = self.head(self.vit.forward_features(x)[:, 1:])  # [B, 64, K]
        grid = logits.transpose(1, 2).reshape(x.shape[0], CLASSES, GRID, GRID)
        return F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)


class MultiLayer(Features):
    """A DPT-style head: the patch tokens after blocks 1 and 3 (each through the final norm), as grids."""

    def forward(self, x):
        v = self.vit
        t = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        taps = []
        for i, blk in enumerate(v.blocks):
            t = blk(t)
            if i in (1, 3):
                taps.append(v.norm(t)[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, GRID, GRID))
        return taps[0] + taps[1]


MODELS = {"features": Features, "segmenter": Segmenter, "multi-layer": MultiLayer}
METHODS = {
    "token-drop": dict(keep_rate=0.5, at_inference=True, selection="magnitude"),
    "importance-mask": dict(keep={1: 0.6, 3: 0.5}),
    "importance-mask-static": dict(keep={1: 0.6, 3: 0.5}, mode="static"),
    "lifespan-gather": dict(flops=0.6, after_block=1),
}


def _rewrite(model, method, x):
    params = dict(METHODS[method])
    if method == "importance-mask-static":
        method, params["calibration"] = "importance-mask", torch.randn(4, 3, 32, 32)
    return vitprune.rewrite(model, method, example_input=x, **params)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_dense_models_rewrite_and_are_exact_with_every_token_kept(family, method):
    x = torch.randn(2, 3, 32, 32)
    model = MODELS[family]().eval()
    vit = vitprune.inspect_model(model, example_input=x)
    rewritten, report = _rewrite(model, method, x)
    # with every token kept, every node of the original graph has the same value in the rewritten one
    assert report.keep_all_nodes_compared > 50 and report.keep_all_worst_node_diff <= 1e-6
    assert report.keep_all_max_abs_diff <= 1e-6
    restore = report.decisions["token_restore"]
    assert restore["restored_before"] == (["readout"] if family != "multi-layer" else
                                          [r["node"] for r in vit.stream_readers] + ["readout"])
    with torch.no_grad():
        out, ref = rewritten(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert report.flops_ratio < 0.8  # the blocks run on fewer tokens
    restores = [m for m in rewritten.modules() if isinstance(m, TokenRestore)]
    assert len(restores) == len(restore["restored_before"])


def _by_hand(model: nn.Module, rewritten: nn.Module, x: torch.Tensor, taps: tuple[int, ...] = ()):
    """The original model's own blocks run on the tokens the rewritten model kept (read from its token modules'
    ``record_kept``, one pruning point per block input), with a canvas of every grid position's last features
    kept in a Python dict: the final stream ``[B, 1 + 64, C]`` with every token put back, and the same at ``taps``."""
    stages = [m for m in rewritten.modules() if isinstance(m, TokenModule)]
    block_of = {id(m): _stage_block(rewritten, m) for m in stages}
    for m in stages:
        m.record_kept = True
    with torch.no_grad():
        rewritten(x)
    v = model.vit
    t = v.norm_pre(v._pos_embed(v.patch_embed(x)))
    batch = x.shape[0]
    positions = [list(range(64)) for _ in range(batch)]
    last = [dict() for _ in range(batch)]  # grid position -> features when last seen

    def restored(t):
        out = t.clone()[:, :1].repeat(1, 65, 1)
        for b in range(batch):
            for pos, feat in last[b].items():
                out[b, 1 + pos] = feat
            for i, pos in enumerate(positions[b]):
                out[b, 1 + pos] = t[b, 1 + i]
        return out

    seen = []
    with torch.no_grad():
        for i, blk in enumerate(v.blocks):
            stage = [m for m in stages if block_of[id(m)] == i]
            for m in stage:
                for b in range(batch):
                    for j, pos in enumerate(positions[b]):
                        last[b][pos] = t[b, 1 + j].clone()
                kept = m.last_kept
                t = torch.cat([t[:, :1], torch.stack([t[b, 1:][kept[b]] for b in range(batch)])], dim=1)
                positions = [[positions[b][k] for k in kept[b].tolist()] for b in range(batch)]
            t = blk(t)
            if i in taps:
                seen.append(restored(t))
    return restored(t), seen


def _stage_block(rewritten: nn.Module, module: nn.Module) -> int:
    """The block a token module sits in front of (from the rewritten graph's analysis)."""
    for op in vitprune.inspect_model(rewritten, example_input=torch.randn(2, 3, 32, 32)).token_ops:
        if rewritten.get_submodule(op["node"]) is module:
            return op["before_block"]
    raise AssertionError("token module not in the graph")


@pytest.mark.parametrize("method", ["importance-mask", "lifespan-gather", "token-drop"])
def test_restored_tokens_match_dropping_them_by_hand_in_the_models_own_blocks(method):
    """Pruning points before blocks 1 and 3 (lifespan-gather: a sort and slices from block 1 on; token-drop:
    one drop before block 0): every kept token comes out as the model's own blocks compute it on the kept
    tokens, every dropped token with its features at the point that dropped it."""
    x = torch.randn(3, 3, 32, 32)
    model = Features().eval()
    rewritten, _ = _rewrite(model, method, x)
    stream, _ = _by_hand(model, rewritten, x)
    with torch.no_grad():
        out = rewritten(x)
        expected = model.vit.norm(stream)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, model(x), atol=1e-3)  # tokens were dropped: not the original output


def test_an_intermediate_layer_read_by_a_dense_head_gets_its_tokens_back():
    x = torch.randn(2, 3, 32, 32)
    model = MultiLayer().eval()
    rewritten, _ = _rewrite(model, "lifespan-gather", x)
    stream, (tap1, tap3) = _by_hand(model, rewritten, x, taps=(1, 3))
    grid = lambda t: model.vit.norm(t)[:, 1:].transpose(1, 2).reshape(2, -1, GRID, GRID)
    with torch.no_grad():
        assert torch.allclose(rewritten(x), grid(tap1) + grid(tap3), atol=1e-5)


@pytest.mark.parametrize("method,params", [
    ("token-drop", dict(keep_rate=0.5, at_inference=True, selection="magnitude")),
    ("importance-mask", dict(keep={1: 0.5, 3: 0.5})),  # the dense default score, distinct: round, arange, eye
])
def test_a_rewritten_dense_model_saves_loads_and_exports_to_onnx(tmp_path, method, params):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    x = torch.randn(2, 3, 32, 32)
    rewritten, report = vitprune.rewrite(Segmenter().eval(), method, example_input=x, **params)
    assert report.decisions.get("score", "distinct") == "distinct"
    vitprune.save(rewritten, tmp_path / "model")
    again = vitprune.load(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(again(x), rewritten(x))
    path = tmp_path / "seg.onnx"
    vitprune.export_onnx(rewritten, path, example_input=x)
    proto = onnx.load(str(path))
    scatters = [n for n in proto.graph.node if n.op_type == "ScatterElements"]
    assert scatters and all(a.s in (b"", b"none") for n in scatters for a in n.attribute if a.name == "reduction")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 32, 32)  # another batch size: the batch stays dynamic
    got = session.run(None, {session.get_inputs()[0].name: x5.numpy()})[0]
    with torch.no_grad():
        assert abs(got - rewritten(x5).numpy()).max() <= 1e-4


class ReadsInsideTheStream(Features):
    """Token 5 is added to every token between blocks 2 and 3: a position read *on* the stream."""

    def forward(self, x):
        v = self.vit
        t = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        for i, blk in enumerate(v.blocks):
            t = blk(t)
            if i == 2:
                t = t + 0.1 * t[:, 5:6].expand_as(t)
        return v.norm(t)[:, 0]


@pytest.mark.parametrize("method", ["token-drop", "importance-mask", "token-merge"])
def test_a_position_read_on_the_stream_is_refused_by_name(method):
    params = {"token-drop": dict(keep_rate=0.5, at_inference=True), "importance-mask": dict(keep={1: 0.5}),
              "token-merge": dict(r=4)}[method]
    with pytest.raises(PassError, match=r"node 'getitem_\d+' \(x\[:, 5:6\]\) indexes the token axis by position "
                                        r"inside block 2.*put back only on the residual stream") as info:
        vitprune.rewrite(ReadsInsideTheStream().eval(), method, example_input=torch.randn(2, 3, 32, 32), **params)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family,method", [("segmenter", m) for m in sorted(METHODS)] + [
    ("multi-layer", "importance-mask"), ("multi-layer", "lifespan-gather")])
def test_the_onnx_frontend_restores_tokens_as_the_fx_rewrite_does(tmp_path, family, method):
    """A dense model exported to ONNX, rewritten through the ONNX frontend (token restore lowered as a canvas
    of ScatterElements, no reduction; the DPT-style head's tap after block 1 gets its own copy, restored from
    the drops before it), computes its fx rewrite: same keep counts, same outputs."""
    ort = pytest.importorskip("onnxruntime")
    from vitprune.rewrite_onnx import rewrite_onnx

    x = torch.randn(2, 3, 32, 32)
    model = _distinct_norms(MODELS[family]().eval())
    path = tmp_path / "seg.onnx"
    vitprune.export_onnx(model, path, example_input=x)
    params = dict(METHODS[method])
    if method == "importance-mask-static":
        method, params["calibration"] = "importance-mask", [torch.randn(4, 3, 32, 32)]
    new, report = rewrite_onnx(path, method, **params)
    rewritten, fx_report = vitprune.rewrite(model, method, example_input=x, **params)
    assert report.keep_all_worst_node_diff <= 1e-5
    assert report.decisions["tokens_per_block"] == fx_report.decisions["tokens_per_block"]
    x5 = torch.randn(5, 3, 32, 32)  # another batch size: the batch stays dynamic
    session = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x5.numpy()})[0]
    with torch.no_grad():
        want = rewritten(x5)
        assert (want - model(x5)).abs().max() > 1e-3  # the probe: tokens were dropped and restored
    assert got.shape == tuple(want.shape) and abs(got - want.numpy()).max() <= 1e-4


def _distinct_norms(model: nn.Module) -> nn.Module:
    """LayerNorms with their own weights, as trained ones have: the exporter merges norms whose (default) weights
    are equal and that read the same tensor, such as the DPT-style head's norm and the next block's norm1."""
    torch.manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
    return model


def test_a_head_reading_a_blocks_own_norm_is_refused_in_onnx(tmp_path):
    """With default norms the exporter merges the head's tap norm into block 2's norm1: the head then reads an op
    inside a block, whose dropped tokens the canvas (residual-stream values) cannot give back. Refused by name."""
    from vitprune.rewrite_onnx import rewrite_onnx

    path = tmp_path / "taps.onnx"
    vitprune.export_onnx(MultiLayer().eval(), path, example_input=torch.randn(2, 3, 32, 32))
    with pytest.raises(PassError, match=r"node '\w+' \(x\[:, 1:\]\) reads '\w+', an op inside block 2 \(not the "
                                        r"residual stream\).*put back only on the residual stream") as info:
        rewrite_onnx(path, "importance-mask", keep={1: 0.6, 3: 0.5})
    assert "\n" not in str(info.value)


# --- restore rules: "nearest" (a dropped token takes its most similar kept token's final features) -----------

@pytest.mark.parametrize("method", ["token-drop", "importance-mask", "lifespan-gather"])
def test_the_nearest_restore_is_exact_with_every_token_kept(method):
    x = torch.randn(2, 3, 32, 32)
    model = Segmenter().eval()
    rewritten, report = vitprune.rewrite(model, method, example_input=x, restore="nearest", **METHODS[method])
    assert report.keep_all_nodes_compared > 50 and report.keep_all_worst_node_diff <= 1e-6
    assert report.keep_all_max_abs_diff <= 1e-6
    assert report.decisions["token_restore"]["restore"] == "nearest"
    assert [m.rule for m in rewritten.modules() if isinstance(m, TokenRestore)] == ["nearest"]


def test_nearest_gives_a_dropped_token_the_final_features_of_its_most_similar_kept_token():
    """token-drop before block 0: each dropped patch comes out as the final features (before the final norm) of
    the kept patch with the highest cosine similarity to it at the drop point, found here image by image."""
    x = torch.randn(2, 3, 32, 32)
    model = Features().eval()
    params = METHODS["token-drop"]
    rewritten, _ = vitprune.rewrite(model, "token-drop", example_input=x, restore="nearest", **params)
    stream, _ = _by_hand(model, rewritten, x)  # kept patches: their final features (and the record of which)
    (drop,) = [m for m in rewritten.modules() if isinstance(m, TokenModule)]
    v = model.vit
    with torch.no_grad():
        at_drop = v.norm_pre(v._pos_embed(v.patch_embed(x)))[:, 1:]  # [B, 64, C]
        expected = stream.clone()
        for b in range(x.shape[0]):
            kept = drop.last_kept[b].tolist()
            for p in sorted(set(range(64)) - set(kept)):
                cos = [float(F.cosine_similarity(at_drop[b, p], at_drop[b, q], dim=0)) for q in kept]
                expected[b, 1 + p] = stream[b, 1 + kept[cos.index(max(cos))]]
        out = rewritten(x)
        last, _ = vitprune.rewrite(model, "token-drop", example_input=x, **params)
        assert torch.allclose(out, v.norm(expected), atol=1e-5)
        assert not torch.allclose(out, last(x), atol=1e-3)  # not the "last features" rule


def test_a_nearest_rewrite_exports_to_onnx_and_the_onnx_frontend_lowers_it_the_same(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from vitprune.rewrite_onnx import rewrite_onnx

    x, x5 = torch.randn(2, 3, 32, 32), torch.randn(5, 3, 32, 32)
    model = _distinct_norms(Segmenter().eval())
    params = dict(keep={1: 0.5, 3: 0.5}, restore="nearest")
    rewritten, _ = vitprune.rewrite(model, "importance-mask", example_input=x, **params)
    exported, original = tmp_path / "rewritten.onnx", tmp_path / "seg.onnx"
    vitprune.export_onnx(rewritten, exported, example_input=x)
    vitprune.export_onnx(model, original, example_input=x)
    lowered, report = rewrite_onnx(original, "importance-mask", **params)
    assert report.keep_all_worst_node_diff <= 1e-5
    with torch.no_grad():
        want = rewritten(x5).numpy()
    for proto in (str(exported), lowered.SerializeToString()):
        session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x5.numpy()})[0]
        assert abs(got - want).max() <= 1e-4


def test_an_unknown_restore_rule_is_refused():
    with pytest.raises(PassError, match="unknown restore rule 'mean'; expected one of last, nearest"):
        vitprune.rewrite(Segmenter().eval(), "token-drop", example_input=torch.randn(2, 3, 32, 32), keep_rate=0.5,
                         restore="mean")
