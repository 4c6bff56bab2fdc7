"""Fine-tuning and evaluation (Flower-free): metrics, k-fold sampling, encoder transfer, training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fcl_flower.config import load_config
from fcl_flower.finetune import (
    LabeledVolume, augment_batch, average_weights, build_finetune_unet, dice_per_class, evaluate_volumes,
    fold_splits, hd95_per_class, initial_unet_weights, local_finetune, overlay_examples, predict_volume,
    replace_encoder, set_unet_weights, summarise_volume, train_segmentation, training_samples, unet_weights,
    volume_diagonal_mm, write_overlay_png,
)
from fcl_flower.models import build_encoder, build_unet, load_encoder, save_encoder

torch.set_num_threads(1)
TINY = [
    "model.channels=[8,16,32]", "model.proj_hidden=16", "model.proj_dim=8", "finetune.batch_size=4",
    "finetune.folds=2", "finetune.local_steps=4", "finetune.lr=0.01",
]


def _cfg(*overrides: str):
    return load_config([*TINY, *overrides])


def toy_heart(seed: int, depth: int = 4, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A (Z, H, W) image and label: LV disk (3) in a myocardial ring (2), RV crescent (1) beside it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    label = np.zeros((depth, size, size), np.uint8)
    cy, cx = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    for z in range(depth):
        r = size * (0.18 - 0.02 * z) * rng.uniform(0.9, 1.1)
        d = np.hypot(yy - cy, xx - cx)
        rv = np.hypot(yy - cy, xx - (cx - 1.3 * r)) < 1.5 * r
        label[z][rv & (d >= 1.5 * r)] = 1
        label[z][d < 1.5 * r] = 2
        label[z][d < r] = 3
    intensity = np.array([0.1, 0.8, 0.3, 0.9], np.float32)[label]
    image = intensity + 0.05 * rng.standard_normal(label.shape).astype(np.float32)
    return image.astype(np.float32), label


def toy_site(patients: int = 4, seed: int = 0) -> list[LabeledVolume]:
    out = []
    for p in range(patients):
        for f, frame in enumerate(("ED", "ES")):
            image, label = toy_heart(seed * 1000 + 10 * p + f)
            out.append(LabeledVolume(image, label, f"patient{p:03d}", (5.0, 1.5, 1.5), f"patient{p:03d}_{frame}"))
    return out


# ---------------------------------------------------------------- metrics


def test_dice_hand_computed_per_class_and_mean() -> None:
    label = np.zeros((2, 6, 6), np.int64)
    pred = np.zeros_like(label)
    label[0, 0:2, 0:2] = 1  # 4 voxels
    pred[0, 0:2, 0:1] = 1  # 2 voxels, all inside: dice = 2*2 / (2+4) = 2/3
    label[1, 2:5, 2:5] = 2  # 9 voxels
    pred[1, 2:5, 2:5] = 2  # perfect: 1
    label[0, 4:6, 4:6] = 3  # 4 voxels, predicted as class 1 -> class 3 dice 0, class 1 gets 4 false positives
    pred[0, 4:6, 4:6] = 1
    dice = dice_per_class(pred, label, 4)
    # class 1: intersection 2, |pred| = 2 + 4 = 6, |gt| = 4 -> 4 / 10
    np.testing.assert_allclose(dice, [0.4, 1.0, 0.0], atol=1e-6)
    summary = summarise_volume(pred, label, 4, (1.0, 1.0, 1.0))
    assert summary["dice"] == pytest.approx((0.4 + 1.0 + 0.0) / 3)
    assert (summary["dice_rv"], summary["dice_myo"], summary["dice_lv"]) == pytest.approx((0.4, 1.0, 0.0))


def test_dice_absent_class_is_left_out_of_the_mean() -> None:
    label = np.zeros((1, 4, 4), np.int64)
    label[0, :2, :2] = 3
    summary = summarise_volume(label.copy(), label, 4, (1.0, 1.0, 1.0))
    assert np.isnan(summary["dice_rv"]) and np.isnan(summary["dice_myo"])
    assert summary["dice"] == 1.0 and summary["dice_lv"] == 1.0


def test_hd95_hand_computed_with_spacing() -> None:
    label = np.zeros((4, 5, 5), np.int64)
    pred = np.zeros_like(label)
    label[0, 2, 2] = 1
    pred[3, 2, 2] = 1  # 3 slices apart at 2.5 mm
    pred[0, 2, 2] = 2  # class 2 only in the prediction: inf
    hd = hd95_per_class(pred, label, 4, (2.5, 1.0, 1.0))
    assert hd[0] == pytest.approx(7.5)
    assert np.isinf(hd[1]) and np.isnan(hd[2])
    summary = summarise_volume(pred, label, 4, (2.5, 1.0, 1.0))
    assert summary["hd95_myo"] == pytest.approx(volume_diagonal_mm((4, 5, 5), (2.5, 1.0, 1.0)))  # charged, not dropped
    # a 3x3 square shifted by two columns: surface distances 0 (shared rows/columns) up to 2
    label2 = np.zeros((1, 8, 8), np.int64)
    pred2 = np.zeros_like(label2)
    label2[0, 2:5, 2:5] = 1
    pred2[0, 2:5, 4:7] = 1
    assert hd95_per_class(pred2, label2, 2, (1.0, 1.0, 1.0))[0] == pytest.approx(2.0)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="MONAI's HausdorffDistanceMetric needs scipy")
def test_hd95_equals_monai_when_scipy_is_there() -> None:
    from monai.metrics import HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    image, label = toy_heart(1)
    _, pred = toy_heart(2)
    metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    ref = metric(one_hot(torch.tensor(pred)[None, None].long(), 4, dim=1),
                 one_hot(torch.tensor(label)[None, None].long(), 4, dim=1), spacing=[5.0, 1.5, 1.5])[0].numpy()
    np.testing.assert_allclose(hd95_per_class(pred, label, 4, (5.0, 1.5, 1.5)), ref, rtol=1e-5)


# ---------------------------------------------------------------- splits as local fine-tuning uses them


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_kfold_sampling_labeled_within_train_and_each_patient_tested_once(n: int) -> None:
    cfg = _cfg("finetune.folds=5")
    patients = [f"patient{i:03d}" for i in range(10)]
    splits = fold_splits(patients, cfg, n)
    assert len(splits) == 5
    tested = [p for s in splits for p in s.test]
    assert sorted(tested) == patients  # every patient is tested exactly once
    for s in splits:
        assert len(s.labeled) == n
        assert set(s.labeled) <= set(patients) - set(s.test)
    # nested budgets: N labeled patients are a subset of 2N's
    if n < 8:
        bigger = fold_splits(patients, cfg, 2 * n)
        assert all(set(a.labeled) <= set(b.labeled) for a, b in zip(splits, bigger))
    assert [s.fold for s in fold_splits(patients, _cfg("finetune.folds=5", "finetune.run_folds=2"), n)] == [0, 1]


# ---------------------------------------------------------------- encoder transfer


def test_pretrained_encoder_transfers_into_the_unet_and_decoder_is_fresh(tmp_path: Path) -> None:
    cfg = _cfg()
    encoder = build_encoder(cfg)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))  # "pre-trained": unlike any fresh initialisation
    save_encoder(encoder, tmp_path / "encoder.pt")
    loaded = load_encoder(cfg, tmp_path / "encoder.pt")
    model = build_unet(cfg)
    set_unet_weights(model, initial_unet_weights(cfg, loaded))
    for (name, a), b in zip(model.encoder.state_dict().items(), encoder.state_dict().values()):
        assert torch.equal(a, b), name
    # the decoder is the seeded fresh one, the same whatever the encoder
    other = build_unet(cfg)
    set_unet_weights(other, initial_unet_weights(cfg, build_encoder(cfg)))
    for a, b in zip(model.decoder.state_dict().values(), other.decoder.state_dict().values()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(), other.encoder.state_dict().values()))
    # random init: a different, fully random U-Net; same seed, same network
    rand1, rand2 = initial_unet_weights(cfg, None), initial_unet_weights(cfg, None)
    assert all(np.array_equal(a, b) for a, b in zip(rand1, rand2))
    # replace_encoder swaps the encoder and keeps the decoder
    swapped = build_unet(cfg)
    set_unet_weights(swapped, replace_encoder(cfg, rand1, encoder))
    assert all(torch.equal(a, b) for a, b in zip(swapped.encoder.state_dict().values(), encoder.state_dict().values()))
    fresh = build_unet(cfg)
    set_unet_weights(fresh, rand1)
    assert all(torch.equal(a, b) for a, b in zip(swapped.decoder.state_dict().values(), fresh.decoder.state_dict().values()))


def test_average_weights_is_weighted_and_keeps_dtypes() -> None:
    a = [np.array([0.0, 2.0], np.float32), np.array(2, np.int64)]
    b = [np.array([3.0, 5.0], np.float32), np.array(4, np.int64)]
    avg = average_weights([a, b], [2, 1])
    np.testing.assert_allclose(avg[0], [1.0, 3.0])
    assert avg[0].dtype == np.float32 and avg[1].dtype == np.int64 and avg[1] == 3


# ---------------------------------------------------------------- training and prediction


def test_training_samples_and_augmentation_shapes() -> None:
    vols = toy_site(2)
    x, y = training_samples(vols, 2, 3)
    assert x.shape == (16, 1, 32, 32) and y.shape == (16, 1, 32, 32) and y.dtype == torch.int64
    x3, y3 = training_samples(vols, 3, 3)
    assert x3.shape == (16, 1, 3, 32, 32)
    assert torch.equal(x3[0, 0, 1], x[0, 0]) and torch.equal(x3[0, 0, 0], x[0, 0])  # centre slice; edge replicated
    cfg = _cfg()
    g = torch.Generator().manual_seed(0)
    for xs, ys in ((x, y), (x3, y3)):
        xa, ya = augment_batch(xs[:4], ys[:4], cfg.finetune.augment, g)
        assert xa.shape == xs[:4].shape and ya.dtype == torch.int64
        assert set(ya.unique().tolist()) <= {0, 1, 2, 3}


def test_finetuning_loss_decreases_and_is_deterministic() -> None:
    cfg = _cfg("finetune.augment.rotate_deg=0", "finetune.augment.scale=0")
    vols = toy_site(2)
    start = initial_unet_weights(cfg, None)
    model = build_finetune_unet(cfg, None, 0)
    set_unet_weights(model, start)
    result = train_segmentation(model, vols, cfg, steps=40, seed=1)
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    assert result.samples == 16
    again = build_unet(cfg)
    set_unet_weights(again, start)
    result2 = train_segmentation(again, vols, cfg, steps=40, seed=1)
    assert result2.losses == result.losses
    pred = predict_volume(model, vols[0].image, 2, 3)
    assert pred.shape == vols[0].label.shape and pred.dtype == np.int64
    scores = evaluate_volumes(model, vols[:2], cfg)
    assert scores.mean["dice"] > 0.3 and len(scores.volumes) == 2


def test_freeze_encoder_trains_the_decoder_only() -> None:
    cfg = _cfg("finetune.freeze_encoder=true")
    vols = toy_site(2)
    model = build_finetune_unet(cfg, None, 0)
    encoder_before = [p.detach().clone() for p in model.encoder.parameters()]
    decoder_before = [p.detach().clone() for p in model.decoder.parameters()]
    result = train_segmentation(model, vols, cfg, steps=5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, model.decoder.parameters()))
    assert np.isfinite(result.losses).all()
    # without the flag the same call moves the encoder too
    model = build_finetune_unet(_cfg(), None, 0)
    train_segmentation(model, vols, _cfg(), steps=5, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()))


def test_frozen_encoder_steps_warm_up_the_decoder_then_train_everything() -> None:
    """LP-FT: the encoder (and its BatchNorm statistics) is untouched for the first K steps, counted
    from ``first_step`` so that a federated round continues the count; afterwards it trains."""
    cfg = _cfg("finetune.frozen_encoder_steps=4", "model.norm=batch")
    vols = toy_site(2)

    def encoder_state(model) -> list[torch.Tensor]:
        return [t.detach().clone() for t in model.encoder.state_dict().values()]

    model = build_finetune_unet(cfg, None, 0)
    start, decoder_start = encoder_state(model), [p.detach().clone() for p in model.decoder.parameters()]
    train_segmentation(model, vols, cfg, steps=4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(start, encoder_state(model)))
    assert any(not torch.equal(a, b) for a, b in zip(decoder_start, model.decoder.parameters()))
    assert all(p.requires_grad for p in model.encoder.parameters())  # left trainable for whoever comes next
    # steps 2..5: two frozen, then two that move the encoder
    model = build_finetune_unet(cfg, None, 0)
    train_segmentation(model, vols, cfg, steps=4, seed=1, first_step=2)
    assert any(not torch.equal(a, b) for a, b in zip(start, encoder_state(model)))
    # a federated round past the warm-up trains the encoder from its first step
    model = build_finetune_unet(cfg, None, 0)
    train_segmentation(model, vols, cfg, steps=1, seed=1, first_step=4)
    assert any(not torch.equal(a, b) for a, b in zip(start, encoder_state(model)))


def test_local_finetune_kfold_cells_are_finite_and_reproducible() -> None:
    cfg = _cfg("finetune.local_steps=3")
    vols = toy_site(4)
    init = initial_unet_weights(cfg, None)
    seen: list[tuple[int, int, int]] = []

    def on_fold(n, fold, model, test, result) -> None:
        seen.append((n, fold, len(test)))
        assert len(result.predictions) == len(test)

    cells = local_finetune(vols, init, cfg, [1, 2], "site_00", on_fold=on_fold)
    assert sorted(cells) == [1, 2]
    for n, cell in cells.items():
        assert [f.fold for f in cell.folds] == [0, 1]
        assert all(len(f.labeled) == n and not set(f.labeled) & set(f.test) for f in cell.folds)
        assert np.isfinite(cell.metrics["dice"]) and np.isfinite(cell.metrics["hd95"])
        assert cell.metrics["dice"] == pytest.approx(np.mean([f.metrics["dice"] for f in cell.folds]))
    assert seen == [(1, 0, 4), (1, 1, 4), (2, 0, 4), (2, 1, 4)]
    again = local_finetune(vols, init, cfg, [1], "site_00")
    assert again[1].metrics == cells[1].metrics
    other_site = local_finetune(vols, init, cfg, [1], "site_01")
    assert other_site[1].metrics != cells[1].metrics  # seeds depend on the site


def test_3d_finetuning_runs() -> None:
    cfg = _cfg("data.spatial_dims=3", "data.slab_depth=3", "finetune.local_steps=2")
    vols = toy_site(4)
    cells = local_finetune(vols, initial_unet_weights(cfg, None), cfg, [1], "site_00")
    assert np.isfinite(cells[1].metrics["dice"])


def test_overlay_png(tmp_path: Path) -> None:
    vols = toy_site(1)
    examples = overlay_examples(vols, [v.label.astype(np.int64) for v in vols], 3)
    assert examples["image"].shape == (3, 32, 32) and len(examples["names"]) == 3
    png = write_overlay_png(examples, tmp_path / "o.png", "test", 4)
    assert png is not None and png.stat().st_size > 1000
    assert write_overlay_png({}, tmp_path / "none.png", "x", 4) is None


def test_unet_weights_roundtrip() -> None:
    cfg = _cfg()
    a = build_finetune_unet(cfg, None, 3)
    b = build_finetune_unet(cfg, None, 4)
    set_unet_weights(b, unet_weights(a))
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError):
        set_unet_weights(b, unet_weights(a)[:-1])
