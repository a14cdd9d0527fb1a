"""The DINOv2-style dense stand-in of ``examples/dinov2_dense.py`` (untrained here: its shape, not its weights):
what the issue-27 benchmark relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitprune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import dinov2_dense  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def standin():
    return dinov2_dense.build_model()


def test_the_standin_resamples_its_stored_position_embedding_and_its_decoder_is_20_to_35_percent_of_the_flops(standin):
    emb = standin.encoder.embeddings
    assert emb.position_embeddings.shape == (1, 1 + 24 * 24, 64)  # stored for a larger grid than the 16x16 used
    calls = []
    original = F.interpolate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mode"))
        return original(*args, **kwargs)

    x = torch.randn(2, 3, 64, 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "interpolate", spy)
        with torch.no_grad():
            out = standin(x)
    assert out.shape == (2, 11, 64, 64) and "bicubic" in calls
    assert standin.up1.out_channels == dinov2_dense.NUM_PATCHES == 256  # a channel count equal to the patch count
    flops = dinov2_dense.decoder_flops_share(standin)
    assert 0.20 <= flops["share"] <= 0.35 and flops["decoder"] == 56_623_104


def test_the_standin_is_a_dense_cls_model_and_a_nearest_restore_rewrite_is_exact_with_every_token_kept(standin):
    x = torch.randn(2, 3, 64, 64)
    vit = vitprune.inspect_model(standin, example_input=x)
    assert (vit.num_patches, vit.prefix_tokens, vit.readout.kind) == (256, ["cls"], "tokens")
    _, report = vitprune.rewrite(standin, "token-drop", example_input=x, keep_rate=0.5, at_inference=True,
                                 selection="distinct", restore="nearest")
    assert report.keep_all_worst_node_diff <= 1e-6 and report.keep_all_max_abs_diff <= 1e-6
    assert report.decisions["token_restore"]["restore"] == "nearest"


def test_a_rewrite_of_the_standin_saves_without_pickle_and_loads_back_computing_the_same(standin, tmp_path):
    """The fine-tune and every consumer reload a saved rewrite: the stand-in's bicubic position resample and
    ConvTranspose decoder must be on the allowlist of the pickle-free format."""
    x = torch.randn(3, 3, 64, 64)
    rewritten, _ = vitprune.rewrite(standin, "token-drop", example_input=x[:2], keep_rate=0.5, at_inference=True,
                                    selection="distinct")
    path = vitprune.save(rewritten, tmp_path / "standin")
    loaded = vitprune.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), rewritten(x), atol=0.0, rtol=0.0)
