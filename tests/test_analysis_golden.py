"""The analysis of every fx family gives the same description as before it moved onto the neutral op
graph (issue 11): ``inspect --json`` of each case is compared with a file written by the old analysis.

Regenerate (only when a change of the description is intended): ``VITPRUNE_REGENERATE_GOLDEN=1 python -m
pytest -q tests/test_analysis_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import vitprune
from conftest import FAMILIES

GOLDEN = Path(__file__).parent / "golden"


def _torchvision_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                             num_classes=10).eval()


def _case(name: str):
    """(model, example input) of a golden case."""
    torch.manual_seed(0)
    if name == "torchvision":
        return _torchvision_vit(), torch.randn(2, 3, 32, 32)
    family, _, method = name.partition("+")
    source, args = FAMILIES[family]
    model = vitprune.load(source, model_args=dict(args, depth=3) if method else args)
    size = args.get("img_size", 32)
    x = torch.randn(2, 3, size, size)
    if method == "token-drop":
        model, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.5, example_input=x)
    elif method == "importance-mask":
        model, _ = vitprune.rewrite(model, "importance-mask", keep={1: 0.5, 2: 0.5}, example_input=x,
                                     score="cls")  # the score the golden files were written with
    elif method == "lifespan-gather":
        model, _ = vitprune.rewrite(model, "lifespan-gather", flops=0.7, after_block=1, example_input=x,
                                     score="cls")
    return model, x


CASES = [*FAMILIES, "torchvision", "vit_cls+token-drop", "vit_cls+importance-mask", "vit_cls+lifespan-gather",
         "registers+importance-mask"]


@pytest.mark.parametrize("name", CASES)
def test_description_is_unchanged(name):
    model, x = _case(name)
    got = json.loads(json.dumps(vitprune.inspect_model(model, example_input=x).to_dict(), default=str))
    path = GOLDEN / f"inspect_{name.replace('+', '_')}.json"
    if os.environ.get("VITPRUNE_REGENERATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())
