"""Contrastive and pretext losses on L2-normalised projections.

All share one building block, the paper's per-positive term

    -log( exp(s+/T) / (exp(s+/T) + sum_{n in negatives} exp(s_n/T)) )
        = logaddexp(s+/T, LSE_n(s_n/T)) - s+/T

computed for whole (queries x candidates) matrices with boolean masks, never a Python
loop over queries, and stable for any T because only log-sum-exps are formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp over the entries where ``mask`` is true; -inf for an empty row.

    (B, K), (B, K) bool -> (B,). Masked entries are filled with the dtype's lowest finite
    value rather than -inf, so an all-masked row has a finite gradient (zero) instead of NaN.
    """
    lse = logits.masked_fill(~mask, torch.finfo(logits.dtype).min).logsumexp(dim=1)
    return torch.where(mask.any(dim=1), lse, torch.full_like(lse, float("-inf")))


def _mean_positive_term(pos_logits: torch.Tensor, pos_mask: torch.Tensor, neg_lse: torch.Tensor) -> torch.Tensor:
    """l(i, A) = -(1/|A_i|) sum_{a in A_i} log(e^{x_ia} / (e^{x_ia} + e^{neg_lse_i})); 0 where A_i is empty.

    pos_logits (B, M) already divided by T; pos_mask (B, M) bool marks A_i; neg_lse (B,). -> (B,).
    """
    log_prob = pos_logits - torch.logaddexp(pos_logits, neg_lse[:, None])
    count = pos_mask.sum(dim=1)
    return -(log_prob * pos_mask).sum(dim=1) / count.clamp(min=1)


def fcl_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    q_part: torch.Tensor,
    k_part: torch.Tensor,
    bank: torch.Tensor,
    bank_part: torch.Tensor,
    temperature: float = 0.1,
    exclude_same_partition_negatives: bool = False,
    bank_positives: bool = True,
) -> torch.Tensor:
    """The FCL loss of Wu et al. (MICCAI 2021), as printed, averaged over the queries.

    Per query i: ``l(i, P(i)) + l(i, Lambda(i))`` with local positives
    ``P(i) = {k[j] : k_part[j] == q_part[i]}`` (j == i included), remote positives
    ``Lambda(i) = {bank[n] : bank_part[n] == q_part[i]}`` (term is 0 when empty), and
    the negatives in every denominator = all of ``bank``, or with
    ``exclude_same_partition_negatives`` only bank entries of another partition.

    Args:
        q: (B, d) L2-normalised queries of the main encoder.
        k: (B, d) L2-normalised momentum keys; ``k[i]`` is the other view of ``q[i]``.
        q_part, k_part: (B,) int64 partition ids.
        bank: (K, d) L2-normalised sampled bank Q'; K may be 0.
        bank_part: (K,) int64 partition ids of the bank.
        temperature: T.
        exclude_same_partition_negatives: drop same-partition bank entries from the
            negatives (the GD- ablation of Chaitanya et al.).
        bank_positives: ``False`` drops the Lambda term (bank entries are negatives only).

    Returns:
        Scalar loss. Inputs are not normalised here.
    """
    pos_local = (q @ k.T) / temperature  # (B, B)
    bank_logits = (q @ bank.T) / temperature  # (B, K)
    same_local = q_part[:, None] == k_part[None, :]
    same_bank = q_part[:, None] == bank_part[None, :]
    negatives = ~same_bank if exclude_same_partition_negatives else torch.ones_like(same_bank)
    neg_lse = _masked_logsumexp(bank_logits, negatives)
    loss = _mean_positive_term(pos_local, same_local, neg_lse)
    if bank_positives:
        loss = loss + _mean_positive_term(bank_logits, same_bank, neg_lse)
    return loss.mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views: each view's positive is its pair, negatives all other 2N - 2.

    z1, z2: (N, d) L2-normalised projections of two views of the same N samples. -> scalar.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def local_cl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    part: torch.Tensor,
    temperature: float = 0.1,
    same_partition_positives: bool = True,
) -> torch.Tensor:
    """Partition-aware global contrastive loss of Chaitanya et al. (NeurIPS 2020) within the batch.

    Over the 2N views: with ``same_partition_positives`` (their G_D) the positives of a
    view are all other views of its partition (its own pair and the other volumes'
    slices); otherwise (their G_D-) only its own pair. In both, the negatives are the
    views of the other partitions: same-partition views are never negatives.
    Per positive: ``-log(e^{s+/T} / (e^{s+/T} + sum_neg e^{s/T}))``, averaged over each
    view's positives, then over the views.

    Args:
        z1, z2: (N, d) L2-normalised projections of two views of N samples.
        part: (N,) int64 partition ids.
        temperature: T.
        same_partition_positives: G_D (True) or G_D- (False).

    Returns:
        Scalar loss.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    parts = torch.cat([part, part])
    logits = (z @ z.T) / temperature
    same = parts[:, None] == parts[None, :]
    not_self = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    if same_partition_positives:
        positives = same & not_self
    else:
        idx = torch.arange(2 * n, device=z.device)
        positives = idx[:, None] == ((idx + n) % (2 * n))[None, :]
    neg_lse = _masked_logsumexp(logits, ~same)
    return _mean_positive_term(logits, positives, neg_lse).mean()


def rotation_loss(logits: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation classifier. logits (N, 4), rotation (N,) int64 in 0..3 -> scalar."""
    return F.cross_entropy(logits, rotation)
