"""Device and precision: every method's rewrite runs in bfloat16 / float16 with the shapes of float32, compiles
with ``fullgraph=True`` (no graph break), and its forward makes no host sync; ``--device`` / ``--dtype`` on the
commands. CUDA paths run when a GPU is present and are skipped (with the reason) when not."""

from __future__ import annotations

import ast
import copy
import inspect
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitprune
from vitprune.device import resolve_device, resolve_dtype
from vitprune.errors import VitpruneError
from vitprune.ops import modules, token_ops

# 2 blocks, width 32, 16 patches: compiling is what costs here (seconds per graph), so the model is tiny
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
METHODS = {
    "token-drop": ("token-drop", dict(keep_rate=0.5, at_inference=True, selection="magnitude")),
    "importance-mask-dynamic": ("importance-mask", dict(keep="1:0.5")),
    "importance-mask-static": ("importance-mask", dict(keep="1:0.5", mode="static",
                                                       calibration=torch.randn(4, 3, 32, 32))),
    "lifespan-gather": ("lifespan-gather", dict(flops=0.7, after_block=1)),
    "token-merge": ("token-merge", dict(r=4)),
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
#: aten ops that copy a device value to the host (``.item()``, ``int(t)``, ``bool(t)``) or whose output size
#: depends on the data (``nonzero``, ``masked_select``, ``unique``): each one would stall a GPU pipeline
HOST_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
                 "aten.unique_consecutive", "aten.unique_dim", "aten.argwhere"}


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return vitprune.load("timm:vit_small_patch16_224", model_args=TINY)


@pytest.fixture(scope="module")
def rewritten() -> dict[str, torch.nn.Module]:
    """Each method's rewrite of one tiny ViT (float32, eval mode), built once for the module."""
    model = tiny()
    return {name: vitprune.rewrite(model, method, **params)[0].eval() for name, (method, params) in METHODS.items()}


class _Ops(TorchDispatchMode):
    """Records the aten ops a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _kept_shapes(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The ``[B, K]`` shape of every token module's kept indices in one forward (and the output's shape)."""
    mods = modules.token_modules(model)
    for m in mods:
        m.record_kept = True
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for m in mods:
            m.record_kept = False
    return [tuple(m.last_kept.shape) for m in mods] + [tuple(out.shape)]


