"""Pickle-free save/load of GraphModules (vitprune.io.serialize): exact round trips and refusals."""

from __future__ import annotations

import builtins
import json
import math
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import fx, nn

from vitprune.frontends.capture import capture
from vitprune.errors import LoadError, SaveError
from vitprune.ops.modules import TokenDrop
from vitprune.io import allowlist
from vitprune.io.serialize import _function_name, load_graph_module, save_graph_module

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def _vit(**extra) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", **SMALL, **extra)


def _round_trip(gm: fx.GraphModule, tmp_path: Path, metadata=None):
    save_graph_module(gm, tmp_path, metadata=metadata)
    return load_graph_module(tmp_path)


def _same_graph(a: fx.GraphModule, b: fx.GraphModule) -> None:
    assert [(n.name, n.op) for n in a.graph.nodes] == [(n.name, n.op) for n in b.graph.nodes]


def _tiny_graph() -> fx.GraphModule:
    """x -> x * 2: the smallest savable graph."""
    g = fx.Graph()
    g.output(g.call_function(operator.mul, (g.placeholder("x"), 2)))
    return fx.GraphModule(nn.Module(), g)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_small_patch16_224", SMALL),
        ("deit_tiny_distilled_patch16_224", SMALL),
        ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2, embed_dim=64, num_heads=2)),
    ],
)
def test_round_trip_eval_is_exact(tmp_path, name, kwargs):
    torch.manual_seed(0)
    gm = capture(timm.create_model(name, **kwargs).eval())
    loaded, meta = _round_trip(gm, tmp_path, metadata={"source": name, "shape": [1, 3, 32, 32]})
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    _same_graph(gm, loaded)
    assert [n.target for n in gm.graph.nodes if n.op != "call_function"] == [
        n.target for n in loaded.graph.nodes if n.op != "call_function"
    ]
    assert meta == {"source": name, "shape": [1, 3, 32, 32]}
    assert loaded.training is False and type(loaded).__name__ == type(gm).__name__
    assert sorted(os.listdir(tmp_path)) == ["graph.json", "tensors.safetensors"]


def test_round_trip_train_mode_is_exact(tmp_path):
    gm = capture(_vit(drop_rate=0.1, drop_path_rate=0.1).train())
    loaded, _ = _round_trip(gm, tmp_path)
    assert loaded.training is True
    trained = dict(gm.named_modules())
    assert all(m.training == trained[path].training for path, m in loaded.named_modules())
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    expected = gm(x)
    torch.manual_seed(0)
    assert torch.equal(expected, loaded(x))
    _same_graph(gm, loaded)


def test_token_drop_leaf_round_trips(tmp_path):
    gm = capture(_vit().eval())
    add = next(n for n in gm.graph.nodes if n.name == "add")
    gm.add_submodule("token_drop", TokenDrop(num_prefix_tokens=1, num_patches=16, keep_count=8, at_inference=True))
    with gm.graph.inserting_after(add):
        new = gm.graph.call_module("token_drop", (add,))
    add.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    gm.graph.lint()
    gm.recompile()
    loaded, _ = _round_trip(gm, tmp_path)
    assert isinstance(loaded.token_drop, TokenDrop)
    assert loaded.token_drop.config() == gm.token_drop.config()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = gm(x)
        torch.manual_seed(1)
        assert torch.equal(expected, loaded(x))
    _same_graph(gm, loaded)


_CHILD = """
import sys, torch
from safetensors.torch import load_file
from vitprune.io.serialize import load_graph_module
gm, meta = load_graph_module(sys.argv[1])
expected = load_file(sys.argv[2])
x = expected.pop("input")
with torch.no_grad():
    assert torch.equal(gm(x), expected["output"]), "outputs differ in a fresh process"
assert meta == {"k": [1, 2.5, None]}
print("ok")
"""


