"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this imports as ``common``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn.functional as F

import vitprune

ROOT = Path(__file__).resolve().parents[1]


def load_example() -> ModuleType:
    """``examples/digits.py`` as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`vitprune.io.outputs.atomic_file`), making its folder."""
    from vitprune.io.outputs import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_results(out: Path, result: dict, markdown: str) -> None:
    """``out.json`` (the numbers) and ``out.md`` (the table), each written atomically; prints the table."""
    import json

    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown)
    print(markdown)


def token_drop_keep_count(model: torch.nn.Module, target: float, example_input: torch.Tensor,
                          ratios: dict[int, float] | None = None, selection: str = "random", **restore: Any) -> int:
    """Keep count ``k`` whose token-drop-at-inference FLOPs ratio (the rewrite report's, with ``selection``'s
    own cost and the ``restore`` rule's, e.g. ``restore="nearest"``) is closest to ``target``: bisection over
    ``k`` in ``1..P``. ``ratios`` caches measured ratios by ``k`` across calls (for one selection and rule)."""
    ratios = {} if ratios is None else ratios
    num_patches = vitprune.inspect_model(model, example_input=example_input).num_patches

    def ratio(k: int) -> float:
        if k not in ratios:
            _, rep = vitprune.rewrite(model, "token-drop", example_input=example_input, keep_rate=k / num_patches,
                                      at_inference=True, selection=selection, **restore)
            ratios[k] = rep.flops_ratio
        return ratios[k]

    lo, hi = 1, num_patches  # smallest k with ratio(k) >= target lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ratio(mid) >= target else (mid + 1, hi)
    return min({max(1, lo - 1), lo}, key=lambda k: abs(ratio(k) - target))


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(n for ptr, n in storages.items() if ptr not in params)  # weights are not activations


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None], Any]:
    """One training step (forward, cross-entropy, backward, AdamW) on a fixed batch, and its optimizer."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, opt
