"""Partition sampling and two-view augmentation for contrastive pre-training.

Each volume (Z, H, W) is split along its slice axis into S = ``data.num_partitions``
partitions of equal length. A step takes B = ``pretrain.batch_volumes`` volumes and
draws from each partition of each one a random slice (2D) or a slab of
``data.slab_depth`` consecutive slices centred on a random slice of the partition (3D),
giving N = B * S samples tagged with partition and volume ids, each augmented twice.

Augmentation runs on the whole batch at once: one MONAI ``AffineTransform`` resampling
per view folds crop + resize, rotation, scaling and flips into a single per-sample
affine matrix, followed by per-sample intensity scale/shift, gamma and Gaussian noise
written as broadcast tensor ops. This is the same family of transforms as MONAI's
``RandSpatialCrop``/``Resize``/``RandAffine``/``RandFlip``/``RandScaleIntensity``/
``RandShiftIntensity``/``RandAdjustContrast``/``RandGaussianNoise`` chain, at about
a fifteenth of its cost per batch (one interpolation instead of two, no per-sample
Python), and every random number comes from one numpy ``Generator`` that the caller
owns and saves, so a resumed run draws the same batches. In 3D the in-plane transform
is shared by all slices of a slab (the slab depth is treated as channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from monai.networks.layers import AffineTransform
from omegaconf import DictConfig


@dataclass
class ContrastiveBatch:
    """N = B * S samples, two views each.

    view1, view2: (N, 1, H, W) in 2D or (N, 1, D, H, W) in 3D, float32.
    partition: (N,) int64 partition ids 0..S-1.
    volume: (N,) int64 indices into the sampler's volume list.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    partition: torch.Tensor
    volume: torch.Tensor


def partition_bounds(depth: int, num_partitions: int) -> np.ndarray:
    """Slice ranges [lo, hi) of the S partitions of a volume with ``depth`` slices: (S, 2) int64.

    Slice z belongs to the partition holding its centre (z + 0.5) / depth, so the
    partitions cover the volume and differ in length by at most one slice when Z is
    not divisible by S. If Z < S, a partition holding no slice centre gets the one
    slice nearest its own centre (neighbouring partitions then share slices).
    """
    p = np.arange(num_partitions)
    lo = np.ceil(p * depth / num_partitions - 0.5).astype(np.int64)
    hi = np.ceil((p + 1) * depth / num_partitions - 0.5).astype(np.int64)
    empty = hi <= lo
    nearest = np.minimum(((p + 0.5) * depth / num_partitions).astype(np.int64), depth - 1)
    lo[empty], hi[empty] = nearest[empty], nearest[empty] + 1
    return np.stack([lo, hi], axis=1)


