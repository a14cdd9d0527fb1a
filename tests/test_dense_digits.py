"""examples/dense_digits.py: the segmentation data (labels, split, seeds), the mIoU metric and the model's
shape and traceability (no training here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_example


@pytest.fixture(scope="module")
def dd(one_thread):
    return load_example("dense_digits")


@pytest.fixture(scope="module")
def sources(dd):
    return dd.source_split(0)


def test_one_known_digit_is_labelled_on_its_strokes(dd, sources):
    digits, classes, _, _ = sources
    scan, cls = digits[0], int(classes[0])
    image, labels = dd.place_digits(scan[None], [cls], [20], [(10, 30)])
    ink = F.interpolate(torch.tensor(scan, dtype=torch.float32)[None, None] / 16, size=(20, 20), mode="bilinear",
                        align_corners=False)[0, 0]
    assert image.shape == labels.shape == (64, 64)
    assert set(labels.unique().tolist()) == {0, 1 + cls}
    box = labels[10:30, 30:50]
    assert torch.equal(box == 1 + cls, ink > dd.STROKE_THRESHOLD * ink.max())  # strokes, not the whole box
    assert 0 < int((box > 0).sum()) < 400
    outside = labels.clone()
    outside[10:30, 30:50] = 0
    assert not outside.any()
    assert image[labels > 0].min() > dd.STROKE_THRESHOLD * image.max() - 1e-6  # labelled pixels are bright
    assert float(image.sum() - image[10:30, 30:50].sum()) == 0.0  # nothing drawn outside the box


def test_a_later_digit_covers_an_earlier_one(dd, sources):
    digits, classes, _, _ = sources
    a, b = int(np.flatnonzero(classes == 3)[0]), int(np.flatnonzero(classes == 7)[0])
    _, labels = dd.place_digits(digits[[a, b]], [3, 7], [24, 24], [(0, 0), (8, 8)])
    _, alone_labels = dd.place_digits(digits[[b]], [7], [24], [(8, 8)])
    assert torch.equal(labels[8:32, 8:32], alone_labels[8:32, 8:32])  # the 7 owns its whole box
    assert (labels[:8] == 4).any() or (labels[:, :8] == 4).any()  # the 3 shows where the 7 does not cover it


def test_random_canvases_label_the_digits_they_draw(dd, sources, monkeypatch):
    drawn = []
    real = dd.place_digits

    def spy(digits, classes, sizes, positions, canvas=64):
        image, labels = real(digits, classes, sizes, positions, canvas)
        drawn.append((digits, classes, image, labels))
        return image, labels

    monkeypatch.setattr(dd, "place_digits", spy)
    x_train, y_train, x_test, y_test = dd.dense_digits_split(0, train_images=6, test_images=6)
    assert x_train.shape == (6, 3, 64, 64) and y_train.shape == (6, 64, 64) and y_train.dtype == torch.long
    assert x_test.shape == (6, 3, 64, 64) and y_test.shape == (6, 64, 64)
    assert x_train.min() >= -1 and x_train.max() <= 1 and torch.equal(x_train[:, 0], x_train[:, 2])
    for i, (digits, classes, image, labels) in enumerate(drawn):
        assert 2 <= len(classes) <= 4
        assert torch.equal(labels, (y_train if i < 6 else y_test)[i % 6])
        assert set(labels.unique().tolist()) <= {0, *(1 + c for c in classes)}
        noisy = ((x_train if i < 6 else x_test)[i % 6, 0] + 1) / 2
        assert (noisy - image).abs().max() < 0.5  # the stored canvas is this drawing plus mild noise
    # the split: train canvases draw only train digits, test canvases only test digits
    train_src, _, test_src, _ = sources
    train_set, test_set = {d.tobytes() for d in train_src}, {d.tobytes() for d in test_src}
    assert len(train_set) == 1347 and len(test_set) == 450 and not train_set & test_set
    for i, (digits, _, _, _) in enumerate(drawn):
        assert {d.tobytes() for d in digits} <= (train_set if i < 6 else test_set)


def test_the_split_is_stratified_and_disjoint(dd, sources):
    train_src, train_cls, test_src, test_cls = sources
    assert np.bincount(test_cls).min() >= 43 and np.bincount(train_cls).min() >= 130
    assert not {d.tobytes() for d in train_src} & {d.tobytes() for d in test_src}


def test_the_seed_decides_the_canvases(dd):
    a = dd.dense_digits_split(0, train_images=4, test_images=3)
    b = dd.dense_digits_split(0, train_images=4, test_images=3)
    c = dd.dense_digits_split(1, train_images=4, test_images=3)
    more_train = dd.dense_digits_split(0, train_images=5, test_images=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])
    assert torch.equal(a[2], more_train[2]) and torch.equal(a[3], more_train[3])  # test canvases kept
    assert torch.equal(a[0], more_train[0][:4])


def test_segmentation_miou_by_hand(dd):
    labels = torch.tensor([[[0, 0, 1], [1, 2, 2]]])  # [1, 2, 3]; classes 3 and up absent from both
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    # class 0: inter 1 (pixel 0), union 3 (pixels 0, 1, 5) -> 1/3; class 1: inter 2, union 3 -> 2/3;
    # class 2: inter 1, union 2 -> 1/2; classes 3..10: union 0, excluded
    scores = dd.segmentation_miou(pred, labels, num_classes=11)
    assert scores["per_class"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert scores["per_class"][3:] == [None] * 8
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_acc"] == pytest.approx(4 / 6)
    # logits give the same as their argmax; images are pooled, not averaged per image
    logits = F.one_hot(pred, 11).permute(0, 3, 1, 2).float()
    assert dd.segmentation_miou(logits, labels) == scores
    two = dd.segmentation_miou(torch.cat([pred, labels]), torch.cat([labels, labels]))
    assert two["per_class"][0] == pytest.approx(3 / 5)  # (1 + 2) / (3 + 2)


def test_the_model_traces_and_gives_per_pixel_logits(dd, tmp_path):
    import vitprune

    model = dd.build_model(0).eval()
    traced = torch.fx.symbolic_trace(model)
    for batch in (1, 3):
        x = torch.rand(batch, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            out = model(x)
            assert out.shape == (batch, 11, 64, 64)
            assert torch.equal(traced(x), out)
            tokens = model.vit.forward_features(x)[:, model.vit.num_prefix_tokens:]
            patch_logits = model.head(tokens).reshape(batch, 16, 16, 11).permute(0, 3, 1, 2)
            reference = F.interpolate(patch_logits, size=(64, 64), mode="bilinear", align_corners=False)
            assert torch.allclose(out, reference, atol=1e-5)
    vitprune.save(model, tmp_path / "dense")  # the serializer's allowlist covers every op
    again = vitprune.load(tmp_path / "dense")
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
