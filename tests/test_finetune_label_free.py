"""Label-free fine-tuning (``vitprune finetune --no-labels``): a rewritten classifier and a dense model learn
from their teacher on folders of unlabelled images; the per-pixel KL by hand; the CLI and its one-line refusals.

Real digits (``examples/digits.py``) as PNGs: 200 in one flat folder (training), 100 in class folders whose
names a label-free run ignores (validation). Tiny ViTs (64 patches of 4x4, width 64, 2 blocks); one torch thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import vitprune
from conftest import load_example
from vitprune.train.data import ImageFiles, eval_transform
from vitprune.train.finetune import distillation_loss, distillation_loss_for, make_teacher, sharded_agreement

ROOT = Path(__file__).resolve().parent.parent
ARCH = "timm:vit_small_patch16_224"
ARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)
CLI_ARGS = [a for k, v in ARGS.items() for a in ("--model-arg", f"{k}={v}")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """``flat/``: 200 digit PNGs, no sub-folders; ``val/``: 100 more in ``val/<digit>/`` (names ignored here)."""
    example = load_example("digits")
    root = tmp_path_factory.mktemp("digits")
    example.write_image_folders(root, max_train=200, max_val=100)
    (root / "flat").mkdir()
    for png in sorted((root / "train").glob("*/*.png")):
        png.rename(root / "flat" / f"{png.parent.name}-{png.name}")
    assert len(list((root / "flat").iterdir())) == 200 and all(p.is_file() for p in (root / "flat").iterdir())
    return root


def token_drop_classifier() -> nn.Module:
    """A 10-class ViT rewritten to keep a quarter of its patch tokens (random selection) at inference too.

    Its head is drawn at std 0.2: timm's 0.02 makes a random ViT's logits ~0, every class distribution
    near uniform and the KL to the teacher ~1e-4, which leaves distillation nothing to fit."""
    torch.manual_seed(0)
    original = vitprune.load(ARCH, model_args=ARGS)
    with torch.no_grad():
        original.head.weight.normal_(0.0, 0.2)
    model, _ = vitprune.rewrite(original, "token-drop", keep_rate=0.25, at_inference=True)
    return model


@pytest.fixture(scope="module")
def token_drop_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "td"
    vitprune.save(token_drop_classifier(), path)
    return path


class TinyDense(nn.Module):
    """A dense model: a ViT without head or pooling, a per-token linear layer to ``K`` logits (drawn at std 0.5, so
    pixels' class distributions are far from uniform), the patch tokens laid back on their grid:
    ``[B, 3, 32, 32] -> [B, K, 8, 8]``."""

    def __init__(self, seed: int, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                     embed_dim=64, depth=2, num_heads=2, num_classes=0, global_pool="")
        self.head = nn.Linear(64, classes)
        nn.init.normal_(self.head.weight, 0.0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.vit.forward_features(x)[:, 1:])  # [B, 64, K]
        return logits.transpose(1, 2).reshape(x.shape[0], -1, 8, 8)


def val_batch(images: Path, n: int = 50) -> torch.Tensor:
    ds = ImageFiles(images / "val", eval_transform((3, 32, 32)))
    return torch.stack([ds[i][0] for i in range(n)])


# -- the loss ----------------------------------------------------------------------------------------------


def test_distillation_loss_by_output_kind_matches_a_hand_computation():
    s = torch.tensor([[[[1.0, -2.0]], [[0.0, 0.5]], [[3.0, 1.0]]]])  # [B=1, K=3, H=1, W=2]
    t = torch.tensor([[[[0.2, 0.0]], [[1.0, 0.0]], [[-1.0, 2.0]]]])
    temp = 2.0

    def softmax(v):
        e = [math.exp(a / temp) for a in v]
        return [a / sum(e) for a in e]

    per_pixel = []
    for w in range(2):
        p, q = softmax([t[0, k, 0, w].item() for k in range(3)]), softmax([s[0, k, 0, w].item() for k in range(3)])
        per_pixel.append(sum(pk * math.log(pk / qk) for pk, qk in zip(p, q)))
    hand = temp ** 2 * sum(per_pixel) / 2
    assert distillation_loss_for(s, t, temp).item() == pytest.approx(hand, rel=1e-5)
    assert distillation_loss_for(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)

    logits_s, logits_t = s[..., 0, 0], t[..., 0, 0]  # [1, 3]: the classification rule, unchanged
    assert torch.equal(distillation_loss_for(logits_s, logits_t, temp), distillation_loss(logits_s, logits_t, temp))
    feats_s, feats_t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)  # [1, N=2, C=3]: no softmax
    mse = ((feats_s - feats_t) ** 2).mean().item()
    assert distillation_loss_for(feats_s, feats_t, temp).item() == pytest.approx(mse)
    assert torch.equal(distillation_loss_for((s, "extra"), {"logits": t}, temp), distillation_loss_for(s, t, temp))
    with pytest.raises(vitprune.VitpruneError, match="same shape"):
        distillation_loss_for(s, t[:, :2], temp)


class Scale(nn.Module):
    """``factor · x``: dense logits ``[B, C, H, W]``, or with ``flatten`` token features ``[B, C, H·W]``."""

    def __init__(self, factor: float, flatten: bool = False) -> None:
        super().__init__()
        self.factor, self.flatten = factor, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * (x.flatten(2) if self.flatten else x)


def test_agreement_metrics_by_output_kind():
    images = [(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(i)), -1) for i in range(6)]
    dense = sharded_agreement(Scale(1.0), Scale(-1.0), contextlib.nullcontext, images, 4, 1.0)  # [B, 3, 4, 4]
    assert dense["val_agreement"] == 0.0 and dense["val_cosine"] == pytest.approx(-1.0)  # argmax vs argmin, per pixel
    dense = sharded_agreement(Scale(1.0), Scale(2.0), contextlib.nullcontext, images, 4, 1.0)
    assert dense["val_agreement"] == 1.0 and dense["val_cosine"] == pytest.approx(1.0) and dense["val_images"] == 6
    features = sharded_agreement(Scale(1.0, True), Scale(2.0, True), contextlib.nullcontext, images, 4, 1.0)
    mse = sum(((x.flatten(1) - 2 * x.flatten(1)) ** 2).mean().item() for x, _ in images) / 6  # [B, 3, 16]: MSE
    assert features["val_agreement"] is None and features["val_cosine"] == pytest.approx(1.0)
    assert features["val_distill"] == pytest.approx(mse, rel=1e-5)


# -- fine-tuning -------------------------------------------------------------------------------------------


def test_label_free_run_distils_a_token_drop_classifier(images, tmp_path):
    model = token_drop_classifier()
    teacher, keep_all = make_teacher(model)  # the original model
    val = ImageFiles(images / "val", eval_transform((3, 32, 32)), "--val")
    before = sharded_agreement(model, teacher, keep_all, val, 32, 1.0)  # as the run measures: same batches, seed

    result = vitprune.finetune(model, images / "flat", tmp_path / "run", val=images / "val", labels=False,
                               epochs=2, batch_size=32, lr=1e-4, warmup_epochs=0.2)
    first, last = result.history[0], result.history[-1]
    assert last["train_distill"] < first["train_distill"] and last["train_loss"] == last["train_distill"]
    assert first["train_ce"] is None and first["train_top1"] is None and first["train_images"] == 200
    after = sharded_agreement(result.model, teacher, keep_all, val, 32, 1.0)
    assert after["val_distill"] < before["val_distill"]
    # the KL falls on both stacks (torch 2.14: 0.061 -> 0.027; torch 2.11 / timm 1.0.20: 0.049 -> 0.031); top-1
    # agreement with a random teacher is its argmax noise (0.87 -> 0.98; 0.67 -> 0.57): far above chance only
    assert after["val_distill"] < 0.75 * before["val_distill"] and after["val_cosine"] > before["val_cosine"]
    assert after["val_agreement"] > 0.5  # 10 classes: chance is 0.1
    assert last["val_images"] == 100 and last["val_agreement"] == after["val_agreement"]
    assert last["val_distill"] == pytest.approx(after["val_distill"], rel=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    saved = vitprune.load(tmp_path / "run" / "model")
    assert "classes" not in saved.meta["vitprune"]  # no class folders were read: no class names recorded
    assert saved.meta["vitprune"]["report"]["finetune"]["config"]["labels"] is False


def test_label_free_run_distils_a_dense_model_and_resumes(images, tmp_path):
    student, teacher = TinyDense(seed=0), TinyDense(seed=1)
    x = val_batch(images)
    with torch.no_grad():
        s, t = student.eval()(x), teacher.eval()(x)
        before, agreed = distillation_loss_for(s, t, 1.0).item(), (s.argmax(1) == t.argmax(1)).float().mean().item()
    options = dict(val=images / "val", teacher=teacher, labels=False, input_size=(3, 32, 32), epochs=2,
                   batch_size=32, lr=1e-3, warmup_epochs=0.2)
    result = vitprune.finetune(student, images / "flat", tmp_path / "run", **options)
    with torch.no_grad():
        out = result.model(x)
        after = distillation_loss_for(out, teacher(x), 1.0).item()
        agree = (out.argmax(1) == teacher(x).argmax(1)).float().mean().item()  # per pixel
    # two random models agree on ~0.4 (torch 2.14) to ~0.6 (torch 2.11, timm 1.0.20 init) of the pixels
    assert list(out.shape) == [50, 5, 8, 8] and after < 0.1 * before and agree > max(agreed, 0.8)
    first, last = result.history
    assert last["train_distill"] < first["train_distill"] and last["val_distill"] < first["val_distill"]
    assert last["val_agreement"] > max(agreed, 0.8) and 0 < last["val_cosine"] <= 1
    assert torch.equal(vitprune.load(tmp_path / "run" / "model")(x), out)  # saved and reloaded: the same model

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "epoch-0002")  # as if killed during epoch 2
    again = vitprune.finetune(student, images / "flat", tmp_path / "run", resume=True, **options)
    assert again.resumed_from == 1
    a, b = result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_distill"] for h in again.history] == [h["train_distill"] for h in result.history]


# -- command line ------------------------------------------------------------------------------------------


def test_cli_no_labels_on_a_flat_folder(images, token_drop_dir, tmp_path, cli_inprocess):
    code, out, err = cli_inprocess("finetune", token_drop_dir, "--data", images / "flat", "--val", images / "val",
                                   "--no-labels", "--epochs", 1, "--batch-size", 64, "-o", tmp_path / "run")
    assert code == 0, err
    assert "label-free distillation" in err and "val cos" in out.splitlines()[0]
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < metrics["val_cosine"] <= 1 and 0 <= metrics["val_agreement"] <= 1 and metrics["train_distill"] > 0


@pytest.mark.parametrize("model, extra, says", [
    ("td", ["--no-distill"], "--no-distill"),
    (ARCH, CLI_ARGS, "--teacher"),  # no token modules: the model would be its own teacher
])
def test_cli_no_labels_refusals_are_one_line(images, token_drop_dir, tmp_path, cli_inprocess, model, extra, says):
    code, out, err = cli_inprocess("finetune", token_drop_dir if model == "td" else model, *extra, "--no-labels",
                                   "--data", images / "flat", "--epochs", 1, "-o", tmp_path / "run")
    assert code != 0 and out == "" and err.startswith("vitprune: error:") and err.count("\n") == 1, err
    assert says in err and "Traceback" not in err and not (tmp_path / "run").exists()