class BatchAugment:
    """Random two-view augmentation of a batch, all parameters per sample, from ``data.augment``.

    Args:
        aug: the ``data.augment`` config node.
    """

    def __init__(self, aug: DictConfig) -> None:
        self.crop_scale = tuple(aug.crop_scale)
        self.rotate = np.deg2rad(aug.rotate_deg)
        self.scale = aug.scale
        self.flip_prob = aug.flip_prob
        self.shift = aug.intensity_shift
        self.intensity_scale = aug.intensity_scale
        self.gamma = tuple(aug.gamma)
        self.noise_std = aug.noise_std
        self.resample = AffineTransform(
            normalized=True, reverse_indexing=False, padding_mode="reflection", align_corners=False
        )

    def _theta(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """(n, 2, 3) affine matrices in normalised output -> input coordinates."""
        crop = rng.uniform(*self.crop_scale, size=n)  # kept fraction of each side
        zoom = 1.0 + rng.uniform(-self.scale, self.scale, size=n)
        angle = rng.uniform(-self.rotate, self.rotate, size=n)
        flips = np.where(rng.random((n, 2)) < self.flip_prob, -1.0, 1.0)
        centre = rng.uniform(-1.0, 1.0, size=(n, 2)) * (1.0 - crop)[:, None]  # crop window stays inside
        cos, sin = np.cos(angle), np.sin(angle)
        rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (n, 2, 2)
        linear = rot * flips[:, None, :] * (crop / zoom)[:, None, None]
        return torch.from_numpy(np.concatenate([linear, centre[:, :, None]], axis=2).astype(np.float32))

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """x (N, C, H, W) -> one random view of the same shape; C channels share a sample's transform."""
        n = x.shape[0]
        y = self.resample(x, self._theta(n, rng))

        def per_sample(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values.astype(np.float32)).view(n, 1, 1, 1)

        lo, hi = y.amin(dim=(1, 2, 3), keepdim=True), y.amax(dim=(1, 2, 3), keepdim=True)
        gamma = per_sample(rng.uniform(*self.gamma, size=n))
        span = (hi - lo).clamp_min(1e-6)
        y = ((y - lo) / span).pow(gamma) * span + lo
        y = y * per_sample(1.0 + rng.uniform(-self.intensity_scale, self.intensity_scale, size=n))
        y = y + per_sample(rng.uniform(-self.shift, self.shift, size=n))
        noise = torch.from_numpy(rng.standard_normal(y.shape, dtype=np.float32))
        return y + noise * per_sample(rng.uniform(0.0, self.noise_std, size=n))


class PartitionSampler:
    """Batches of B volumes x S partitions, two augmented views each.

    Args:
        volumes: (Z, H, W) float32 arrays, all with the same H, W; Z may differ.
        cfg: the run config (``data.num_partitions``, ``data.spatial_dims``,
            ``data.slab_depth``, ``data.augment``, ``pretrain.batch_volumes``).
        rng: the generator of every random choice; the caller saves its state.
    """

    def __init__(self, volumes: Sequence[np.ndarray], cfg: DictConfig, rng: np.random.Generator) -> None:
        if not volumes:
            raise ValueError("no volumes to sample from")
        if len({v.shape[1:] for v in volumes}) != 1 or any(v.ndim != 3 for v in volumes):
            raise ValueError(f"volumes must be (Z, H, W) with one H, W; got {sorted({v.shape for v in volumes})}")
        self.num_partitions = cfg.data.num_partitions
        self.batch_volumes = cfg.pretrain.batch_volumes
        self.slab = cfg.data.slab_depth if cfg.data.spatial_dims == 3 else 0
        self.rng = rng
        self.augment = BatchAugment(cfg.data.augment)
        self.bounds = [partition_bounds(v.shape[0], self.num_partitions) for v in volumes]
        # a volume thinner than a slab is edge-padded along z once, here
        self.volumes = [
            np.pad(v, ((0, max(0, self.slab - v.shape[0])), (0, 0), (0, 0)), mode="edge").astype(np.float32, copy=False)
            for v in volumes
        ]

    def _split(self, order: np.ndarray) -> list[np.ndarray]:
        """Batches of B volumes, the last possibly smaller; a last batch of a single sample
        (S = 1, one volume left) joins the one before, as the projection head's BatchNorm needs two."""
        batches = [order[i : i + self.batch_volumes] for i in range(0, len(order), self.batch_volumes)]
        if len(batches) > 1 and len(batches[-1]) * self.num_partitions == 1:
            batches[-2:] = [np.concatenate(batches[-2:])]
        return batches

    def __len__(self) -> int:
        """Steps per epoch: every volume once."""
        return len(self._split(np.arange(len(self.volumes))))

    def epoch(self) -> Iterator[ContrastiveBatch]:
        """One pass over the volumes in a random order."""
        for volume_ids in self._split(self.rng.permutation(len(self.volumes))):
            yield self.sample(volume_ids)

    def sample(self, volume_ids: Sequence[int]) -> ContrastiveBatch:
        """One batch from the given volumes, S samples each, ordered volume-major."""
        volume_ids = np.asarray(volume_ids, dtype=np.int64)
        bounds = np.stack([self.bounds[v] for v in volume_ids])  # (B, S, 2)
        z = bounds[..., 0] + (self.rng.random(bounds.shape[:2]) * (bounds[..., 1] - bounds[..., 0])).astype(np.int64)
        if self.slab:
            raw = np.stack([self._slab(v, zi) for v, zs in zip(volume_ids, z) for zi in zs])  # (N, D, H, W)
        else:
            raw = np.stack([self.volumes[v][zs] for v, zs in zip(volume_ids, z)]).reshape(-1, 1, *self.volumes[0].shape[1:])
        x = torch.from_numpy(raw)
        view1, view2 = self.augment(x, self.rng), self.augment(x, self.rng)
        if self.slab:  # slab depth travelled as channels through the in-plane augmentation
            view1, view2 = view1[:, None], view2[:, None]
        partition = torch.arange(self.num_partitions).repeat(len(volume_ids))
        volume = torch.from_numpy(np.repeat(volume_ids, self.num_partitions))
        return ContrastiveBatch(view1, view2, partition, volume)

    def _slab(self, volume_id: int, centre: int) -> np.ndarray:
        """(D, H, W): D consecutive slices around ``centre``, shifted to stay inside the volume."""
        vol = self.volumes[volume_id]
        start = int(np.clip(centre - self.slab // 2, 0, vol.shape[0] - self.slab))
        return vol[start : start + self.slab]
