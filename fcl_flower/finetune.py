"""Few-label segmentation fine-tuning and evaluation, Flower-free.

Stage 2 of Wu et al.: a U-Net whose encoder comes from contrastive pre-training (or is
random) and whose decoder starts fresh is trained with a handful of labeled patients,
then scored by Dice (and HD95) on held-out patients.

- ``initial_unet_weights``: the U-Net every site starts from (pre-trained encoder +
  decoder initialised from the seed, or a fully random U-Net).
- ``train_segmentation``: Adam on MONAI's ``DiceCELoss`` (softmax, one-hot labels)
  over 2D slices (or 3D slabs when ``data.spatial_dims = 3``), light augmentation.
- ``evaluate_volumes``: predictions stacked slice by slice into volumes, then MONAI's
  ``DiceMetric`` per foreground class per *volume* (3D Dice) and the 95 % Hausdorff
  distance in mm per class and volume (``hd95_per_class``).
- ``local_finetune``: one site alone, k-fold cross validation over its patients for
  every label budget N (train on N patients of the training folds, test on the held-out
  fold, average over folds), as in the paper.

Tensors in, tensors out: a site's labeled data is a list of ``LabeledVolume``; nothing
here imports Flower, reads config files or keeps state between calls.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from omegaconf import DictConfig
from torch import nn

from fcl_flower.data.splits import FoldSplit, kfold_splits
from fcl_flower.models import Encoder, UNet, build_unet, copy_arrays

ACDC_CLASS_NAMES = ("rv", "myo", "lv")  # label values 1, 2, 3 of ACDC


@dataclass(frozen=True)
class LabeledVolume:
    """One labeled volume of a site.

    Attributes:
        image: (Z, H, W) float32, preprocessed (resampled, cropped, normalised).
        label: (Z, H, W) integer class map, 0 = background, 1..C-1 foreground.
        patient: patient id (the unit of every split).
        spacing: (z, y, x) voxel size in mm, for HD95.
        name: e.g. ``patient001_frame01``, for overlays and logs.
    """

    image: np.ndarray
    label: np.ndarray
    patient: str
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    name: str = ""


def class_names(num_classes: int) -> tuple[str, ...]:
    """Foreground class names: ACDC's ``rv, myo, lv`` for 4 classes, else ``class1..``."""
    if num_classes == 4:
        return ACDC_CLASS_NAMES
    return tuple(f"class{c}" for c in range(1, num_classes))


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (site names, N, fold ...), the same in every process."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------- the network and its weights


def build_finetune_unet(cfg: DictConfig, encoder: Encoder | None, seed: int) -> UNet:
    """``UNet(encoder, fresh decoder)``; with ``encoder=None`` a fully random U-Net.

    Everything freshly initialised is drawn from ``seed`` alone (the global torch RNG is
    left untouched), so every site and fold starts from the same network.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_unet(cfg, encoder)


def unet_weights(model: nn.Module) -> list[np.ndarray]:
    """Every ``state_dict`` entry (parameters and buffers) in registration order, as numpy copies."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_unet_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Inverse of ``unet_weights``."""
    copy_arrays(list(model.state_dict().values()), weights, "U-Net")


def initial_unet_weights(cfg: DictConfig, encoder: Encoder | None) -> list[np.ndarray]:
    """The starting point of fine-tuning: ``encoder`` (or random) + a decoder drawn from ``cfg.seed``."""
    return unet_weights(build_finetune_unet(cfg, encoder, stable_seed(cfg.seed, "finetune-init")))


def replace_encoder(cfg: DictConfig, weights: Sequence[np.ndarray], encoder: Encoder) -> list[np.ndarray]:
    """U-Net ``weights`` with the encoder part replaced by ``encoder``'s weights (decoder kept)."""
    model = build_unet(cfg)
    set_unet_weights(model, weights)
    model.encoder.load_state_dict(encoder.state_dict())
    return unet_weights(model)


