"""Patient splits: k-fold with N labeled, iid and Dirichlet site splits."""

import pytest

from fcl_flower.data.splits import FoldSplit, kfold_splits, split_dirichlet, split_iid

PATIENTS = [f"patient{i:03d}" for i in range(1, 11)]


@pytest.mark.parametrize("n_labeled", [1, 2, 4, 8])
def test_kfold_properties(n_labeled):
    folds = kfold_splits(PATIENTS, folds=5, n_labeled=n_labeled, seed=3)
    assert len(folds) == 5 and all(isinstance(f, FoldSplit) for f in folds)
    tests = [set(f.test) for f in folds]
    assert set().union(*tests) == set(PATIENTS)
    assert sum(len(t) for t in tests) == len(PATIENTS)  # disjoint
    for f in folds:
        assert len(f.labeled) == n_labeled
        assert set(f.labeled) <= set(PATIENTS) - set(f.test)
    assert folds == kfold_splits(list(reversed(PATIENTS)), folds=5, n_labeled=n_labeled, seed=3)


def test_kfold_seed_nesting_and_errors():
    a = kfold_splits(PATIENTS, 5, 2, seed=0)
    assert a != kfold_splits(PATIENTS, 5, 2, seed=1)
    small = kfold_splits(PATIENTS, 5, 1, seed=0)
    big = kfold_splits(PATIENTS, 5, 8, seed=0)
    assert all(set(s.labeled) <= set(b.labeled) for s, b in zip(small, big))  # nested budgets
    with pytest.raises(ValueError, match="exceeds"):
        kfold_splits(PATIENTS, 5, 9, seed=0)
    with pytest.raises(ValueError):
        kfold_splits(PATIENTS, 1, 1, seed=0)
    with pytest.raises(ValueError, match="unique"):
        kfold_splits(PATIENTS + PATIENTS[:1], 5, 1, seed=0)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_site_splits_partition_all_patients(split):
    patients = [f"p{i:03d}" for i in range(37)]
    for seed in range(5):
        if split == "iid":
            groups = split_iid(patients, 6, seed)
            again = split_iid(list(reversed(patients)), 6, seed)
        else:
            groups = split_dirichlet(patients, 6, 0.3, seed)
            again = split_dirichlet(list(reversed(patients)), 6, 0.3, seed)
        assert groups == again
        assert len(groups) == 6 and all(groups)
        flat = [p for g in groups for p in g]
        assert sorted(flat) == patients and len(set(flat)) == len(flat)
    if split == "iid":
        assert {len(g) for g in split_iid(patients, 6, 0)} <= {6, 7}


def test_dirichlet_skew_and_errors():
    patients = [f"p{i:03d}" for i in range(100)]
    sizes = sorted(len(g) for g in split_dirichlet(patients, 10, 0.1, 0))
    assert sizes[-1] > 3 * sizes[0]  # small alpha: quantity skew
    with pytest.raises(ValueError):
        split_dirichlet(patients[:3], 4, 0.5, 0)
    with pytest.raises(ValueError):
        split_dirichlet(patients, 4, 0.0, 0)
    with pytest.raises(ValueError):
        split_iid(patients[:3], 4, 0)
