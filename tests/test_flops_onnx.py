"""FLOPs of ONNX graphs (vitprune.graph.flops_onnx) count what torch.utils.flop_counter counts on the torch
model they were exported from: single ops against hand-computed numbers and torch's own formulas, timm
exports of three exporters/opsets, and graphs onnxruntime's transformer optimizer fused."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.utils import flop_counter as fc

from vitprune.graph.flops import count_flops
from vitprune.graph.flops_onnx import count_onnx_flops, onnx_flops_by_op

# ---------------------------------------------------------------------------------------------
# helpers


def run_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in one onnxruntime run: each node output exposed as a graph output.

    (Not ``onnx.shape_inference``: it knows no com.microsoft op, so the fused graphs would lose shapes.)
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    declared = {o.name for o in exposed.graph.output}
    names = [name for node in exposed.graph.node for name in node.output if name and name not in declared]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    options.log_severity_level = 3
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    shapes = {name: value.shape for name, value in zip(outputs, session.run(outputs, feeds))}
    shapes.update({name: value.shape for name, value in feeds.items()})
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes


def onnx_flops(model: onnx.ModelProto, x: torch.Tensor) -> int:
    return count_onnx_flops(model, run_shapes(model, {model.graph.input[0].name: x.numpy()}))


def one_node(op_type: str, inputs: dict[str, tuple[int, ...]], output: tuple[int, ...], domain: str = "",
             **attrs) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """A one-node model (``""`` skips an optional input) and its shape map, written by hand."""
    node = helper.make_node(op_type, list(inputs), ["y"], name="the_node", domain=domain, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                                            for name, shape in inputs.items() if name],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output)])
    # opset 23 (Attention) at its IR version 11: onnx 1.23's defaults (IR 14) are newer than onnxruntime 1.30 reads
    model = helper.make_model(graph, ir_version=11, opset_imports=[helper.make_opsetid("", 23)])
    return model, {**{name: shape for name, shape in inputs.items() if name}, "y": output}


def torch_flops(fn, *args) -> int:
    counter = fc.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def quiet():
    """The exporters and the optimizer print progress and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export(model: nn.Module | torch.export.ExportedProgram, x: torch.Tensor, path, dynamo: bool,
           opset: int) -> onnx.ModelProto:
    """``model`` exported at ``path`` with a dynamic batch (as users export; a static batch also lets
    onnxruntime's basic optimisations turn MatMul+Add into Reshape/Gemm/Reshape, which no attention fusion
    then matches). The dynamo exporter takes ``model`` already captured by ``torch.export`` (one capture
    serves both opsets: the translation is what differs)."""
    with quiet(), torch.no_grad():
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["x"])
            program.save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(str(path))


