"""Discovery of ACDC / MSD layouts and of sites."""

import json
import shutil

import pytest
from conftest import make_acdc_patient, make_msd

from fcl_flower.data.datasets import (
    VolumeRecord, discover_site, discover_sites, site_records_for_partition, site_records_from_dir,
)
from fcl_flower.data.errors import DataError


def test_acdc_layout_with_4d_frames(tmp_path):
    site = tmp_path / "hospital_a"
    make_acdc_patient(site, "patient001", frames=(1, 9), nb_frames=12, with_4d=True)
    make_acdc_patient(site, "patient002", frames=(1, 7))
    (site / "notes.txt").write_text("ignored")
    plain = discover_site(site, "acdc")
    assert [(r.patient, r.frame, r.label is not None) for r in plain] == [
        ("patient001", 1, True), ("patient001", 9, True), ("patient002", 1, True), ("patient002", 7, True)]
    assert all(r.site == "hospital_a" and not r.from_4d for r in plain)
    with4d = discover_site(site, "acdc", use_4d_frames=True)
    cine = [r for r in with4d if r.from_4d]
    # one unlabeled volume per frame of the 4D file, except frames 1 and 9 (0-based 0 and 8) kept as 3D files
    assert [r.frame for r in cine] == [i for i in range(12) if i not in (0, 8)]
    assert all(r.label is None and r.image.name == "patient001_4d.nii.gz" for r in cine)
    assert site_records_from_dir(site, "acdc", True) == with4d


def test_msd_layout(tmp_path):
    task = make_msd(tmp_path / "Task02_Heart")
    recs = discover_site(task, "msd")
    assert [r.patient for r in recs] == ["la_000", "la_001", "la_002", "la_100", "la_101"]
    assert [r.label is not None for r in recs] == [True] * 3 + [False] * 2
    assert all(r.frame is None and r.image.is_file() for r in recs)
    assert recs[0].image == task / "imagesTr" / "la_000.nii.gz"


def test_msd_without_lists_uses_folders(tmp_path):
    task = make_msd(tmp_path / "t")
    meta = json.loads((task / "dataset.json").read_text())
    del meta["training"], meta["test"]
    (task / "dataset.json").write_text(json.dumps(meta))
    recs = discover_site(task, "msd")
    assert len(recs) == 5 and sum(r.label is not None for r in recs) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "no_patients", "label_without_image", "msd_missing_file",
                                  "msd_no_json", "info_names_missing_frame"])
def test_discovery_errors_name_the_file(tmp_path, case):
    site = tmp_path / "site"
    if case == "empty":
        site.mkdir()
        expected = site
    elif case == "missing":
        expected = site
    elif case == "no_patients":
        (site / "random").mkdir(parents=True)
        expected = site
    elif case == "label_without_image":
        make_acdc_patient(site, "patient001")
        (site / "patient001" / "patient001_frame01.nii.gz").unlink()
        expected = site / "patient001" / "patient001_frame01_gt.nii.gz"
    elif case == "msd_missing_file":
        make_msd(site)
        (site / "labelsTr" / "la_001.nii.gz").unlink()
        expected = site / "labelsTr" / "la_001.nii.gz"
    elif case == "msd_no_json":
        make_msd(site)
        (site / "dataset.json").unlink()
        expected = site / "dataset.json"
    else:
        make_acdc_patient(site, "patient001")
        (site / "patient001" / "patient001_frame09.nii.gz").unlink()
        (site / "patient001" / "patient001_frame09_gt.nii.gz").unlink()
        expected = site / "patient001"
    fmt = "msd" if case.startswith("msd") else "acdc"
    with pytest.raises(DataError) as err:
        discover_site(site, fmt)
    assert err.value.path == expected
    assert str(err.value).startswith(str(expected) + ": ")
    collected: list[DataError] = []
    discover_site(site, fmt, problems=collected)  # collection mode does not raise
    assert any(p.path == expected for p in collected)


def test_discover_sites_from_site_folders(tiny_synthetic, small_cfg):
    cfg = small_cfg(f"data.root={tiny_synthetic}", "sites=2")
    sites = discover_sites(cfg)
    assert list(sites) == ["site_00", "site_01"]
    assert all(isinstance(r, VolumeRecord) and r.site == name for name, recs in sites.items() for r in recs)
    assert {r.patient for r in sites["site_00"]} == {"patient001", "patient002"}
    name, recs = site_records_for_partition(cfg, 1)
    assert name == "site_01" and recs == sites["site_01"]
    with pytest.raises(DataError):
        site_records_for_partition(cfg, 2)
    with pytest.raises(DataError) as err:
        discover_sites(small_cfg(f"data.root={tiny_synthetic}", "sites=3"))
    assert err.value.path == tiny_synthetic and "2 site sub-folders" in err.value.problem


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_single_folder_split_across_sites(tmp_path, small_cfg, split):
    root = tmp_path / "training"
    for i in range(1, 8):
        make_acdc_patient(root, f"patient{i:03d}", shape=(8, 8, 3))
    cfg = small_cfg(f"data.root={root}", "data.format=acdc", "sites=3", f"data.split={split}",
                    "data.dirichlet_alpha=0.5")
    sites = discover_sites(cfg)
    assert list(sites) == ["site_00", "site_01", "site_02"]
    patients = [{r.patient for r in recs} for recs in sites.values()]
    assert all(patients) and sum(len(p) for p in patients) == 7
    assert set().union(*patients) == {f"patient{i:03d}" for i in range(1, 8)}
    assert all(r.site == name for name, recs in sites.items() for r in recs)
    assert discover_sites(cfg) == sites  # deterministic
    with pytest.raises(DataError) as err:
        discover_sites(small_cfg(f"data.root={root}", "data.format=acdc", "sites=8"))
    assert err.value.path == root


def test_builtin_synthetic_when_root_is_null(small_cfg, tmp_path):
    cfg = small_cfg("sites=2", "synthetic.patients_per_site=1", "synthetic.image_size=32")
    sites = discover_sites(cfg)
    assert list(sites) == ["site_00", "site_01"]
    assert all(str(r.image).startswith(str(tmp_path / "builtin")) for recs in sites.values() for r in recs)
    shutil.rmtree(tmp_path / "builtin")
    with pytest.raises(DataError):
        discover_sites(small_cfg(f"data.root={tmp_path / 'nope'}"))


def test_dataerror_contract():
    import pickle

    err = DataError("/data/x.nii.gz", "broken")
    assert isinstance(err, ValueError) and str(err) == "/data/x.nii.gz: broken"
    assert err.problem == "broken" and str(err.path) == "/data/x.nii.gz"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == err.path
