"""Run passes in order, re-analysing the graph before each, and name the passes run before a failure."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from vitprune.graph.analysis import ViTGraph, analyse
from vitprune.errors import PassError, VitpruneError
from vitprune.frontends.export import is_exported, respecialise_token_literals
from vitprune.passes.base import PASSES, VitPass
from vitprune.passes.token_positions import follow_kept_tokens


def make_pass(name: str, **params: Any) -> VitPass:
    """Instantiate the registered pass ``name``.

    Raises:
        PassError: unknown pass name (the message lists the known ones).
    """
    if name not in PASSES:
        raise PassError(f"unknown method {name!r}; known: {', '.join(sorted(PASSES))}")
    return PASSES[name](**params)


def run_passes(
    gm: fx.GraphModule, passes: list[VitPass], example_input: torch.Tensor
) -> tuple[fx.GraphModule, list[ViTGraph]]:
    """Run ``passes`` on ``gm`` in place.

    Before each pass the graph is analysed again (an earlier pass may have changed it) and the pass's
    needs are checked against that analysis.

    Returns:
        ``(gm, analyses)``: the rewritten module and the analysis each pass saw, in order.

    Raises:
        PassError: a pass refused (its needs do not hold) or failed; the message names the pass and
            the passes run before it.
    """
    done = ["capture", "analyse"]
    seen: list[ViTGraph] = []
    for p in passes:
        try:
            p.analysis = analyse(gm, example_input)
            p.example_input = example_input
            seen.append(p.analysis)
            result = p(gm)
        except VitpruneError as exc:
            raise PassError(f"pass {p.name!r} (after {' -> '.join(done)}) refused: {exc}") from exc
        except Exception as exc:  # a bug in the pass: keep the traceback, add where it happened
            raise RuntimeError(f"pass {p.name!r} failed after {' -> '.join(done)}") from exc
        if isinstance(result, PassResult):
            gm = result.graph_module
        if p.restores_tokens:  # dense readers get every token back, token-indexed tensors follow the kept ones
            try:
                followed = follow_kept_tokens(gm, p.analysis, p.params.get("restore", "last"))
            except VitpruneError as exc:
                raise PassError(f"pass {p.name!r} (after {' -> '.join(done)}) refused: {exc}") from exc
            p.record.update(followed or {})
        if is_exported(gm):  # aten graphs bake the token count into shape literals
            try:
                respecialise_token_literals(gm, p.analysis.num_tokens)
            except VitpruneError as exc:
                raise PassError(f"pass {p.name!r} (after {' -> '.join(done)}) refused: {exc}") from exc
        done.append(p.name)
    return gm, seen
