"""Patient-level splits: sites (iid or Dirichlet quantity skew) and k-fold with N labeled.

All functions sort their input first, so the result depends only on the *set* of
patient ids and the seed, never on the order in which folders were listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class FoldSplit:
    """One cross-validation fold of one site.

    Attributes:
        fold: fold index, 0..folds-1.
        labeled: the N patients whose labels are used for training, drawn from the
            training folds (the patients not in ``test``).
        test: the held-out patients of this fold.
    """

    fold: int
    labeled: list[str]
    test: list[str]


def _unique_sorted(patients: Sequence[str]) -> list[str]:
    items = [str(p) for p in patients]
    if len(set(items)) != len(items):
        dupes = sorted({p for p in items if items.count(p) > 1})
        raise ValueError(f"patient ids are not unique: {dupes}")
    return sorted(items)


def kfold_splits(patients: Sequence[str], folds: int, n_labeled: int, seed: int) -> list[FoldSplit]:
    """K-fold cross validation over patients, with ``n_labeled`` labeled training patients.

    Patients are shuffled once (seeded) and cut into ``folds`` near-equal test folds,
    which are disjoint and together cover every patient. For each fold the training
    patients are shuffled with a per-fold seed and the first ``n_labeled`` are the
    labeled ones, so the labeled sets are nested across budgets (N=1 within N=2 ...).

    Raises:
        ValueError: fewer than 2 folds, more folds than patients, ``n_labeled`` < 1 or
            larger than the number of training patients of some fold, duplicate ids.
    """
    items = _unique_sorted(patients)
    if folds < 2:
        raise ValueError(f"k-fold needs at least 2 folds, got {folds}")
    if folds > len(items):
        raise ValueError(f"{folds} folds need at least {folds} patients, got {len(items)}")
    if n_labeled < 1:
        raise ValueError(f"n_labeled must be at least 1, got {n_labeled}")
    order = np.random.default_rng([seed, 0x6B66]).permutation(len(items))
    chunks = np.array_split(order, folds)
    out = []
    for k, chunk in enumerate(chunks):
        test_set = set(chunk.tolist())
        train = [i for i in order.tolist() if i not in test_set]
        if n_labeled > len(train):
            raise ValueError(
                f"n_labeled = {n_labeled} exceeds the {len(train)} training patients of fold {k} "
                f"({len(items)} patients, {folds} folds)"
            )
        train_perm = np.random.default_rng([seed, 0x6B66, k]).permutation(len(train))
        labeled = sorted(items[train[i]] for i in train_perm[:n_labeled])
        out.append(FoldSplit(fold=k, labeled=labeled, test=sorted(items[i] for i in chunk)))
    return out


def _check_sites(n: int, sites: int) -> None:
    if sites < 1:
        raise ValueError(f"need at least 1 site, got {sites}")
    if n < sites:
        raise ValueError(f"cannot give each of {sites} sites a patient: only {n} patients")


def split_iid(patients: Sequence[str], sites: int, seed: int) -> list[list[str]]:
    """Shuffle patients (seeded) and deal them into ``sites`` near-equal groups.

    Returns a partition of all patients; every site gets at least one patient.
    """
    items = _unique_sorted(patients)
    _check_sites(len(items), sites)
    order = np.random.default_rng([seed, 0x11D]).permutation(len(items))
    return [sorted(items[i] for i in chunk) for chunk in np.array_split(order, sites)]


def split_dirichlet(patients: Sequence[str], sites: int, alpha: float, seed: int) -> list[list[str]]:
    """Quantity-skewed split: site shares drawn from Dirichlet(alpha, ..., alpha).

    Each site first gets one patient, the remaining ones are distributed by a
    multinomial draw with the Dirichlet shares; smaller ``alpha`` means more skew.
    Returns a partition of all patients; every site is non-empty; deterministic.
    """
    items = _unique_sorted(patients)
    _check_sites(len(items), sites)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    rng = np.random.default_rng([seed, 0xD1])
    shares = rng.dirichlet(np.full(sites, float(alpha)))
    counts = 1 + rng.multinomial(len(items) - sites, shares)
    order = rng.permutation(len(items))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [sorted(items[i] for i in order[bounds[s]:bounds[s + 1]]) for s in range(sites)]
