"""Shared helpers: small real models of each family, and running the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vitprune

# Small configurations of the families the analysis supports (a few blocks, small inputs).
FAMILIES = {
    "vit_cls": ("timm:vit_small_patch16_224", dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)),
    "deit_distilled": ("timm:deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=4, depth=2)),
    "registers": ("timm:vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2)),
    "gap": ("timm:vit_small_patch16_224",
            dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, class_token=False, global_pool="avg")),
    "dinov2": ("timm:vit_small_patch14_dinov2", dict(img_size=56, depth=2)),
}


# The same families at their real 224x224 size (FLOPs targets need realistic token counts).
FAMILIES_224 = {
    "vit_small": ("timm:vit_small_patch16_224", {}),
    "deit_distilled": ("timm:deit_tiny_distilled_patch16_224", {}),
    "registers": ("timm:vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    "gap": ("timm:vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "dinov2": ("timm:vit_small_patch14_dinov2", {"img_size": 224}),
}


def rewrite_family(family: str, method: str, **params):
    """A FAMILIES_224 model (seeded) rewritten by ``method``; returns ``(rewritten, report)``."""
    source, args = FAMILIES_224[family]
    torch.manual_seed(0)
    return vitprune.rewrite(vitprune.load(source, model_args=args), method, **params)


def load_example(name: str):
    """``examples/NAME.py`` imported as a module (the examples are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"{name}_example", Path(__file__).parents[1] / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_model(family: str) -> torch.nn.Module:
    source, args = FAMILIES[family]
    torch.manual_seed(0)
    return vitprune.load(source, model_args=args)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (the suite's heavier modules; restores the count after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m vitprune ARGS`` in a subprocess, as a user's shell would."""
    return subprocess.run([sys.executable, "-m", "vitprune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture
def cli_inprocess(capfd):
    """Run the CLI entry point in this process; returns (exit code, stdout, stderr)."""
    from vitprune.cli.main import main

    def run(*args: str):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out, err = capfd.readouterr()
        return exit_info.value.code, out, err

    return run


def write_model_files(folder, model: torch.nn.Module) -> None:
    """The model files users hand vitprune, good and bad: ``pickled.pt`` (whole module), ``state.pt``,
    ``weights.safetensors``, ``truncated.safetensors`` (half of it) and ``corrupt.pt`` (not a checkpoint)."""
    from safetensors.torch import save_file

    torch.save(model, folder / "pickled.pt")
    torch.save(model.state_dict(), folder / "state.pt")
    save_file(model.state_dict(), str(folder / "weights.safetensors"))
    data = (folder / "weights.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.pt").write_bytes(b"this is not a checkpoint" * 10)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    """One folder per test session for the exported ONNX models (``onnx_fixtures.cached_onnx``): each file
    is exported once and read by every test that needs it."""
    return tmp_path_factory.mktemp("onnx-models")