def test_device_and_dtype_names_are_resolved_or_refused():
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16 and resolve_dtype(None, torch.bfloat16) is torch.bfloat16
    for bad in ("fp8", "float64", torch.int64):
        with pytest.raises(VitpruneError, match="--dtype: expected one of float32, bfloat16, float16"):
            resolve_dtype(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(VitpruneError, match="--device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(VitpruneError, match="no CUDA GPU"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("args, option", [(["--dtype", "float8"], "--dtype"), (["--device", "nope"], "--device")])
def test_bad_device_or_dtype_is_one_line(cli_inprocess, args, option):
    code, out, err = cli_inprocess("bench", "timm:vit_small_patch16_224", *args, "--quiet")
    assert code == 1 and not out
    assert err.startswith(f"vitprune: error: {option}") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_rewrite_runs_in_16_bits_with_the_shapes_of_float32(rewritten, name, dtype):
    """Token counts are Python ints fixed at rewrite time, so a 16-bit dtype cannot change a shape: whichever
    tokens top-k picks among ties (a constant image makes every score tie), the kept counts are float32's."""
    model = rewritten[name]
    low = copy.deepcopy(model).to(dtype)
    for x in (torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(3, 3, 32, 32)):
        assert _kept_shapes(low, x.to(dtype)) == _kept_shapes(model, x)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = model(x), low(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    # 16-bit rounding, and another choice of tokens where a random-init model's scores lie within rounding
    cosine = torch.nn.functional.cosine_similarity(out.float(), ref, dim=1)
    assert cosine.min() > 0.95, cosine


def test_ranking_is_float32_so_16_bit_scores_rank_as_in_float32():
    scores = torch.linspace(0, 1, 200).to(torch.bfloat16)[None]  # bfloat16: runs of equal values (ties)
    r = token_ops.ranked(scores)
    assert r.dtype == torch.float32
    assert torch.equal(r, token_ops.ranked(scores.float()))  # the same values, the same tie-free ranks
    assert r.unique().numel() == r.numel()  # tie-free: every position its own rank


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_compiles_as_one_graph(rewritten, name):
    """``fullgraph=True`` fails on any graph break; ``aot_eager`` traces what inductor would (forward and its
    decompositions) without code generation (inductor with fullgraph: tests/test_export_compile.py)."""
    model = rewritten[name]
    torch._dynamo.reset()
    fast = vitprune.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for b in (1, 2, 5):
            x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)  # token-drop: magnitude selection


def test_lifespan_exact_is_the_one_graph_break(rewritten):
    """``--exact`` keeps a per-image count of tokens (``int(tensor)``: a host sync), so it cannot compile whole."""
    model, _ = vitprune.rewrite(tiny(), "lifespan-gather", flops=0.7, after_block=1, exact=True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|Unsupported|item"):
        with torch.no_grad():
            torch.compile(model.eval(), backend="aot_eager", fullgraph=True)(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_no_host_sync_in_any_forward(rewritten, training):
    x = torch.randn(2, 3, 32, 32)
    for name, model in rewritten.items():
        model.train(training)
        try:
            with _Ops() as ops, torch.no_grad():
                model(x)
        finally:
            model.eval()
        assert not ops.seen & HOST_SYNC_OPS, (name, ops.seen & HOST_SYNC_OPS)
    exact, _ = vitprune.rewrite(tiny(), "lifespan-gather", flops=0.7, after_block=1, exact=True)
    with _Ops() as ops, torch.no_grad():
        exact.eval()(x[:1])
    assert "aten._local_scalar_dense" in ops.seen  # the check sees a sync where there is one: --exact's count


def test_token_op_sources_call_nothing_that_syncs():
    """No ``.item()``, ``.tolist()``, ``.nonzero()``, ``.cpu()``, ``.numpy()`` anywhere in the token ops, and no
    ``int/float/bool`` of a computed value in a forward but ``PrefixSlice``'s ``--exact`` count."""
    banned = {"item", "tolist", "nonzero", "cpu", "numpy", "argwhere"}
    found = []
    for module in (token_ops, modules):
        tree = ast.parse(inspect.getsource(module))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                if isinstance(node.func, ast.Attribute) and node.func.attr in banned:
                    found.append(f"{module.__name__}.{fn.name}: .{node.func.attr}()")
                cast = isinstance(node.func, ast.Name) and node.func.id in ("int", "float", "bool")
                if fn.name == "forward" and cast and node.args and isinstance(node.args[0], (ast.Call, ast.Compare,
                                                                                             ast.Subscript)):
                    found.append(f"{module.__name__}.{fn.name}:{node.lineno}: {ast.unparse(node)}")
    exact_count = "int((lives[0] > self.block).sum())"
    assert [f for f in found if not f.endswith(exact_count)] == [], found
    assert any(f.endswith(exact_count) for f in found)  # the scan does see the one it allows


def test_bench_bfloat16_eager_and_compile_on_cpu(tmp_path, cli_inprocess):
    """The issue's done-when: ``vitprune bench MODEL REWRITTEN --device cpu --dtype bfloat16 --backend
    eager,compile``."""
    model = tiny()
    vitprune.save(vitprune.capture(model), tmp_path / "orig")
    vitprune.save(vitprune.rewrite(model, "token-drop", keep_rate=0.5, at_inference=True)[0], tmp_path / "td")
    torch._dynamo.reset()
    code, out, err = cli_inprocess("bench", tmp_path / "orig", tmp_path / "td", "--device", "cpu", "--dtype",
                                   "bfloat16", "--backend", "eager,compile", "--batch", "2", "--repeats", "1",
                                   "--iters", "1",
                                   "--json", "--quiet")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["backend"], r["device"], r["dtype"]) for r in rows] == [("eager", "cpu", "bfloat16")] * 2 + \
        [("compile", "cpu", "bfloat16")] * 2
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows), rows
    assert rows[1]["flops_ratio"] < 0.7 and rows[0]["peak_memory_bytes"] > 0  # FLOPs counted in float32
    code, _, err = cli_inprocess("bench", tmp_path / "orig", "--dtype", "bfloat16", "--backend", "onnxruntime")
    assert code == 1 and "float32 on the CPU" in err
    code, _, err = cli_inprocess("bench", tmp_path / "orig", "--device", "cpu", "--cuda-graphs", "--quiet")
    assert code == 1 and "--cuda-graphs" in err


def test_eval_and_finetune_take_a_dtype(tmp_path):
    """bfloat16 autocast on the CPU: eval's accuracy within a few images of float32's; a finetune step's loss
    finite, the dtype recorded in the run's config."""
    from conftest import load_example

    load_example("digits").write_image_folders(tmp_path / "d", max_train=4, max_val=20)
    torch.manual_seed(0)
    model = vitprune.rewrite(vitprune.load("timm:vit_small_patch16_224", model_args={**TINY, "num_classes": 10}),
                             "token-drop", keep_rate=0.5)[0]
    full = vitprune.evaluate(model, tmp_path / "d" / "val", device="cpu")
    half = vitprune.evaluate(model, tmp_path / "d" / "val", device="cpu", dtype="bfloat16")
    assert half["dtype"] == "bfloat16" and full["dtype"] == "float32"
    assert abs(half["rows"][0]["top1"] - full["rows"][0]["top1"]) <= 0.1
    result = vitprune.finetune(model, tmp_path / "d" / "train", tmp_path / "run", device="cpu", dtype=torch.bfloat16,
                               epochs=1, batch_size=8, progress=False)
    assert result.history[0]["train_loss"] > 0
    checkpoint = torch.load(next((tmp_path / "run" / "checkpoints").iterdir()) / "state.pt", weights_only=False)
    assert checkpoint["config"]["dtype"] == "bfloat16"  # --resume needs the same
    with pytest.raises(VitpruneError, match="--dtype: expected one of"):
        vitprune.finetune(model, tmp_path / "d" / "train", tmp_path / "run2", device="cpu", dtype="half", epochs=1)


# -- CUDA: run where a GPU is present --------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("name", sorted(METHODS))
def test_cuda_bfloat16_forward_has_no_host_sync(rewritten, name):
    model = copy.deepcopy(rewritten[name]).to("cuda", torch.bfloat16)
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # warm-up (lazy CUDA init syncs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _kept_shapes(model, x) == _kept_shapes(rewritten[name], x.float().cpu())


@needs_cuda
def test_cuda_bench_events_memory_and_cuda_graphs(rewritten):
    from vitprune.ship.bench import bench

    models = {"original": vitprune.capture(tiny()), "token-merge": copy.deepcopy(rewritten["token-merge"])}
    rows = bench(models, (3, 32, 32), backends=("eager", "compile"), batches=(1, 8), repeats=2, iters=2,
                 device="cuda", dtype="bfloat16", cuda_graphs=True, progress=False)
    assert {r.backend for r in rows} == {"eager", "compile+cudagraphs"}
    assert all(r.error is None and r.images_per_s > 0 and r.device.startswith("cuda") for r in rows), rows
    assert all(r.peak_memory_bytes is not None for r in rows if r.backend == "eager")
    assert all(r.latency_ms_p50 > 0 for r in rows if r.batch == 1)


@needs_cuda
def test_cuda_float16_finetune_uses_a_grad_scaler(tmp_path):
    from conftest import load_example
    from vitprune.device import grad_scaler

    assert grad_scaler(torch.device("cuda"), torch.float16).is_enabled()
    assert not grad_scaler(torch.device("cuda"), torch.bfloat16).is_enabled()
    load_example("digits").write_image_folders(tmp_path / "d", max_train=4, max_val=4)
    torch.manual_seed(0)
    model = vitprune.rewrite(vitprune.load("timm:vit_small_patch16_224", model_args={**TINY, "num_classes": 10}),
                             "token-drop", keep_rate=0.5)[0]
    result = vitprune.finetune(model, tmp_path / "d" / "train", tmp_path / "run", device="cuda", dtype="float16",
                               epochs=1, batch_size=8, progress=False)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