def test_round_trip_in_fresh_process(tmp_path):
    gm = capture(_vit().eval())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_graph_module(gm, model_dir, metadata={"k": [1, 2.5, None]})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        save_file({"input": x, "output": gm(x).contiguous()}, str(tmp_path / "expected.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model_dir), str(tmp_path / "expected.safetensors")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _not_allowed(x):
    return x + 1


fx.wrap("_not_allowed")


class _CallsUnknown(nn.Module):
    def forward(self, x):
        return _not_allowed(x) * 2


def test_save_refuses_function_outside_allowlist(tmp_path):
    gm = fx.symbolic_trace(_CallsUnknown())
    assert any(n.target is _not_allowed for n in gm.graph.nodes)
    with pytest.raises(SaveError, match="_not_allowed, which is not on vitprune's allowlist"):
        save_graph_module(gm, tmp_path)


def test_save_refuses_private_getattr_and_missing_folder(tmp_path):
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(builtins.getattr, (x, "_version")))
    with pytest.raises(SaveError, match="getattr"):
        save_graph_module(fx.GraphModule(nn.Module(), g), tmp_path)
    with pytest.raises(SaveError, match="does not exist"):
        save_graph_module(capture(_vit().eval()), tmp_path / "missing")


def test_load_refuses_os_system_without_running_it(tmp_path):
    gm = capture(_vit().eval())
    save_graph_module(gm, tmp_path)
    marker = tmp_path / "pwned"
    doc = json.loads((tmp_path / "graph.json").read_text())
    node = next(n for n in doc["nodes"] if n["target"] == "torch.cat")
    node["target"], node["args"] = "os.system", [f"touch {marker}"]
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="os.system"):
        load_graph_module(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["input", "kwarg", "path"])
def test_load_refuses_code_in_names_fx_pastes_into_source(tmp_path, field):
    # fx writes placeholder names and keyword names verbatim into the forward() it exec()s.
    gm = capture(_vit().eval())
    save_graph_module(gm, tmp_path)
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    doc = json.loads((tmp_path / "graph.json").read_text())
    if field == "input":
        doc["nodes"][0]["target"] = f"x={code}"
    elif field == "kwarg":
        node = next(n for n in doc["nodes"] if n["target"] == "torch.cat")
        node["kwargs"] = {f"dim=1, out={code}, z": 1}
    else:
        node = next(n for n in doc["nodes"] if n["op"] == "get_attr")
        node["target"] = f'a"); {code}; ("'
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="invalid"):
        load_graph_module(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", ["operator.attrgetter", "builtins.eval", "torch.load", "torch.from_file", "torch.nn.functional.handle_torch_function"]
)
def test_load_refuses_dangerous_targets(tmp_path, target):
    save_graph_module(_tiny_graph(), tmp_path)
    doc = json.loads((tmp_path / "graph.json").read_text())
    doc["nodes"][1]["target"] = target
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="allowlist"):
        load_graph_module(tmp_path)


def test_load_refuses_edited_getattr_method_and_module_class(tmp_path):
    gm = capture(_vit().eval())
    save_graph_module(gm, tmp_path)
    original = (tmp_path / "graph.json").read_text()

    def edited(change) -> None:
        doc = json.loads(original)
        change(doc)
        (tmp_path / "graph.json").write_text(json.dumps(doc))
        with pytest.raises(LoadError):
            load_graph_module(tmp_path)

    getattr_node = lambda d: next(n for n in d["nodes"] if n["target"] == "builtins.getattr")
    edited(lambda d: getattr_node(d).update(args=[getattr_node(d)["args"][0], "__class__"]))
    method_node = lambda d: next(n for n in d["nodes"] if n["op"] == "call_method")
    edited(lambda d: method_node(d).update(target="__reduce_ex__"))
    edited(lambda d: d["modules"]["head"].update({"class": "subprocess:Popen"}))
    edited(lambda d: d["modules"]["head"].update({"class": "torch.nn.modules.conv:Conv2d"}))


