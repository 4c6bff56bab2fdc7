"""MONAI preprocessing, validation of every bad input, and the on-disk cache."""

import gzip

import nibabel
import numpy as np
import pytest
from conftest import make_acdc_patient, make_msd, write_nifti

from fcl_flower.data import preprocess
from fcl_flower.data.datasets import discover_site
from fcl_flower.data.errors import DataError
from fcl_flower.data.preprocess import Volume, load_site_volumes, load_volume


@pytest.fixture
def decode_counter(monkeypatch):
    """Counts NIfTI decodes (calls of preprocess.read_nifti), by file name."""
    calls: list[str] = []
    real = preprocess.read_nifti

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(preprocess, "read_nifti", counting)
    return calls


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def test_synthetic_volume_preprocessed(tiny_synthetic, small_cfg):
    cfg = small_cfg()
    rec = discover_site(tiny_synthetic / "site_00", "synthetic")[0]
    raw = nibabel.load(rec.image)
    vol = load_volume(rec, cfg)
    assert isinstance(vol, Volume) and vol.record == rec
    z = raw.shape[2]
    assert vol.image.shape == (z, 32, 32) and vol.image.dtype == np.float32
    assert vol.label.shape == (z, 32, 32) and vol.label.dtype == np.uint8
    assert vol.spacing == pytest.approx((raw.header.get_zooms()[2], 2.5, 2.5), rel=1e-4)
    assert abs(float(vol.image.mean())) < 1e-3 and abs(float(vol.image.std()) - 1) < 1e-3
    assert set(np.unique(vol.label)) == {0, 1, 2, 3}
    # the LV cavity keeps its area in mm^2 through in-plane resampling (nearest for labels)
    raw_lab = np.asarray(nibabel.load(rec.label).dataobj)
    sx = raw.header.get_zooms()[0]
    assert (vol.label == 3).sum() * 2.5 ** 2 == pytest.approx((raw_lab == 3).sum() * sx ** 2, rel=0.15)
    # base-to-apex order is kept: the LV shrinks along Z (slices above the base have none)
    lv = (vol.label == 3).sum(axis=(1, 2))
    with_lv = np.flatnonzero(lv)
    assert lv[with_lv[0]] > lv[with_lv[-1]] and with_lv[0] <= 2


def test_cache_hit_does_not_decode(tiny_synthetic, small_cfg, monkeypatch, tmp_path):
    cfg = small_cfg()
    recs = discover_site(tiny_synthetic / "site_01", "synthetic")
    before = _listing(tiny_synthetic)
    first = load_site_volumes(recs, cfg)
    entries = list((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == len(recs)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".tmp-")]

    def no_decode(*args, **kwargs):
        raise AssertionError("NIfTI decoded on a cache hit")

    monkeypatch.setattr(nibabel, "load", no_decode)
    monkeypatch.setattr(preprocess, "read_nifti", no_decode)
    second = load_site_volumes(recs, cfg)
    for a, b in zip(first, second):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert a.spacing == b.spacing and b.record == a.record
    assert _listing(tiny_synthetic) == before  # nothing written next to the inputs


def test_cache_misses_on_settings_or_content(tmp_path, small_cfg, decode_counter):
    site = tmp_path / "site"
    make_acdc_patient(site, "patient001", frames=(1,))
    rec = discover_site(site, "acdc")[0]
    cfg = small_cfg()
    load_volume(rec, cfg)
    assert decode_counter == ["patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz"]
    load_volume(rec, cfg)
    assert len(decode_counter) == 2
    load_volume(rec, small_cfg("data.image_size=[24,24]"))
    assert len(decode_counter) == 4
    load_volume(rec, small_cfg("data.intensity_percentiles=[1.0,99.0]"))
    assert len(decode_counter) == 6
    other_cache = tmp_path / "elsewhere"
    load_volume(rec, cfg, cache_dir=other_cache)
    assert len(decode_counter) == 8 and list(other_cache.rglob("*.npz"))
    # same settings, new image content: a miss
    img = nibabel.load(rec.image)
    write_nifti(rec.image, np.asarray(img.dataobj) + 1, affine=img.affine, dtype=np.int16)
    again = load_volume(rec, cfg)
    assert len(decode_counter) == 10 and again.image.shape == (6, 32, 32)
    # a damaged cache entry is a miss, then rewritten
    for entry in (tmp_path / "cache").rglob("*.npz"):
        entry.write_bytes(b"garbage")
    load_volume(rec, cfg)
    assert len(decode_counter) == 12