def optimize(path, **fusion) -> onnx.ModelProto:
    """onnxruntime's transformer optimizer as a user runs it on a ViT (``fusion``: FusionOptions fields)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    for name, value in fusion.items():
        setattr(options, name, value)
    with quiet():
        return optimize_model(str(path), model_type="vit", num_heads=4, hidden_size=64,
                              optimization_options=options).model


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter((node.domain or "", node.op_type) for node in model.graph.node)


# ---------------------------------------------------------------------------------------------
# single ops


def test_matmul_broadcasts_batch_dims():
    model, shapes = one_node("MatMul", {"a": (2, 1, 3, 5), "b": (4, 5, 6)}, (2, 4, 3, 6))
    assert count_onnx_flops(model, shapes) == 2 * (2 * 4) * 3 * 5 * 6
    assert onnx_flops_by_op(model, shapes) == {"MatMul": 1440}


@pytest.mark.parametrize("a, b", [((5,), (5, 4)), ((5,), (2, 5, 4)), ((3, 5), (5,)), ((2, 3, 5), (5,)),
                                  ((5,), (5,)), ((2, 3, 5), (5, 4)), ((1, 3, 5), (2, 5, 4))])
def test_matmul_with_vector_or_folded_operands_counts_as_torch_does(a, b):
    # torch unsqueezes a 1-D left operand into an mm (counted) but runs aten.mv / aten.dot for a 1-D right
    # operand, which torch.utils.flop_counter counts as 0: the ONNX count follows
    out = tuple(torch.matmul(torch.zeros(a), torch.zeros(b)).shape)
    model, shapes = one_node("MatMul", {"a": a, "b": b}, out)
    assert count_onnx_flops(model, shapes) == torch_flops(torch.matmul, torch.randn(a), torch.randn(b))


def test_gemm_with_trans_b_counts_the_product_not_the_bias():
    model, shapes = one_node("Gemm", {"a": (8, 16), "w": (32, 16), "c": (32,)}, (8, 32), transB=1)
    assert count_onnx_flops(model, shapes) == 2 * 8 * 16 * 32
    model, shapes = one_node("Gemm", {"a": (16, 8), "w": (16, 32)}, (8, 32), transA=1)
    assert count_onnx_flops(model, shapes) == 2 * 8 * 16 * 32


def test_grouped_conv_counts_input_channels_per_group():
    # X [2, 8, 10, 10], W [12, 8/4, 3, 3], group 4, padding 1: Y [2, 12, 10, 10]
    model, _ = one_node("Conv", {"x": (2, 8, 10, 10), "w": (12, 2, 3, 3), "b": (12,)}, (2, 12, 10, 10),
                        group=4, pads=[1, 1, 1, 1])
    shapes = run_shapes(model, {name: np.zeros(shape, np.float32) for name, shape in
                                {"x": (2, 8, 10, 10), "w": (12, 2, 3, 3), "b": (12,)}.items()})
    assert shapes["y"] == (2, 12, 10, 10)
    assert count_onnx_flops(model, shapes) == 2 * (2 * 12 * 10 * 10) * 2 * 3 * 3  # 86,400
    x, w = torch.randn(2, 8, 10, 10), torch.randn(12, 2, 3, 3)
    assert count_onnx_flops(model, shapes) == torch_flops(nn.functional.conv2d, x, w, None, 1, 1, 1, 4)


def test_grouped_conv_transpose_counts_as_torch_does():
    x, w = torch.randn(2, 8, 5, 5), torch.randn(8, 3, 3, 3)  # 8 in, 3·2 out channels, group 2
    out = nn.functional.conv_transpose2d(x, w, stride=2, groups=2)
    model, shapes = one_node("ConvTranspose", {"x": tuple(x.shape), "w": tuple(w.shape)}, tuple(out.shape),
                             group=2, strides=[2, 2])
    expected = torch_flops(lambda: nn.functional.conv_transpose2d(x, w, stride=2, groups=2))
    assert count_onnx_flops(model, shapes) == expected == 2 * (2 * 8 * 5 * 5) * 3 * 3 * 3


def test_onnxruntime_session_fusions_count_as_their_plain_ops():
    # what an onnxruntime session saves at its extended level: MatMul / Gemm / Conv with an activation or a
    # transpose folded in
    model, shapes = one_node("FusedMatMul", {"a": (2, 3, 5), "b": (2, 4, 5)}, (2, 3, 4), domain="com.microsoft",
                             transB=1, alpha=0.5)
    assert count_onnx_flops(model, shapes) == 2 * 2 * 3 * 5 * 4
    model, shapes = one_node("FusedGemm", {"a": (8, 16), "w": (32, 16)}, (8, 32), domain="com.microsoft",
                             transB=1, activation="Relu")
    assert count_onnx_flops(model, shapes) == 2 * 8 * 16 * 32
    model, shapes = one_node("FusedConv", {"x": (2, 8, 10, 10), "w": (12, 2, 3, 3)}, (2, 12, 10, 10),
                             domain="com.microsoft", group=4, pads=[1, 1, 1, 1], activation="Relu")
    assert onnx_flops_by_op(model, shapes) == {"com.microsoft.FusedConv": 2 * (2 * 12 * 10 * 10) * 2 * 3 * 3}


@pytest.mark.parametrize("equation, a, b", [
    ("bhnd,bhmd->bhnm", (2, 3, 5, 4), (2, 3, 6, 4)),  # attention scores
    ("...ij,jk->...ik", (2, 3, 5), (5, 4)),  # a Linear
    ("ij,jk->i", (3, 5), (5, 4)),  # k summed out of b first
    ("i,j->ij", (3,), (4,)),  # outer product: torch multiplies, 0
    ("bij,bjk->ik", (1, 3, 5), (2, 5, 4)),  # b broadcast: summed out, not contracted
])
def test_two_operand_einsum_counts_as_torch_does(equation, a, b):
    ta, tb = torch.randn(a), torch.randn(b)
    model, shapes = one_node("Einsum", {"a": a, "b": b}, tuple(torch.einsum(equation, ta, tb).shape),
                             equation=equation)
    assert count_onnx_flops(model, shapes) == torch_flops(torch.einsum, equation, ta, tb)


def test_einsum_of_three_operands_counts_zero_and_says_so():
    model, shapes = one_node("Einsum", {"a": (3, 5), "b": (5, 4), "c": (4, 2)}, (3, 2), equation="ij,jk,kl->il")
    with pytest.warns(UserWarning, match="3 operands counts 0"):
        assert count_onnx_flops(model, shapes) == 0


def test_onnx_attention_3d_grouped_query_with_past_is_torch_sdpa_count():
    # 8 query heads, 2 key/value heads, head 4, value head 6; 5 new tokens attend 3 cached + 5 new
    inputs = {"q": (2, 5, 8 * 4), "k": (2, 5, 2 * 4), "v": (2, 5, 2 * 6), "": (), "past_k": (2, 2, 3, 4),
              "past_v": (2, 2, 3, 6)}
    model, shapes = one_node("Attention", inputs, (2, 5, 8 * 6), q_num_heads=8, kv_num_heads=2)
    # grouped-query attention counts as its key/value heads repeated to the query's (torch >= 2.14 counts GQA
    # shapes so; torch 2.11's sdpa_flop_count refuses them, so the expanded shapes are what both agree on)
    assert count_onnx_flops(model, shapes) == fc.sdpa_flop_count((2, 8, 5, 4), (2, 8, 8, 4), (2, 8, 8, 6))
    model, shapes = one_node("Attention", {"q": (2, 8, 5, 4), "k": (2, 2, 7, 4), "v": (2, 2, 7, 6)}, (2, 8, 5, 6))
    assert count_onnx_flops(model, shapes) == fc.sdpa_flop_count((2, 8, 5, 4), (2, 8, 7, 4), (2, 8, 7, 6))


def test_contrib_attention_counts_the_qkv_projection_and_the_attention():
    # input [2, 7, 16], weights [16, 8 + 8 + 12], 4 heads, past [2, B, 4, 3, 2]: 7 tokens attend 10
    inputs = {"x": (2, 7, 16), "w": (16, 28), "bias": (28,), "": (), "past": (2, 2, 4, 3, 2)}
    model, shapes = one_node("Attention", inputs, (2, 7, 12), domain="com.microsoft", num_heads=4,
                             qkv_hidden_sizes=[8, 8, 12])
    expected = 2 * 2 * 7 * 16 * 28 + fc.sdpa_flop_count((2, 4, 7, 2), (2, 4, 10, 2), (2, 4, 10, 3))
    assert onnx_flops_by_op(model, shapes) == {"com.microsoft.Attention": expected}


@pytest.mark.parametrize("inputs, seq_kv", [
    ({"q": (2, 5, 32), "k": (2, 6, 32), "v": (2, 6, 32)}, 6),
    ({"q": (2, 5, 32), "k": (2, 6, 32), "v": (2, 6, 32), "bias": (96,), "": (), "mask": (), "past_k": (2, 4, 3, 8),
      "past_v": (2, 4, 3, 8)}, 9),
    ({"q": (2, 5, 32), "k": (2, 4, 6, 8), "v": (2, 4, 6, 8)}, 6),  # key/value already split into heads
    ({"q": (2, 5, 32), "k": (2, 6, 4, 2, 8)}, 6),  # packed KV
    ({"q": (2, 5, 4, 3, 8)}, 5),  # packed QKV
])
def test_contrib_multi_head_attention_counts_the_attention_only(inputs, seq_kv):
    inputs = {("" if name == "mask" else name): shape for name, shape in inputs.items()}
    model, shapes = one_node("MultiHeadAttention", inputs, (2, 5, 32), domain="com.microsoft", num_heads=4)
    assert count_onnx_flops(model, shapes) == fc.sdpa_flop_count((2, 4, 5, 8), (2, 4, seq_kv, 8), (2, 4, seq_kv, 8))


# ---------------------------------------------------------------------------------------------
# refusals


def test_a_missing_shape_names_the_node_and_the_tensor():
    model, shapes = one_node("MatMul", {"a": (3, 5), "b": (5, 4)}, (3, 4))
    del shapes["b"]
    with pytest.raises(ValueError, match=r"MatMul node 'the_node'.*'b'"):
        count_onnx_flops(model, shapes)
    shapes["b"] = (5, None)
    with pytest.raises(ValueError, match="not a concrete shape"):
        count_onnx_flops(model, shapes)


def test_3d_onnx_attention_without_head_counts_is_refused():
    model, shapes = one_node("Attention", {"q": (2, 5, 32), "k": (2, 5, 32), "v": (2, 5, 32)}, (2, 5, 32))
    with pytest.raises(ValueError, match="q_num_heads"):
        count_onnx_flops(model, shapes)


def test_ops_with_matrix_products_but_no_formula_are_refused_not_counted_zero():
    model, shapes = one_node("LSTM", {"x": (4, 2, 8), "w": (1, 64, 8), "r": (1, 64, 16)}, (4, 1, 2, 16),
                             hidden_size=16)
    with pytest.raises(ValueError, match="no FLOP formula"):
        count_onnx_flops(model, shapes)


def test_counted_ops_inside_control_flow_are_refused():
    branch = helper.make_graph([helper.make_node("MatMul", ["a", "a"], ["z"])], "branch", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(ValueError, match="If node 'choose' contains a MatMul"):
        count_onnx_flops(helper.make_model(graph), {"cond": (), "a": (3, 3), "y": (3, 3)})


# ---------------------------------------------------------------------------------------------
# whole exported models


@pytest.fixture(scope="module")
def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model.eval(), x, count_flops(model.eval(), x)


@pytest.fixture(scope="module")
def timm_ts17(timm_vit, tmp_path_factory):
    model, x, _ = timm_vit
    path = tmp_path_factory.mktemp("timm") / "ts17.onnx"
    return path, export(model, x, path, dynamo=False, opset=17)


def test_timm_torchscript_export_counts_what_torch_counts(timm_vit, timm_ts17):
    _, x, torch_count = timm_vit
    _, model = timm_ts17
    assert torch_count == 30_674_432  # patch conv, 2 blocks of Linear + attention, head
    assert onnx_flops(model, x) == torch_count


@pytest.mark.parametrize("opset", [18, 23])
def test_timm_dynamo_export_counts_what_torch_counts(onnx_dir, opset):
    from onnx_fixtures import cached_onnx, make_model

    torch_model, x = make_model("timm-cls")  # 4 blocks; the file is the one the ONNX rewrite tests read
    model = onnx.load(str(cached_onnx("timm-cls", f"dynamo{opset}", onnx_dir)))
    attention = op_counts(model)[("", "Attention")]
    assert attention == (4 if opset >= 23 else 0)  # opset 23: one fused Attention per block
    shapes = run_shapes(model, {model.graph.input[0].name: x.numpy()})
    assert count_onnx_flops(model, shapes) == count_flops(torch_model, x)
    if opset >= 23:
        per_block = fc.sdpa_flop_count((2, 4, 65, 16), (2, 4, 65, 16), (2, 4, 65, 16))
        assert onnx_flops_by_op(model, shapes)["Attention"] == 4 * per_block


def test_ort_optimized_timm_graph_counts_the_same(timm_vit, timm_ts17):
    _, x, torch_count = timm_vit
    path, unoptimized = timm_ts17
    optimized = optimize(path)
    ops = op_counts(optimized)
    assert ops[("com.microsoft", "SkipLayerNormalization")] == 4  # the optimizer did rewrite the graph
    # ... but fused no attention: onnxruntime's ViT fusion wants separate q, k, v projections, and timm packs
    # them in one qkv Linear (Reshape -> Transpose -> Split -> Squeeze)
    assert not [op for (domain, op) in ops if "Attention" in op]
    assert onnx_flops(optimized, x) == onnx_flops(unoptimized, x) == torch_count


class _SeparateQKVAttention(nn.Module):
    """Attention as transformers 4.x's ViT wrote it (q, k, v Linears, scores divided by sqrt(d)): the pattern
    onnxruntime's ViT/BERT attention fusion matches."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape))


class _Block(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), _SeparateQKVAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("fused_op", ["Attention", "MultiHeadAttention"])
def test_ort_fused_attention_counts_the_same(tmp_path, fused_op):
    torch.manual_seed(0)
    encoder = nn.Sequential(_Block(), _Block(), nn.LayerNorm(64)).eval()
    x = torch.randn(2, 65, 64)
    unoptimized = export(encoder, x, tmp_path / "m.onnx", dynamo=False, opset=17)
    optimized = optimize(tmp_path / "m.onnx", use_multi_head_attention=fused_op == "MultiHeadAttention")
    assert op_counts(optimized)[("com.microsoft", fused_op)] == 2
    by_op = onnx_flops_by_op(optimized, run_shapes(optimized, {"x": x.numpy()}))
    attention = 2 * fc.sdpa_flop_count((2, 4, 65, 16), (2, 4, 65, 16), (2, 4, 65, 16))
    qkv_projection = 2 * (2 * 2 * 65 * 64 * 3 * 64)
    assert by_op[f"com.microsoft.{fused_op}"] == attention + (qkv_projection if fused_op == "Attention" else 0)
    assert sum(by_op.values()) == onnx_flops(unoptimized, x) == count_flops(encoder, x)