@pytest.mark.parametrize("damage", ["truncate", "no_tensors", "no_graph", "bad_json", "version", "shape"])
def test_load_refuses_damaged_files(tmp_path, damage):
    save_graph_module(capture(_vit().eval()), tmp_path)
    graph, tensors = tmp_path / "graph.json", tmp_path / "tensors.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif damage == "no_tensors":
        tensors.unlink()
    elif damage == "no_graph":
        graph.unlink()
    elif damage == "bad_json":
        graph.write_text(graph.read_text()[:-20])
    else:
        doc = json.loads(graph.read_text())
        if damage == "version":
            doc["version"] = 999
        else:
            doc["tensors"]["cls_token"]["shape"] = [1, 1, 65]
        graph.write_text(json.dumps(doc))
    with pytest.raises(LoadError):
        load_graph_module(tmp_path)


def test_load_missing_directory(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_graph_module(tmp_path / "nowhere")


def test_parameters_buffers_and_constants_keep_their_kind(tmp_path):
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(operator.add, (x, g.get_attr("sub.nb")))
    y = g.call_function(operator.mul, (y, g.get_attr("const")))
    y = g.call_function(operator.mul, (y, g.get_attr("sub.deep.frozen")))
    y = g.call_module("lin", (y,))
    y = g.call_method("mean", (y,), {"dim": -1, "dtype": torch.float64})
    g.output((y, {"k": [math.inf, slice(1, None), ..., torch.float16, torch.device("cpu")]}))
    root = nn.Module()
    root.const = torch.zeros(1)
    root.sub = nn.Module()
    root.sub.register_buffer("nb", torch.ones(3), persistent=False)
    root.sub.deep = nn.Module()
    root.sub.deep.frozen = nn.Parameter(torch.full((3,), 2.0), requires_grad=False)
    root.lin = nn.Linear(3, 4, bias=False)
    gm = fx.GraphModule(root, g)
    # torch 2.11's GraphModule copies get_attr targets as persistent buffers (2.14 keeps the kind): state it
    gm.sub.register_buffer("nb", gm.sub.nb, persistent=False)
    del gm.const
    gm.const = torch.arange(3.0)  # a plain attribute, not a buffer
    gm.sub.register_buffer("unused", torch.zeros(2, dtype=torch.int64))
    gm.lin.weight.requires_grad_(False)
    gm.lin.train(False)

    loaded, _ = _round_trip(gm, tmp_path)
    x = torch.randn(2, 3)
    assert torch.equal(gm(x)[0], loaded(x)[0]) and gm(x)[1] == loaded(x)[1]
    assert "const" not in loaded._buffers and type(loaded.const) is torch.Tensor
    assert "nb" in loaded.sub._non_persistent_buffers_set and "unused" in loaded.sub._buffers
    assert dict(loaded.named_buffers()).keys() == dict(gm.named_buffers()).keys()
    for name, p in gm.named_parameters():
        q = loaded.get_parameter(name)
        assert isinstance(q, nn.Parameter) and q.requires_grad == p.requires_grad and torch.equal(p, q)
    assert loaded.lin.bias is None and loaded.lin.training is False and loaded.training is True


def test_timm_parameters_stay_parameters(tmp_path):
    gm = capture(_vit().eval())
    gm.cls_token.requires_grad_(False)
    loaded, _ = _round_trip(gm, tmp_path)
    params, again = dict(gm.named_parameters()), dict(loaded.named_parameters())
    assert params.keys() == again.keys()
    assert all(isinstance(again[k], nn.Parameter) and again[k].requires_grad == p.requires_grad for k, p in params.items())
    assert dict(gm.named_buffers()).keys() == dict(loaded.named_buffers()).keys()


def test_torch_nn_modules_rebuild_from_attributes(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, bias=False, add_bias_kv=True, batch_first=True)
            self.ln = nn.LayerNorm(16, bias=False)
            self.conv = nn.Conv2d(16, 16, 3, padding="same", groups=2)

        def forward(self, x):
            y = self.ln(self.mha(x, x, x)[0])
            return self.conv(y.transpose(1, 2).reshape(2, 16, 5, 1))

    gm = fx.symbolic_trace(M().eval())
    loaded, _ = _round_trip(gm, tmp_path)
    x = torch.randn(2, 5, 16)
    assert torch.equal(gm(x), loaded(x))
    assert loaded.mha.in_proj_bias is None and loaded.mha.bias_k is not None and loaded.ln.bias is None
    assert loaded.conv.padding == "same" and loaded.conv.kernel_size == (3, 3)


@pytest.mark.parametrize("name", sorted(allowlist.FUNCTIONS))
def test_function_names_resolve_to_the_same_object(name):
    if name.startswith("timm.") and name not in allowlist.functions():  # an admitted timm release without it
        pytest.skip(f"the installed timm {timm.__version__} has no {name}: no graph it captures can call it")
    fn = allowlist.functions()[name]
    assert callable(fn) and _function_name(fn) == name
    assert name.split(".")[0] in {"operator", "builtins", "torch", "timm"}


# --- The closed allowlist (vitprune.io.allowlist) -----------------------------------------------------

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
# The families the allowlist was enumerated from (see vitprune/allowlist.py); conftest's FAMILIES first.
ALLOWLIST_FAMILIES = {
    "vit_cls": ("vit_small_patch16_224", TINY),
    "gap": ("vit_small_patch16_224", dict(TINY, class_token=False, global_pool="avg")),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=4, depth=2)),
    "registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56, depth=2)),
    "deit3_layerscale": ("deit3_small_patch16_224", TINY),
    "clip_prenorm": ("vit_xsmall_patch16_clip_224", TINY),
    "qk_norm": ("vit_small_patch16_224", dict(TINY, qk_norm=True)),
    "flexivit": ("flexivit_small", TINY),
    "dropout_droppath": ("vit_small_patch16_224", dict(TINY, drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)),
    # token-indexed tensors (RoPE tables, relative-position biases) and an attention-pool readout
    "eva02": ("eva02_small_patch14_224", dict(img_size=56, depth=2)),
    "rope": ("vit_base_patch16_rope_224", TINY),
    "beit": ("beit_base_patch16_224", TINY),
    "relpos": ("vit_relpos_small_patch16_224", TINY),
    "siglip": ("vit_base_patch16_siglip_224", TINY),
    "parallel": ("vit_small_patch16_18x2_224", TINY),  # parallel blocks: the branches' outputs stacked and summed
}
ALLOWLIST_REWRITES = [
    ("token-drop", dict(keep_rate=0.5)),
    ("token-drop", dict(keep_rate=0.5, selection="magnitude", at_inference=True)),
    ("importance-mask", dict(keep="1:0.5")),
    ("importance-mask", dict(keep="1:0.5", mode="static")),
    ("lifespan-gather", dict(flops=0.7, after_block=1)),
    ("lifespan-gather", dict(flops=0.7, after_block=1, exact=True)),
    ("token-merge", dict(r=2)),
]


