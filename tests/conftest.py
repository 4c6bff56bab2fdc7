"""Shared fixtures and helpers: a tiny synthetic dataset, a small config, NIfTI writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

try:  # keep torch (used by MONAI) to one thread on the shared test machine
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def write_nifti(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 8.0), affine=None, dtype=None) -> Path:
    """Write ``array`` (stored voxel order X, Y, Z[, T]) as NIfTI with a diagonal affine."""
    import nibabel as nib

    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = [-10.0, -20.0, 5.0]
    arr = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def make_acdc_patient(site_dir, pid, frames=(1, 9), nb_frames=12, with_4d=False, shape=(24, 20, 6)):
    """An ACDC patient folder with random images/labels, Info.cfg and optionally a 4D file."""
    pdir = site_dir / pid
    rng = np.random.default_rng(int(pid[-3:]))
    for f in frames:
        write_nifti(pdir / f"{pid}_frame{f:02d}.nii.gz", rng.integers(0, 500, shape), dtype=np.int16)
        write_nifti(pdir / f"{pid}_frame{f:02d}_gt.nii.gz", rng.integers(0, 4, shape), dtype=np.uint8)
    if with_4d:
        write_nifti(pdir / f"{pid}_4d.nii.gz", rng.integers(0, 500, (*shape, nb_frames)), dtype=np.int16)
    (pdir / "Info.cfg").write_text(f"ED: {frames[0]}\nES: {frames[-1]}\nGroup: NOR\nHeight: 170.0\n"
                                   f"NbFrame: {nb_frames}\nWeight: 70.0\n")
    return pdir


def make_msd(task_dir, n_train=3, n_test=2, shape=(20, 22, 7)):
    """An MSD task folder: imagesTr/labelsTr/imagesTs, dataset.json, a macOS ._ file."""
    rng = np.random.default_rng(0)
    training, test = [], []
    for i in range(n_train):
        write_nifti(task_dir / "imagesTr" / f"la_{i:03d}.nii.gz", rng.normal(size=shape), dtype=np.float32)
        write_nifti(task_dir / "labelsTr" / f"la_{i:03d}.nii.gz", rng.integers(0, 2, shape), dtype=np.uint8)
        training.append({"image": f"./imagesTr/la_{i:03d}.nii.gz", "label": f"./labelsTr/la_{i:03d}.nii.gz"})
    for i in range(n_test):
        write_nifti(task_dir / "imagesTs" / f"la_{100 + i:03d}.nii.gz", rng.normal(size=shape), dtype=np.float32)
        test.append(f"./imagesTs/la_{100 + i:03d}.nii.gz")
    (task_dir / "imagesTr" / "._la_000.nii.gz").write_bytes(b"macOS resource fork")
    (task_dir / "dataset.json").write_text(json.dumps({
        "name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "numTraining": n_train, "numTest": n_test, "training": training, "test": test,
    }))
    return task_dir


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """2 sites x 2 patients of 48x48 synthetic stacks (read-only: copy before modifying)."""
    from fcl_flower.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate_dataset(out, sites=2, patients_per_site=2, seed=0, image_size=48)
    return out


@pytest.fixture
def small_cfg(tmp_path):
    """A config factory with small preprocessing sizes and a private cache folder."""
    from fcl_flower.config import load_config

    def make(*overrides: str):
        return load_config([
            "data.image_size=[32,32]", "data.target_spacing=[2.5,2.5]",
            f"data.cache_dir={tmp_path / 'cache'}", f"synthetic.cache_root={tmp_path / 'builtin'}",
            *overrides,
        ])

    return make
