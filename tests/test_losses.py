"""The losses against slow, loop-by-loop re-derivations of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fcl_flower.losses import fcl_loss, local_cl_loss, nt_xent, rotation_loss

torch.set_num_threads(1)


def _unit(n: int, d: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1)


def _term(q, a, negatives, T) -> float:
    """-log(e^{q.a/T} / (e^{q.a/T} + sum_n e^{q.n/T})), in float64 with plain exps."""
    pos = math.exp(float(q @ a) / T)
    neg = sum(math.exp(float(q @ n) / T) for n in negatives)
    return -math.log(pos / (pos + neg))


def _reference_fcl(q, k, q_part, k_part, bank, bank_part, T, exclude, bank_positives=True) -> float:
    q, k, bank = q.double(), k.double(), bank.double()
    total = 0.0
    for i in range(q.shape[0]):
        negatives = [bank[n] for n in range(bank.shape[0]) if not (exclude and bank_part[n] == q_part[i])]
        local = [k[j] for j in range(k.shape[0]) if k_part[j] == q_part[i]]
        total += sum(_term(q[i], a, negatives, T) for a in local) / len(local)
        remote = [bank[n] for n in range(bank.shape[0]) if bank_part[n] == q_part[i]]
        if remote and bank_positives:
            total += sum(_term(q[i], a, negatives, T) for a in remote) / len(remote)
    return total / q.shape[0]


def _inputs(B=12, K=20, d=8, S=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, bank = _unit(B, d, gen, dtype), _unit(B, d, gen, dtype), _unit(K, d, gen, dtype)
    part = torch.arange(B) % S
    bank_part = torch.randint(0, S, (K,), generator=gen)
    return q, k, part, part.clone(), bank, bank_part


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("T", [0.1, 0.5])
def test_fcl_loss_matches_formula(exclude: bool, T: float) -> None:
    q, k, qp, kp, bank, bp = _inputs()
    got = fcl_loss(q, k, qp, kp, bank, bp, T, exclude_same_partition_negatives=exclude)
    assert got.ndim == 0
    assert got.item() == pytest.approx(_reference_fcl(q, k, qp, kp, bank, bp, T, exclude), rel=1e-4)


def test_fcl_loss_empty_lambda_for_some_queries() -> None:
    q, k, qp, kp, bank, _ = _inputs(K=6)
    bp = torch.tensor([0, 0, 1, 1, 0, 1])  # partitions 2 and 3 have no remote positive
    got = fcl_loss(q, k, qp, kp, bank, bp, 0.1)
    assert got.item() == pytest.approx(_reference_fcl(q, k, qp, kp, bank, bp, 0.1, False), rel=1e-4)


def test_fcl_loss_without_bank_positives_drops_lambda_term() -> None:
    q, k, qp, kp, bank, bp = _inputs()
    got = fcl_loss(q, k, qp, kp, bank, bp, 0.1, bank_positives=False)
    assert got.item() == pytest.approx(_reference_fcl(q, k, qp, kp, bank, bp, 0.1, False, False), rel=1e-4)


def test_fcl_loss_empty_bank() -> None:
    q, k, qp, kp, _, _ = _inputs()
    bank, bp = torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64)
    got = fcl_loss(q, k, qp, kp, bank, bp, 0.1)
    assert got.item() == pytest.approx(_reference_fcl(q, k, qp, kp, bank, bp, 0.1, False), rel=1e-4)
    # the formula with K = 0 and a single local positive per query is log(e^x / e^x) = 0
    single = torch.arange(12)
    assert fcl_loss(q, k, single, single, bank, bp, 0.1).item() == pytest.approx(0.0, abs=1e-6)


def test_fcl_loss_all_negatives_excluded_has_finite_gradient() -> None:
    q, k, qp, kp, bank, _ = _inputs(K=5)
    q.requires_grad_(True)
    bp = torch.zeros(5, dtype=torch.int64)  # every bank row is partition 0: rows of partition 0 have no negatives
    loss = fcl_loss(q, k, qp, kp, bank, bp, 0.1, exclude_same_partition_negatives=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
    assert loss.item() == pytest.approx(_reference_fcl(q.detach(), k, qp, kp, bank, bp, 0.1, True), rel=1e-4)


def test_fcl_loss_low_temperature_no_overflow() -> None:
    q, k, qp, kp, bank, bp = _inputs(K=4096, d=16)
    bank[:10] = q[:10]  # exact matches: logits at the maximum 1 / T
    q.requires_grad_(True)
    loss = fcl_loss(q, k, qp, kp, bank, bp, 0.05, exclude_same_partition_negatives=False)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
    small = fcl_loss(q[:4].detach(), k[:4], qp[:4], kp[:4], bank[:30], bp[:30], 0.05)
    assert small.item() == pytest.approx(_reference_fcl(q[:4].detach(), k[:4], qp[:4], kp[:4], bank[:30], bp[:30], 0.05, False), rel=1e-4)


@pytest.mark.parametrize("exclude", [False, True])
def test_fcl_loss_gradcheck(exclude: bool) -> None:
    q, k, qp, kp, bank, bp = _inputs(B=6, K=7, d=4, S=3, dtype=torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    bank.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, b: fcl_loss(q, k, qp, kp, b, bp, 0.2, exclude_same_partition_negatives=exclude), (q, k, bank)
    )
    empty = torch.zeros(0, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k: fcl_loss(q, k, qp, kp, empty, bp[:0], 0.2, exclude_same_partition_negatives=exclude), (q, k)
    )


def test_nt_xent_matches_simclr_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    z1, z2, T = _unit(5, 6, gen).double(), _unit(5, 6, gen).double(), 0.2
    z = torch.cat([z1, z2])
    n = 5
    expected = 0.0
    for i in range(2 * n):
        pair = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[j]) / T) for j in range(2 * n) if j != i)
        expected -= math.log(math.exp(float(z[i] @ z[pair]) / T) / denom)
    assert nt_xent(z1, z2, T).item() == pytest.approx(expected / (2 * n), rel=1e-6)


@pytest.mark.parametrize("same_partition_positives", [True, False])
def test_local_cl_loss_matches_formula(same_partition_positives: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    n, T = 8, 0.1
    z1, z2 = _unit(n, 6, gen).double(), _unit(n, 6, gen).double()
    part = torch.arange(n) % 4
    z, parts = torch.cat([z1, z2]), torch.cat([part, part])
    expected = 0.0
    for i in range(2 * n):
        if same_partition_positives:
            positives = [j for j in range(2 * n) if j != i and parts[j] == parts[i]]
        else:
            positives = [(i + n) % (2 * n)]
        negatives = [z[j] for j in range(2 * n) if parts[j] != parts[i]]
        expected += sum(_term(z[i], z[j], negatives, T) for j in positives) / len(positives)
    got = local_cl_loss(z1, z2, part, T, same_partition_positives=same_partition_positives)
    assert got.item() == pytest.approx(expected / (2 * n), rel=1e-6)


def test_rotation_loss_is_cross_entropy() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([0, 2])
    expected = (-math.log(math.exp(10) / (math.exp(10) + 3)) + math.log(4)) / 2
    assert rotation_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