def _allowlist_models():
    """(name, model, input size) for every family, with timm's fused attention on and off."""
    import timm.layers
    import torchvision

    try:
        for fused in (True, False):
            timm.layers.set_fused_attn(fused)  # read when a model is built
            for key, (arch, args) in ALLOWLIST_FAMILIES.items():
                torch.manual_seed(0)
                yield f"{key} fused={fused}", timm.create_model(arch, **args), args["img_size"]
    finally:
        timm.layers.set_fused_attn(True)
    torch.manual_seed(0)
    yield "torchvision", torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128), 32
    torch.manual_seed(0)
    yield "dense segmentation", _Segmentation(), 32
    import transformers
    from vitprune.io.hf import wrap

    torch.manual_seed(0)  # Hugging Face BLIP vision: its wrapper traces (torch.matmul, F.softmax, gelu, x.size())
    yield "hf blip", wrap(transformers.BlipVisionModel(transformers.BlipVisionConfig(
        image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=96))), 32


class _Segmentation(torch.nn.Module):
    """A dense head: per-patch logits on the grid, upsampled to the pixels (token restore rewrites it)."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model("vit_small_patch16_224", **dict(TINY, num_classes=0, global_pool=""))
        self.head = torch.nn.Linear(64, 3)

    def forward(self, x):
        grid = self.head(self.vit.forward_features(x)[:, 1:]).transpose(1, 2).reshape(x.shape[0], 3, 8, 8)
        return torch.nn.functional.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)


# The passes add only vitprune leaf modules and getitem: they run on these (all of them took 4 minutes
# on 2 cores; vitprune/allowlist.py was enumerated over every family once, with the same result).
REWRITTEN_FAMILIES = ("vit_cls", "gap", "dense", "eva02", "beit", "siglip")


def _produced_targets() -> tuple[dict[str, set], set[str]]:
    """Every call target capture produces for the families above, and the passes for REWRITTEN_FAMILIES,
    in train and eval mode.

    Returns ``({kind: names}, refused)``; kinds are function, method, attribute and module class.
    Passes run without vitprune.rewrite's verification (not needed to see the graph, and slow).
    """
    import copy

    from vitprune.errors import VitpruneError
    from vitprune.passes import make_pass, run_passes

    found = {"function": set(), "method": set(), "attribute": set(), "class": set()}
    refused = set()

    def collect(gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:
            if n.op == "call_function":
                fn = n.target
                found["function"].add(allowlist.function_names().get(fn, f"{fn.__module__}.{fn.__qualname__}"))
                if fn is builtins.getattr:
                    found["attribute"].add(n.args[1])
            elif n.op == "call_method":
                found["method"].add(n.target)
            elif n.op == "call_module":
                found["class"].add(allowlist.class_name(type(gm.get_submodule(n.target))))

    for name, model, size in _allowlist_models():
        x = torch.randn(2, 3, size, size)
        for training in (False, True):
            model.train(training)
            collect(capture(copy.deepcopy(model)))
            for method, params in ALLOWLIST_REWRITES if name.split()[0] in REWRITTEN_FAMILIES else []:
                if params.get("mode") == "static":
                    params = dict(params, calibration=[torch.randn(4, 3, size, size)])
                try:
                    gm, _ = run_passes(capture(copy.deepcopy(model)), [make_pass(method, **params)], x)
                except VitpruneError:  # lifespan-gather and token-merge need fused attention's queries and keys
                    refused.add(f"{name} {method}")
                    continue
                collect(gm)
    return found, refused


def test_allowlist_covers_what_vitprune_produces():
    found, refused = _produced_targets()
    listed = {"function": {n for n in allowlist.FUNCTIONS if n in allowlist.functions()}, "method": set(allowlist.METHODS),
              "attribute": set(allowlist.ATTRIBUTES), "class": set(allowlist.module_classes())}
    for kind in found:
        assert found[kind] <= listed[kind], f"produced but not on the allowlist: {sorted(found[kind] - listed[kind])}"
        # closed in the other direction too: nothing on the list that no supported graph needs
        assert listed[kind] <= found[kind], f"on the allowlist but never produced: {sorted(listed[kind] - found[kind])}"
    # lifespan-gather and token-merge read fused attention's queries and keys; token-merge cannot put tokens
    # back for a dense head or follow token-indexed tensors yet
    assert all(r.endswith(("fused=False lifespan-gather", "fused=False token-merge"))
               or r in ("dense segmentation token-merge", "eva02 fused=True token-merge", "beit fused=True token-merge")
               for r in refused), refused


# Names with file, process, network, storage, aliasing or code-lookup effects (or only not needed).
DANGEROUS = [
    "from_file", "save", "load", "storage", "untyped_storage", "_typed_storage", "share_memory_", "set_", "data_ptr",
    "numpy", "tolist", "register_hook", "apply_", "map_", "map2_", "copy_", "fill_", "system", "popen", "eval",
    "exec", "open", "compile", "__import__", "attrgetter", "methodcaller", "call", "fork", "remove", "unlink",
    "from_numpy", "frombuffer", "UntypedStorage", "__reduce_ex__", "__class__", "__setattr__", "_C", "serialization",
]
SPELLINGS = [
    "torch", "torch._C", "torch._C._VariableFunctions", "torch._C._nn", "torch._C._TensorBase", "torch._C.TensorBase",
    "torch.Tensor", "torch._tensor.Tensor", "torch.nn.functional", "torch.functional", "torch.serialization",
    "torch.storage", "torch.fx._symbolic_trace", "operator", "_operator", "builtins", "os", "posix", "math",
    "subprocess", "vitprune.ops.token_ops", "timm.layers.attention",
]


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_names_are_refused_in_every_spelling(tmp_path, name):
    assert name not in allowlist.METHODS | allowlist.ATTRIBUTES
    save_graph_module(_tiny_graph(), tmp_path)
    original = json.loads((tmp_path / "graph.json").read_text())
    for prefix in SPELLINGS:
        for spelling in (f"{prefix}.{name}", f"{prefix}:{name}"):
            assert spelling not in allowlist.functions() and spelling not in allowlist.module_classes()
            doc = json.loads(json.dumps(original))
            doc["nodes"][1]["target"] = spelling
            (tmp_path / "graph.json").write_text(json.dumps(doc))
            with pytest.raises(LoadError, match="allowlist"):
                load_graph_module(tmp_path)
    for op, target, args in [("call_method", name, [{"node": "x"}]),
                             ("call_function", "builtins.getattr", [{"node": "x"}, name])]:
        doc = json.loads(json.dumps(original))
        doc["nodes"][1].update(op=op, target=target, args=args)
        (tmp_path / "graph.json").write_text(json.dumps(doc))
        with pytest.raises(LoadError, match="allowlist"):
            load_graph_module(tmp_path)


def _graph_with(build) -> fx.GraphModule:
    g = fx.Graph()
    g.output(build(g, g.placeholder("x")))
    return fx.GraphModule(nn.Module(), g)


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda g, x: g.call_function(torch.neg, (x,)), "torch.neg"),
        (lambda g, x: g.call_function(torch.from_file, ("f", True, 19)), "torch.from_file"),
        (lambda g, x: g.call_function(torch.save, (x, "f")), "torch.serialization.save"),
        (lambda g, x: g.call_function(os.system, ("true",)), "system"),
        (lambda g, x: g.call_method("untyped_storage", (x,)), "'untyped_storage'"),
        (lambda g, x: g.call_method("tolist", (x,)), "'tolist'"),
        (lambda g, x: g.call_function(builtins.getattr, (x, "data")), "'data'"),
    ],
)
def test_save_refuses_targets_outside_the_allowlist(tmp_path, build, named):
    with pytest.raises(SaveError, match=f"{named}.*allowlist"):
        save_graph_module(_graph_with(build), tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_refuses_module_class_outside_the_allowlist(tmp_path):
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv1d(3, 3, 1)))
    with pytest.raises(SaveError, match="torch.nn.modules.conv:Conv1d.*allowlist"):
        save_graph_module(gm, tmp_path)


def test_load_refuses_get_attr_of_a_module_and_methods_of_literals(tmp_path):
    save_graph_module(capture(_vit().eval()), tmp_path)
    original = (tmp_path / "graph.json").read_text()
    for change in [lambda n: n.update(op="get_attr", target="head", args=[], kwargs={}),
                   lambda n: n.update(op="call_method", target="reshape", args=["abc", 1], kwargs={})]:
        doc = json.loads(original)
        change(next(n for n in doc["nodes"] if n["op"] == "call_method"))
        (tmp_path / "graph.json").write_text(json.dumps(doc))
        with pytest.raises(LoadError):
            load_graph_module(tmp_path)
