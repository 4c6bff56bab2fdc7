"""Atomic checkpoints: round trip, newest wins, pruning, half-written files ignored."""

from pathlib import Path

import numpy as np
import pytest

from fcl_flower.checkpoint import Checkpoint, load_latest_checkpoint, pack_arrays, save_checkpoint, unpack_arrays


def test_round_trip_and_latest(tmp_path: Path):
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,))]
    for r in (1, 2, 3, 4):
        save_checkpoint(tmp_path, Checkpoint(r, pack_arrays("weights", [w * r for w in weights]), {"stage": "pretrain"}), keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["round-00003.npz", "round-00004.npz"]
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.server_round == 4 and ckpt.meta == {"stage": "pretrain"}
    restored = unpack_arrays("weights", ckpt.arrays)
    assert len(restored) == 2
    for a, b in zip(restored, weights):
        np.testing.assert_array_equal(a, b * 4)
        assert a.dtype == b.dtype


def test_half_written_checkpoint_is_ignored(tmp_path: Path):
    save_checkpoint(tmp_path, Checkpoint(1, {"x": np.ones(2)}, {}))
    (tmp_path / "round-00002.tmp.npz").write_bytes(b"PK\x03\x04 truncated")
    assert load_latest_checkpoint(tmp_path).server_round == 1


def test_empty_folder_and_reserved_name(tmp_path: Path):
    assert load_latest_checkpoint(tmp_path / "none") is None
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, Checkpoint(1, {"__meta__": np.ones(1)}, {}))
