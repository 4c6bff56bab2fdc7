"""FIFO queue bookkeeping and the uniform draw of Q'."""

from __future__ import annotations

import numpy as np
import torch

from fcl_flower.banks import FeatureQueue, sample_bank

torch.set_num_threads(1)


def _keys(start: int, n: int, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose every entry is their global index; partition = index % 4."""
    idx = torch.arange(start, start + n)
    return idx[:, None].float().expand(n, d).clone(), idx % 4


def test_fills_then_wraps_fifo() -> None:
    queue = FeatureQueue(capacity=5, dim=3)
    assert len(queue) == 0 and queue.features().shape == (0, 3)
    queue.enqueue(*_keys(0, 3))
    assert len(queue) == 3 and queue.features()[:, 0].tolist() == [0, 1, 2]
    queue.enqueue(*_keys(3, 4))  # 3, 4 fill; 5, 6 overwrite the oldest 0, 1
    assert len(queue) == 5
    assert sorted(queue.features()[:, 0].tolist()) == [2, 3, 4, 5, 6]
    assert queue.partitions().tolist() == (queue.features()[:, 0].long() % 4).tolist()
    queue.enqueue(*_keys(7, 12))  # more than capacity: only the newest five stay
    assert sorted(queue.features()[:, 0].tolist()) == [14, 15, 16, 17, 18]
    assert queue.partitions().tolist() == (queue.features()[:, 0].long() % 4).tolist()


def test_as_arrays_and_state_round_trip() -> None:
    queue = FeatureQueue(capacity=4, dim=3)
    queue.enqueue(*_keys(0, 6))
    feats, parts = queue.as_arrays()
    assert feats.dtype == np.float32 and parts.dtype == np.int64 and feats.shape == (4, 3) and parts.shape == (4,)
    feats[:] = -1  # a copy, not a view
    assert queue.features().min() >= 0
    other = FeatureQueue(capacity=4, dim=3)
    other.load_state_dict(queue.state_dict())
    queue.enqueue(*_keys(6, 1))
    other.enqueue(*_keys(6, 1))
    assert torch.equal(queue.features(), other.features()) and torch.equal(queue.partitions(), other.partitions())


def test_sample_bank_without_replacement_from_union() -> None:
    local, local_parts = _keys(0, 30)
    remote, remote_parts = _keys(100, 50)
    gen = torch.Generator().manual_seed(0)
    bank, bank_part = sample_bank(local, local_parts, remote, remote_parts, 40, gen)
    ids = bank[:, 0].long().tolist()
    assert len(ids) == 40 and len(set(ids)) == 40
    assert set(ids) <= set(range(30)) | set(range(100, 150))
    assert bank_part.tolist() == [i % 4 for i in ids]
    assert all(torch.equal(bank[j], (local if i < 100 else remote)[i % 100]) for j, i in enumerate(ids))


def test_sample_bank_returns_everything_when_small() -> None:
    local, local_parts = _keys(0, 3)
    bank, _ = sample_bank(local, local_parts, None, None, 10, torch.Generator())
    assert bank[:, 0].tolist() == [0, 1, 2]
    remote, remote_parts = _keys(10, 2)
    bank, _ = sample_bank(local, local_parts, remote, remote_parts, 10, torch.Generator())
    assert sorted(bank[:, 0].tolist()) == [0, 1, 2, 10, 11]
    empty, empty_parts = sample_bank(local[:0], local_parts[:0], None, None, 5, torch.Generator())
    assert empty.shape == (0, 3) and empty_parts.shape == (0,)


def test_sample_bank_is_uniform() -> None:
    local, local_parts = _keys(0, 10)
    remote, remote_parts = _keys(10, 10)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(20)
    for _ in range(2000):
        bank, _ = sample_bank(local, local_parts, remote, remote_parts, 5, gen)
        counts[bank[:, 0].long()] += 1
    assert torch.allclose(counts / 2000, torch.full((20,), 0.25), atol=0.04)  # each row drawn with p = 5 / 20


def test_sample_bank_reproducible_from_generator_state() -> None:
    local, local_parts = _keys(0, 100)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    first, _ = sample_bank(local, local_parts, None, None, 10, gen)
    gen.set_state(state)
    again, _ = sample_bank(local, local_parts, None, None, 10, gen)
    assert torch.equal(first, again)