def average_weights(weight_lists: Sequence[Sequence[np.ndarray]], counts: Sequence[float]) -> list[np.ndarray]:
    """FedAvg: the ``counts``-weighted mean of each array, summed in the given order in float64.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are rounded back to their dtype.
    """
    if not weight_lists:
        raise ValueError("no weights to average")
    total = float(sum(counts))
    out = []
    for arrays in zip(*weight_lists):
        acc = np.zeros(np.shape(arrays[0]), dtype=np.float64)
        for a, n in zip(arrays, counts):
            acc += np.asarray(a, dtype=np.float64) * (float(n) / total)
        dtype = np.asarray(arrays[0]).dtype
        out.append(np.rint(acc).astype(dtype) if np.issubdtype(dtype, np.integer) else acc.astype(dtype))
    return out


# ---------------------------------------------------------------- training samples


def _slab_indices(depth: int, slab_depth: int) -> np.ndarray:
    """(depth, slab_depth) slice indices of the slab centred on each slice, edges replicated."""
    half = slab_depth // 2
    offsets = np.arange(slab_depth) - half
    return np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)


def training_samples(
    volumes: Sequence[LabeledVolume], spatial_dims: int, slab_depth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice (2D) or slab (3D) of the volumes, with its labels.

    Returns:
        2D: images (M, 1, H, W) float32 and labels (M, 1, H, W) int64, M = total slices.
        3D: images (M, 1, D, H, W) and labels (M, 1, D, H, W), one slab of ``slab_depth``
        slices centred on each slice (edge slices replicated).
    """
    if not volumes:
        raise ValueError("no labeled volumes to train on")
    images, labels = [], []
    for v in volumes:
        img = np.asarray(v.image, dtype=np.float32)
        lab = np.asarray(v.label, dtype=np.int64)
        if spatial_dims == 3:
            idx = _slab_indices(img.shape[0], slab_depth)
            img, lab = img[idx], lab[idx]  # (Z, D, H, W)
        images.append(torch.from_numpy(np.ascontiguousarray(img)))
        labels.append(torch.from_numpy(np.ascontiguousarray(lab)))
    return torch.cat(images).unsqueeze(1), torch.cat(labels).unsqueeze(1)


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, aug: DictConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random in-plane rotation + scaling (images bilinear, labels nearest) and intensity scaling.

    Args:
        x: (B, 1, H, W) or (B, 1, D, H, W) float images.
        y: labels of the same shape, int64.
        aug: ``finetune.augment`` (rotate_deg, scale, intensity_scale; 0 turns one off).
        generator: the torch generator all draws come from.

    Returns:
        The augmented (x, y), same shapes and dtypes. The slab axis is never transformed.
    """
    b = x.shape[0]
    if aug.rotate_deg > 0 or aug.scale > 0:
        angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(aug.rotate_deg)
        scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * aug.scale
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        zero = torch.zeros(b)
        if x.ndim == 4:
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        else:  # affine_grid's 3D coordinates are (x=W, y=H, z=D): leave z alone
            one = torch.ones(b)
            theta = torch.stack(
                [torch.stack([cos, -sin, zero, zero], 1), torch.stack([sin, cos, zero, zero], 1),
                 torch.stack([zero, zero, one, zero], 1)], 1,
            )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    if aug.intensity_scale > 0:
        gain = 1 + (torch.rand(b, generator=generator) * 2 - 1) * aug.intensity_scale
        x = x * gain.view(b, *([1] * (x.ndim - 1)))
    return x, y


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What one call of ``train_segmentation`` did."""

    losses: list[float]  # DiceCE loss of every step, in order
    steps: int
    samples: int  # slices (or slabs) available for training
    seconds: float

    @property
    def loss(self) -> float:
        """Mean loss over the last quarter of the steps (nan if none)."""
        tail = self.losses[-max(1, len(self.losses) // 4):]
        return float(np.mean(tail)) if tail else float("nan")


def segmentation_loss() -> DiceCELoss:
    """MONAI DiceCE on logits (N, C, ...) and integer labels (N, 1, ...): softmax, one-hot, background included."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def train_segmentation(
    model: nn.Module,
    volumes: Sequence[LabeledVolume],
    cfg: DictConfig,
    steps: int,
    seed: int,
    first_step: int = 0,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` Adam steps on the volumes' slices (or slabs).

    The encoder is frozen (weights and normalisation statistics kept, only the decoder
    optimised) in every step with ``finetune.freeze_encoder``, and otherwise in the
    steps numbered below ``finetune.frozen_encoder_steps`` (decoder warm-up, then the
    whole U-Net: LP-FT). Steps are numbered from ``first_step``, so a federated round
    continues the count of the rounds before it. Each epoch visits the
    samples in a fresh seeded order, ``finetune.batch_size`` at a time (the last batch of
    an epoch may be smaller); every batch is augmented with
    ``finetune.augment``. A fresh optimiser is created per call (federated rounds too).
    Deterministic for (weights, volumes, cfg, steps, seed, first_step) on CPU.
    """
    ft = cfg.finetune
    t0 = time.perf_counter()
    images, labels = training_samples(volumes, cfg.data.spatial_dims, cfg.data.slab_depth)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = segmentation_loss()
    # one optimiser over everything: Adam skips parameters without a gradient (the frozen encoder)
    optimizer = torch.optim.Adam(model.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    losses: list[float] = []
    order: list[int] = []
    for step in range(first_step, first_step + steps):
        frozen = ft.freeze_encoder or step < ft.frozen_encoder_steps
        model.train()
        model.encoder.requires_grad_(not frozen)
        if frozen:
            model.encoder.eval()
        if not order:
            order = rng.permutation(len(images)).tolist()
        idx, order = order[: ft.batch_size], order[ft.batch_size:]
        x, y = augment_batch(images[idx], labels[idx], ft.augment, generator)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.encoder.requires_grad_(True)
    return TrainResult(losses, steps, len(images), time.perf_counter() - t0)


# ---------------------------------------------------------------- prediction and metrics


@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray, spatial_dims: int, slab_depth: int, batch: int = 16) -> np.ndarray:
    """(Z, H, W) image -> (Z, H, W) int64 argmax labels, slice by slice (2D) or slab by slab (3D, centre slice)."""
    model.eval()
    img = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if spatial_dims == 3:
        idx = torch.from_numpy(_slab_indices(img.shape[0], slab_depth))
        x = img[idx].unsqueeze(1)  # (Z, 1, D, H, W)
    else:
        x = img.unsqueeze(1)  # (Z, 1, H, W)
    out = []
    for start in range(0, x.shape[0], batch):
        logits = model(x[start:start + batch])
        if spatial_dims == 3:
            logits = logits[:, :, slab_depth // 2]
        out.append(logits.argmax(dim=1))
    return torch.cat(out).numpy().astype(np.int64)


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """3D Dice of each foreground class (MONAI ``DiceMetric``, background excluded).

    Args:
        pred, label: (Z, H, W) integer class maps of one volume.

    Returns:
        (num_classes - 1,) float64; nan for a class absent from ``label`` (MONAI's ``ignore_empty``).
    """
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_classes, dim=1)
    g = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], num_classes, dim=1)
    metric = DiceMetric(include_background=False, reduction="none")
    return metric(p, g)[0].double().numpy()


def _edges(mask: torch.Tensor) -> torch.Tensor:
    """Surface voxels of a boolean mask: the mask minus its erosion by the face-connected cross.

    Voxels outside the array count as background (scipy's ``binary_erosion`` default, as MONAI uses).
    """
    padded = F.pad(mask[None, None].float(), [1, 1] * mask.ndim, value=0.0)[0, 0].bool()
    eroded = mask.clone()
    for axis in range(mask.ndim):
        for shift in (0, 2):
            eroded &= _shifted(padded, axis, shift, mask.shape)
    return mask & ~eroded


def _shifted(padded: torch.Tensor, axis: int, shift: int, shape: torch.Size) -> torch.Tensor:
    """The window of ``padded`` (1 voxel of padding per side) moved by ``shift - 1`` along ``axis``."""
    index = [slice(1, 1 + n) for n in shape]
    index[axis] = slice(shift, shift + shape[axis])
    return padded[tuple(index)]


def _directed_distances(src: torch.Tensor, dst: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each point of ``src`` (P, d) the Euclidean distance to the nearest point of ``dst`` (Q, d): (P,)."""
    return torch.cat([torch.cdist(src[i:i + chunk], dst).min(dim=1).values for i in range(0, len(src), chunk)])


def hd95_per_class(
    pred: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> np.ndarray:
    """95 % Hausdorff distance in mm of each foreground class of one volume.

    Same definition as MONAI's ``HausdorffDistanceMetric(percentile=95)`` (symmetric:
    the larger of the two directed 95th percentiles of surface-to-surface distances,
    surfaces = mask minus its face-connected erosion), computed in torch because MONAI's
    implementation needs scipy, which is not a dependency of this project.

    Args:
        pred, label: (Z, H, W) integer class maps.
        spacing: (z, y, x) voxel size in mm.

    Returns:
        (num_classes - 1,) float64: nan where the class is absent from both, inf where it
        is absent from exactly one of them (see ``summarise_volume`` for how that is scored).
    """
    scale = torch.as_tensor(list(spacing), dtype=torch.float64)
    pred_t, label_t = torch.as_tensor(pred), torch.as_tensor(label)
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        ep, eg = _edges(pred_t == c), _edges(label_t == c)
        if not ep.any() and not eg.any():
            continue
        if not ep.any() or not eg.any():
            out[c - 1] = np.inf
            continue
        p_pts = ep.nonzero().double() * scale
        g_pts = eg.nonzero().double() * scale
        d_pg = _directed_distances(p_pts, g_pts)
        d_gp = _directed_distances(g_pts, p_pts)
        out[c - 1] = float(torch.maximum(torch.quantile(d_pg, 0.95), torch.quantile(d_gp, 0.95)))
    return out


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the volume's diagonal in mm: the HD95 charged for a missed (or hallucinated) structure."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def summarise_volume(
    pred: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> dict[str, float]:
    """Dice and HD95 of one volume, per class and as the mean over foreground classes.

    Keys: ``dice``, ``dice_<class>``, ``hd95``, ``hd95_<class>`` (``class_names``). A class
    missing from the prediction but present in the label (or the reverse) gets an HD95
    of the volume diagonal, so failures are charged, not dropped; classes absent from
    the label are left out of the means (nan entries).
    """
    names = class_names(num_classes)
    dice = dice_per_class(pred, label, num_classes)
    hd = hd95_per_class(pred, label, num_classes, spacing)
    hd = np.where(np.isinf(hd), volume_diagonal_mm(label.shape, spacing), hd)
    out: dict[str, float] = {}
    with np.errstate(all="ignore"):
        out["dice"] = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
        out["hd95"] = float(np.nanmean(hd)) if np.isfinite(hd).any() else float("nan")
    for name, d, h in zip(names, dice, hd):
        out[f"dice_{name}"] = float(d)
        out[f"hd95_{name}"] = float(h)
    return out


def metric_keys(num_classes: int) -> list[str]:
    """The metric names every evaluation reports, in a fixed order."""
    names = class_names(num_classes)
    return ["dice", *(f"dice_{n}" for n in names), "hd95", *(f"hd95_{n}" for n in names)]


def mean_metrics(rows: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """nan-aware mean of each key over ``rows`` (nan when no row has a value)."""
    out = {}
    for key in keys:
        values = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


@dataclass
class EvalResult:
    """Scores of a model on a set of volumes."""

    volumes: list[dict[str, float]]  # one ``summarise_volume`` row (+ "volume": name) per volume
    mean: dict[str, float]  # ``metric_keys`` averaged over the volumes (nan-aware)
    predictions: list[np.ndarray] = field(default_factory=list, repr=False)  # (Z, H, W) int64 each


def evaluate_volumes(
    model: nn.Module, volumes: Sequence[LabeledVolume], cfg: DictConfig, keep_predictions: bool = False
) -> EvalResult:
    """Predict every volume slice by slice and score it in 3D (Dice, HD95 per class and mean)."""
    rows, preds = [], []
    num_classes = cfg.model.num_classes
    for v in volumes:
        pred = predict_volume(model, v.image, cfg.data.spatial_dims, cfg.data.slab_depth)
        rows.append({"volume": v.name or v.patient, **summarise_volume(pred, np.asarray(v.label), num_classes, v.spacing)})
        if keep_predictions:
            preds.append(pred)
    return EvalResult(rows, mean_metrics(rows, metric_keys(num_classes)), preds)


# ---------------------------------------------------------------- local k-fold fine-tuning


def by_patient(volumes: Sequence[LabeledVolume]) -> dict[str, list[LabeledVolume]]:
    """Volumes grouped by patient id, in their original order."""
    out: dict[str, list[LabeledVolume]] = {}
    for v in volumes:
        out.setdefault(v.patient, []).append(v)
    return out


def fold_splits(patients: Sequence[str], cfg: DictConfig, n_labeled: int) -> list[FoldSplit]:
    """The folds that are run for budget ``n_labeled``: the first ``finetune.run_folds`` (0: all) of the k-fold."""
    splits = kfold_splits(patients, cfg.finetune.folds, n_labeled, cfg.seed)
    return splits[: cfg.finetune.run_folds] if cfg.finetune.run_folds else splits


def volumes_of(groups: dict[str, list[LabeledVolume]], patients: Sequence[str]) -> list[LabeledVolume]:
    """All volumes of ``patients`` (ED and ES of each), in patient order."""
    return [v for p in patients for v in groups[p]]


@dataclass
class FoldResult:
    """One local fine-tuning run: one site, one N, one fold."""

    fold: int
    labeled: list[str]
    test: list[str]
    metrics: dict[str, float]  # ``metric_keys`` averaged over the test volumes
    train_loss_first: float
    train_loss_last: float
    seconds: float


@dataclass
class CellResult:
    """One site's local fine-tuning at one N: the folds and their mean."""

    n_labeled: int
    folds: list[FoldResult]
    metrics: dict[str, float]  # mean over folds of the fold metrics

    def to_json(self) -> dict:
        return {
            "n_labeled": self.n_labeled,
            **self.metrics,
            "folds": [
                {"fold": f.fold, "labeled": f.labeled, "test": f.test, **f.metrics,
                 "train_loss_first": f.train_loss_first, "train_loss_last": f.train_loss_last,
                 "seconds": f.seconds}
                for f in self.folds
            ],
        }


OverlayHook = Callable[[int, int, nn.Module, list[LabeledVolume], EvalResult], None]


def local_finetune(
    volumes: Sequence[LabeledVolume],
    init_weights: Sequence[np.ndarray],
    cfg: DictConfig,
    n_labeled: Sequence[int],
    site: str,
    on_fold: OverlayHook | None = None,
) -> dict[int, CellResult]:
    """Local fine-tuning of one site: k-fold cross validation for each label budget N.

    For each N and each run fold (``fold_splits``): a U-Net loaded from ``init_weights``
    is trained for ``finetune.local_steps`` steps on every volume of the fold's N
    labeled patients (drawn from the training folds) and evaluated on every volume of
    the held-out fold. Seeds depend only on (seed, site, N, fold).

    Args:
        volumes: the site's labeled volumes (all patients).
        init_weights: ``unet_weights`` order, e.g. ``initial_unet_weights``.
        n_labeled: the budgets to run.
        site: the site's name (seeds, messages).
        on_fold: called as ``on_fold(n, fold, model, test_volumes, eval_result)`` after
            each fold (overlays); predictions are kept in ``eval_result`` for it.

    Returns:
        ``{N: CellResult}``.
    """
    groups = by_patient(volumes)
    model = build_unet(cfg)
    keys = metric_keys(cfg.model.num_classes)
    out: dict[int, CellResult] = {}
    for n in n_labeled:
        folds = []
        for split in fold_splits(sorted(groups), cfg, n):
            t0 = time.perf_counter()
            set_unet_weights(model, init_weights)
            train = train_segmentation(
                model, volumes_of(groups, split.labeled), cfg, cfg.finetune.local_steps,
                stable_seed(cfg.seed, site, "local", n, split.fold),
            )
            test = volumes_of(groups, split.test)
            result = evaluate_volumes(model, test, cfg, keep_predictions=on_fold is not None)
            if on_fold is not None:
                on_fold(n, split.fold, model, test, result)
            folds.append(FoldResult(
                split.fold, list(split.labeled), list(split.test), result.mean,
                train.losses[0], train.loss, time.perf_counter() - t0,
            ))
        out[n] = CellResult(n, folds, mean_metrics([f.metrics for f in folds], keys))
    return out


# ---------------------------------------------------------------- overlays


def overlay_examples(
    volumes: Sequence[LabeledVolume], predictions: Sequence[np.ndarray], count: int
) -> dict[str, np.ndarray]:
    """A few held-out slices for a figure: ``image``, ``label``, ``pred`` each (count, H, W), and ``names``.

    Slices are taken evenly from the labeled (foreground) slices of all the volumes, in
    order; deterministic, and independent of the prediction.
    """
    candidates = [(i, z) for i, v in enumerate(volumes) for z in range(v.label.shape[0]) if np.any(v.label[z] > 0)]
    if not candidates or count < 1:
        return {}
    pick = [candidates[int(j)] for j in np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round()]
    return {
        "image": np.stack([volumes[i].image[z] for i, z in pick]).astype(np.float32),
        "label": np.stack([volumes[i].label[z] for i, z in pick]).astype(np.uint8),
        "pred": np.stack([predictions[i][z] for i, z in pick]).astype(np.uint8),
        "names": np.array([f"{volumes[i].name or volumes[i].patient} z={z}" for i, z in pick]),
    }


def label_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 4) RGBA: transparent background, then red, green, blue, ... for the classes."""
    base = np.array([[0, 0, 0, 0], [1, 0.2, 0.2, 0.55], [0.2, 1, 0.2, 0.55], [0.25, 0.45, 1, 0.55],
                     [1, 1, 0.2, 0.55], [1, 0.2, 1, 0.55]], dtype=np.float64)
    return base[np.arange(num_classes) % len(base)]


def overlay_grid(examples: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """(rows*H, 3*W, 3) float RGB in [0, 1]: per slice, image | ground truth overlay | prediction overlay."""
    colours = label_colours(num_classes)
    rows = []
    for image, label, pred in zip(examples["image"], examples["label"], examples["pred"]):
        lo, hi = np.percentile(image, [1, 99])
        grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
        panels = [grey]
        for seg in (label, pred):
            rgba = colours[seg.astype(np.int64)]
            panels.append(grey * (1 - rgba[..., 3:]) + rgba[..., :3] * rgba[..., 3:])
        rows.append(np.concatenate(panels, axis=1))
    return np.concatenate(rows, axis=0)


def write_overlay_png(examples: dict[str, np.ndarray], path: Path, title: str, num_classes: int) -> Path | None:
    """A grid PNG (one row per slice: image | ground truth | prediction), upscaled x2; None if no examples.

    Written with ``matplotlib.image.imsave`` (no figure: fast enough for every site and N).
    ``title`` goes into the PNG's metadata.
    """
    if not examples:
        return None
    from matplotlib import image as mpimg

    grid = overlay_grid(examples, num_classes).repeat(2, axis=0).repeat(2, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, grid, metadata={"Title": title})
    return path


# ---------------------------------------------------------------- what a site does with its own disk


def labeled_volumes(volumes: Sequence[object]) -> list[LabeledVolume]:
    """The labeled ones of preprocessed volumes (``data.preprocess.Volume``: ``image``, ``label``,
    ``record.patient``, ``spacing``), as ``LabeledVolume``; unlabeled volumes (4D frames) are skipped."""
    out = []
    for v in volumes:
        if getattr(v, "label", None) is None:
            continue
        record = v.record
        name = Path(str(record.image)).name.split(".")[0]
        frame = getattr(record, "frame", None)
        if frame is not None and f"frame{int(frame):02d}" not in name:
            name = f"{name}_frame{int(frame):02d}"
        out.append(LabeledVolume(v.image, v.label, str(record.patient), tuple(float(s) for s in v.spacing), name))
    return out


def write_overlays(
    folder: Path, stem: str, title: str, volumes: Sequence[LabeledVolume], predictions: Sequence[np.ndarray],
    cfg: DictConfig,
) -> Path | None:
    """``<folder>/<stem>.png`` (image | ground truth | prediction grid) and ``<stem>.npz`` (the same slices).

    Written on the site's own disk; nothing of it travels to the server.
    """
    examples = overlay_examples(volumes, predictions, cfg.finetune.overlay_slices)
    if not examples:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{stem}.npz", **examples)
    return write_overlay_png(examples, folder / f"{stem}.png", title, cfg.model.num_classes)


LOCAL_ENCODER_FILE = "local_pretrained.npz"


def local_pretrain_fingerprint(cfg: DictConfig) -> str:
    """The config key of a site's own pre-trained encoder: every setting but the ``finetune`` section."""
    return config_fingerprint(cfg, ignore=("finetune",))


def local_pretrain(
    start_weights: Sequence[np.ndarray], volumes: list[np.ndarray], cfg: DictConfig, state_dir: Path, fingerprint: str
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Contrastive pre-training of one site alone (``finetune.init = local_pretrain``), Chaitanya et al. style.

    ``rounds`` rounds of ``pretrain.pretrain_round`` with this site's volumes only, each
    starting from the previous round's weights (nothing is averaged with other sites;
    no remote bank). The result is cached in ``state_dir`` under ``fingerprint`` (the
    config that produced it, ``local_pretrain_fingerprint``), so a resumed run, or one that
    changes only fine-tuning settings, does not train again.

    Args:
        start_weights: encoder + head weights (``models.get_weights`` order) to start from.
        volumes: the site's (Z, H, W) training volumes (labels are not used).

    Returns:
        (encoder + head weights, metrics: ``loss`` of the last round, ``rounds``, ``seconds``).
    """
    from fcl_flower.pretrain import pretrain_round

    cache = state_dir / LOCAL_ENCODER_FILE
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["fingerprint"]) == fingerprint:
                n = int(saved["count"])
                return [saved[f"w{i}"] for i in range(n)], {"loss": float(saved["loss"]), "rounds": float(cfg.rounds), "seconds": 0.0}
    work = state_dir / "local_pretrain"
    if work.exists():  # an interrupted earlier attempt: start over (its weights were not kept)
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    weights, loss = list(start_weights), float("nan")
    for r in range(1, cfg.rounds + 1):
        result = pretrain_round(weights, None, volumes, cfg, work, r)
        weights, loss = result.weights, float(result.metrics["loss"])
    tmp = cache.with_name(f".{cache.name}.tmp.npz")
    np.savez(tmp, fingerprint=np.array(fingerprint), count=np.array(len(weights)), loss=np.array(loss),
             **{f"w{i}": w for i, w in enumerate(weights)})
    tmp.replace(cache)
    return weights, {"loss": loss, "rounds": float(cfg.rounds), "seconds": time.perf_counter() - t0}


# keys that do not change what a fine-tuning cell computes (where it is written, which
# other cells are asked for, how long the server waits, Flower's sampling settings)
_NEUTRAL_KEYS = (
    "resume", "output_dir", "stages", "federation", "finetune.n_labeled", "finetune.tasks",
    "finetune.local_timeout", "finetune.overlay_slices", "deploy",
)
# keys added after cells were stored, each with the value that computes what the code did
# before the key existed: at that value a key is left out, so stored cells stay valid
_ADDED_KEYS = {
    "finetune.federated_norm": "shared", "synthetic.anatomy_variation": 1.0, "pretrain.precision": "float32",
}


def config_fingerprint(cfg: DictConfig, *extra: str, ignore: Sequence[str] = ()) -> str:
    """SHA-256 (hex, 16 chars) of the config minus ``_NEUTRAL_KEYS``, ``ignore`` (dotted keys
    or whole sections) and ``_ADDED_KEYS`` at their original value, plus ``extra`` strings.

    Two runs whose fingerprints match compute the same numbers for the same cell.
    """
    import json

    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True)

    def parent_of(key: str) -> tuple[dict, str]:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        return node, leaf

    for key in (*_NEUTRAL_KEYS, *ignore):
        node, leaf = parent_of(key)
        node.pop(leaf, None)
    for key, original in _ADDED_KEYS.items():
        node, leaf = parent_of(key)
        if leaf in node and node[leaf] == original:
            del node[leaf]
    text = json.dumps(data, sort_keys=True) + "|" + "|".join(extra)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_unet_from(cfg: DictConfig, weights: Sequence[np.ndarray]) -> UNet:
    """A U-Net (``build_unet(cfg)``) holding ``weights`` (``unet_weights`` order)."""
    model = build_unet(cfg)
    set_unet_weights(model, weights)
    return model