def test_4d_frames_decoded_once(tmp_path, small_cfg, decode_counter):
    site = tmp_path / "site"
    make_acdc_patient(site, "patient001", frames=(1, 4), nb_frames=5, with_4d=True)
    recs = [r for r in discover_site(site, "acdc", use_4d_frames=True) if r.from_4d]
    assert [r.frame for r in recs] == [1, 2, 4]
    vols = load_site_volumes(recs, small_cfg())
    assert decode_counter == ["patient001_4d.nii.gz"]
    assert all(v.label is None and v.image.shape == (6, 32, 32) for v in vols)
    assert not np.array_equal(vols[0].image, vols[1].image)
    raw = np.asarray(nibabel.load(recs[0].image).dataobj)
    assert np.corrcoef(vols[0].image[3].ravel(), vols[1].image[3].ravel())[0, 1] < 0.9  # frames differ
    assert raw.shape[3] == 5


def test_msd_unlabeled_and_declared_classes(tmp_path, small_cfg):
    task = make_msd(tmp_path / "Task02_Heart")
    recs = discover_site(task, "msd")
    vols = load_site_volumes(recs, small_cfg())
    assert [v.label is None for v in vols] == [False] * 3 + [True] * 2
    assert all(set(np.unique(v.label)) <= {0, 1} for v in vols[:3])
    assert all(v.image.shape == (7, 32, 32) for v in vols)
    # dataset.json declares {0, 1}: a 2 is out of range even though model.num_classes = 4
    lab = task / "labelsTr" / "la_001.nii.gz"
    write_nifti(lab, np.full((20, 22, 7), 2), dtype=np.uint8)
    with pytest.raises(DataError) as err:
        load_volume(recs[1], small_cfg())
    assert err.value.path == lab and "[2]" in err.value.problem


def _break(case, pdir):
    """Damage one file of an ACDC patient; return the file expected in the error."""
    img, lab = pdir / "patient001_frame01.nii.gz", pdir / "patient001_frame01_gt.nii.gz"
    data = np.asarray(nibabel.load(img).dataobj)
    if case == "truncated":
        raw = img.read_bytes()
        img.write_bytes(raw[: len(raw) // 2])
        return img
    if case == "not_nifti":
        img.write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
        return img
    if case == "shape_mismatch":
        write_nifti(lab, np.zeros((24, 20, 5)), dtype=np.uint8)
        return lab
    if case == "affine_mismatch":
        write_nifti(lab, np.zeros((24, 20, 6)), spacing=(1.5, 1.5, 10.0), dtype=np.uint8)
        return lab
    if case == "label_out_of_range":
        bad = np.zeros((24, 20, 6))
        bad[3, 3, 3] = 7
        write_nifti(lab, bad, dtype=np.uint8)
        return lab
    if case in ("nan", "inf"):
        f = data.astype(np.float32)
        f[1, 2, 3] = np.nan if case == "nan" else np.inf
        write_nifti(img, f, dtype=np.float32)
        return img
    if case == "image_2d":
        write_nifti(img, data[:, :, 0], dtype=np.int16)
        return img
    raise AssertionError(case)


BAD_CASES = ["truncated", "not_nifti", "shape_mismatch", "affine_mismatch", "label_out_of_range",
             "nan", "inf", "image_2d"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_dataerror_naming_the_file(tmp_path, small_cfg, case):
    site = tmp_path / "site"
    pdir = make_acdc_patient(site, "patient001", frames=(1,))
    culprit = _break(case, pdir)
    rec = discover_site(site, "acdc")[0]
    before = _listing(site)
    with pytest.raises(DataError) as err:
        load_volume(rec, small_cfg())
    assert err.value.path == culprit
    assert str(err.value).startswith(f"{culprit}: ")
    keyword = {"truncated": "cannot read", "not_nifti": "cannot read", "shape_mismatch": "shape",
               "affine_mismatch": "affine", "label_out_of_range": "outside", "nan": "NaN",
               "inf": "Inf", "image_2d": "2D"}[case]
    assert keyword in err.value.problem
    assert _listing(site) == before
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_cache_inside_input_folder_is_refused(tmp_path, small_cfg):
    site = tmp_path / "site"
    make_acdc_patient(site, "patient001", frames=(1,))
    rec = discover_site(site, "acdc")[0]
    with pytest.raises(DataError) as err:
        load_volume(rec, small_cfg(), cache_dir=site / "cache")
    assert err.value.path == site / "cache"
    assert not (site / "cache").exists()


def test_default_cache_dir(small_cfg):
    from pathlib import Path

    cfg = small_cfg("data.cache_dir=null")
    assert preprocess.default_cache_dir(cfg) == Path("~/.cache/fcl-flower/preprocessed").expanduser()
