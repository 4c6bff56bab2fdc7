"""Partition sampling: bounds, shapes, ids, slices from the right partition, views, slabs, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcl_flower.config import load_config
from fcl_flower.data.sampling import BatchAugment, PartitionSampler, partition_bounds

torch.set_num_threads(1)
NO_AUGMENT = [
    "data.augment.crop_scale=[1.0,1.0]", "data.augment.rotate_deg=0", "data.augment.scale=0",
    "data.augment.flip_prob=0", "data.augment.intensity_shift=0", "data.augment.intensity_scale=0",
    "data.augment.gamma=[1.0,1.0]", "data.augment.noise_std=0",
]


def _indexed_volumes(depths: list[int], size: int = 16) -> list[np.ndarray]:
    """Volume v, slice z is filled with 100 * v + z (plus a ramp so min-max steps see contrast)."""
    ramp = np.linspace(0, 0.01, size * size, dtype=np.float32).reshape(size, size)
    return [(100.0 * v + np.arange(z, dtype=np.float32))[:, None, None] + ramp for v, z in enumerate(depths)]


@pytest.mark.parametrize("depth,parts", [(8, 4), (10, 4), (9, 4), (13, 3), (3, 4), (1, 4), (4, 1)])
def test_partition_bounds_cover_in_order(depth: int, parts: int) -> None:
    bounds = partition_bounds(depth, parts)
    assert bounds.shape == (parts, 2)
    assert (bounds[:, 1] > bounds[:, 0]).all() and bounds.min() >= 0 and bounds.max() <= depth
    if depth >= parts:  # a partition of contiguous, disjoint ranges covering every slice
        assert bounds[0, 0] == 0 and bounds[-1, 1] == depth and (bounds[1:, 0] == bounds[:-1, 1]).all()
        lengths = bounds[:, 1] - bounds[:, 0]
        assert lengths.max() - lengths.min() <= 1
    assert (np.diff(bounds[:, 0]) >= 0).all()


def test_2d_batches_ids_and_slices_from_their_partition() -> None:
    cfg = load_config([*NO_AUGMENT, "data.num_partitions=4", "pretrain.batch_volumes=3"])
    volumes = _indexed_volumes([8, 10, 9, 12, 11, 7, 4])
    sampler = PartitionSampler(volumes, cfg, np.random.default_rng(0))
    batches = list(sampler.epoch())
    assert len(batches) == len(sampler) == 3
    assert sorted(torch.cat([b.volume for b in batches]).unique().tolist()) == list(range(7))
    for b in batches:
        n = b.partition.numel()
        assert b.view1.shape == b.view2.shape == (n, 1, 16, 16) and b.view1.dtype == torch.float32
        assert b.partition.dtype == b.volume.dtype == torch.int64
        assert b.partition.tolist() == list(range(4)) * (n // 4)
        value = b.view1[:, 0, 0, 0].round()  # the identity augmentation: the raw slice
        vol, z = (value // 100).long(), (value % 100).long()
        assert torch.equal(vol, b.volume)
        for v, zz, p in zip(vol.tolist(), z.tolist(), b.partition.tolist()):
            lo, hi = partition_bounds(volumes[v].shape[0], 4)[p]
            assert lo <= zz < hi


def test_two_views_differ_and_augmentation_keeps_shape() -> None:
    cfg = load_config(["data.num_partitions=2", "pretrain.batch_volumes=2"])
    sampler = PartitionSampler([np.random.default_rng(i).random((6, 32, 32), dtype=np.float32) for i in range(2)],
                               cfg, np.random.default_rng(0))
    b = next(sampler.epoch())
    assert b.view1.shape == (4, 1, 32, 32)
    assert (b.view1 - b.view2).abs().mean() > 0.05
    assert torch.isfinite(b.view1).all() and torch.isfinite(b.view2).all()


def test_identity_augmentation_is_exact() -> None:
    augment = BatchAugment(load_config(NO_AUGMENT).data.augment)
    x = torch.rand(3, 2, 16, 16)
    assert torch.allclose(augment(x, np.random.default_rng(0)), x, atol=1e-5)


def test_flip_only_flips() -> None:
    cfg = load_config([*NO_AUGMENT, "data.augment.flip_prob=1.0"])
    x = torch.rand(2, 1, 8, 8)
    y = BatchAugment(cfg.data.augment)(x, np.random.default_rng(0))
    assert torch.allclose(y, x.flip(-1).flip(-2), atol=1e-5)


def test_3d_slabs_are_consecutive_and_in_partition() -> None:
    cfg = load_config([*NO_AUGMENT, "data.spatial_dims=3", "data.slab_depth=3", "data.num_partitions=3",
                       "pretrain.batch_volumes=2"])
    volumes = _indexed_volumes([9, 12, 2])  # the last is thinner than a slab: edge-padded
    sampler = PartitionSampler(volumes, cfg, np.random.default_rng(1))
    for b in sampler.epoch():
        assert b.view1.shape == (b.partition.numel(), 1, 3, 16, 16)
        values = b.view1[:, 0, :, 0, 0].round()
        z = (values % 100).long()
        for v, zs, p in zip(b.volume.tolist(), z.tolist(), b.partition.tolist()):
            depth = volumes[v].shape[0]
            if depth >= 3:
                assert zs == list(range(zs[0], zs[0] + 3))
                lo, hi = partition_bounds(depth, 3)[p]
                # centred on a slice of the partition, shifted back inside the volume at the ends
                assert zs[0] in {min(max(c - 1, 0), depth - 3) for c in range(lo, hi)}
            else:
                assert zs == [0, 1, 1]


def test_same_generator_state_same_batches() -> None:
    cfg = load_config(["pretrain.batch_volumes=2", "data.num_partitions=2"])
    volumes = [np.random.default_rng(i).random((5, 16, 16), dtype=np.float32) for i in range(4)]
    rng = np.random.default_rng(7)
    first = list(PartitionSampler(volumes, cfg, rng).epoch())
    state = rng.bit_generator.state
    second = list(PartitionSampler(volumes, cfg, rng).epoch())
    assert not torch.equal(first[0].view1, second[0].view1)
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = state
    again = list(PartitionSampler(volumes, cfg, rng2).epoch())
    for a, b in zip(second, again):
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2) and torch.equal(a.volume, b.volume)


def test_single_sample_last_batch_joins_the_previous() -> None:
    cfg = load_config(["data.num_partitions=1", "pretrain.batch_volumes=2"])
    sampler = PartitionSampler(_indexed_volumes([3] * 5), cfg, np.random.default_rng(0))
    sizes = [b.partition.numel() for b in sampler.epoch()]
    assert sizes == [2, 3] and len(sampler) == 2


def test_rejects_mixed_in_plane_sizes() -> None:
    with pytest.raises(ValueError):
        PartitionSampler([np.zeros((4, 8, 8), np.float32), np.zeros((4, 8, 9), np.float32)], load_config(),
                         np.random.default_rng(0))
