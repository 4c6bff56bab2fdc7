"""The synthetic multi-site cardiac MRI generator."""

import json

import nibabel as nib
import numpy as np
import pytest

from fcl_flower.data.errors import DataError
from fcl_flower.data.datasets import discover_site
from fcl_flower.data.synthetic import PatientVariation, contraction, ensure_builtin_dataset, generate_dataset


def _frames(root, site, patient):
    """[(image (Z,H,W), label (Z,H,W), nibabel image)] for the ED and ES frames."""
    pdir = root / site / patient
    out = []
    for img_path in sorted(p for p in pdir.glob(f"{patient}_frame*.nii.gz") if "_gt" not in p.name):
        img = nib.load(img_path)
        lab = nib.load(str(img_path).replace(".nii.gz", "_gt.nii.gz"))
        out.append((np.asarray(img.dataobj).transpose(2, 1, 0), np.asarray(lab.dataobj).transpose(2, 1, 0), img, lab))
    return out


def test_layout_manifest_info(tiny_synthetic):
    manifest = json.loads((tiny_synthetic / "manifest.json").read_text())
    assert manifest["sites"] == ["site_00", "site_01"]
    assert manifest["seed"] == 0 and manifest["format"] == "acdc"
    assert set(manifest["site_params"]["site_00"]) >= {"spacing_xy", "slices", "noise_type", "intensity_max"}
    ids = [p for site in manifest["sites"] for p in manifest["patients"][site]]
    assert len(ids) == len(set(ids)) == 4  # unique across the whole dataset
    for site in manifest["sites"]:
        for pid in manifest["patients"][site]:
            pdir = tiny_synthetic / site / pid
            info = dict(line.split(": ") for line in (pdir / "Info.cfg").read_text().splitlines())
            assert set(info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
            assert info["Group"] in {"NOR", "MINF", "DCM", "HCM", "RV"}
            for frame in (int(info["ED"]), int(info["ES"])):
                assert (pdir / f"{pid}_frame{frame:02d}.nii.gz").is_file()
                assert (pdir / f"{pid}_frame{frame:02d}_gt.nii.gz").is_file()


def test_nifti_affine_dtypes_labels(tiny_synthetic):
    manifest = json.loads((tiny_synthetic / "manifest.json").read_text())
    for site in manifest["sites"]:
        params = manifest["site_params"][site]
        for pid in manifest["patients"][site]:
            for image, label, img, lab in _frames(tiny_synthetic, site, pid):
                assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
                zooms = img.header.get_zooms()
                assert zooms == pytest.approx((params["spacing_xy"], params["spacing_xy"], params["slice_spacing"]), rel=1e-4)
                assert np.allclose(np.diag(img.affine)[:3], zooms, rtol=1e-4)
                centre = img.affine @ np.array([(48 - 1) / 2, (48 - 1) / 2, (image.shape[0] - 1) / 2, 1.0])
                assert np.allclose(centre[:3], 0.0, atol=1e-3)  # FOV centred on the origin
                assert np.allclose(img.affine, lab.affine)
                assert set(np.unique(label)) <= {0, 1, 2, 3}
                mid = label[image.shape[0] // 2]
                assert set(np.unique(mid)) == {0, 1, 2, 3}
                assert image.min() >= 0 and image.max() > 0


def test_base_to_apex_anatomy(tiny_synthetic):
    for site, pid in (("site_00", "patient001"), ("site_01", "patient003")):
        image, label, _, _ = _frames(tiny_synthetic, site, pid)[0]  # ED
        base = int(np.flatnonzero(label.any(axis=(1, 2)))[0])  # stacks may start above the base
        assert base <= 2 and not label[:base].any()
        lv = (label[base:] == 3).sum(axis=(1, 2))
        rv = (label[base:] == 1).sum(axis=(1, 2))
        z = len(lv)
        assert lv[0] > lv[z // 2] > lv[-1]  # LV cavity shrinks towards the apex
        assert np.all(np.diff(lv[1:]) <= 0)
        assert rv[0] > 0 and rv[-1] == 0  # RV gone at the apex slice
        assert (label[-1] == 2).sum() > 0 or (label[-2] == 2).sum() > 0  # apical myocardium cap


def test_slices_above_the_base_show_unlabeled_atria(tmp_path):
    root = tmp_path / "d"
    generate_dataset(root, sites=1, patients_per_site=6, seed=0, image_size=48)
    above = 0
    for pid in json.loads((root / "manifest.json").read_text())["patients"]["site_00"]:
        image, label, _, _ = _frames(root, "site_00", pid)[0]  # ED
        base = int(np.flatnonzero(label.any(axis=(1, 2)))[0])
        if base == 0:
            continue
        above += 1
        lv_blood = np.median(image[base][label[base] == 3])
        # blood-bright chambers (atria, aortic root) in the unlabeled slice above the base
        assert (image[base - 1] > 0.8 * lv_blood).sum() > 0.5 * (label[base] == 3).sum()
    assert above > 0


def test_es_smaller_cavity_thicker_wall(tiny_synthetic):
    (ed_img, ed, _, _), (es_img, es, _, _) = _frames(tiny_synthetic, "site_00", "patient001")
    assert (es == 3).sum() < 0.8 * (ed == 3).sum()
    k = ed.shape[0] // 2
    ratio_ed = (ed[k] == 2).sum() / max((ed[k] == 3).sum(), 1)
    ratio_es = (es[k] == 2).sum() / max((es[k] == 3).sum(), 1)
    assert ratio_es > ratio_ed
    # the surroundings do not move between frames: same anatomy outside the heart
    outside = (ed == 0) & (es == 0)
    corr = np.corrcoef(ed_img[outside].astype(float), es_img[outside].astype(float))[0, 1]
    assert corr > 0.8


def test_sites_differ(tmp_path):
    root = tmp_path / "d"
    generate_dataset(root, sites=3, patients_per_site=2, seed=5, image_size=48)
    manifest = json.loads((root / "manifest.json").read_text())
    p0, p1 = manifest["site_params"]["site_00"], manifest["site_params"]["site_01"]
    assert p0["noise_type"] != p1["noise_type"]
    assert p0["spacing_xy"] != p1["spacing_xy"] and p0["slices"] != p1["slices"]
    stats = {}
    for site in ("site_00", "site_01"):
        shapes, p99, zeros = [], [], []
        for pid in manifest["patients"][site]:
            for image, _, _, _ in _frames(root, site, pid):
                shapes.append(image.shape[0])
                p99.append(np.percentile(image, 99))
                zeros.append(np.mean(image == 0))
        stats[site] = (np.mean(p99), np.mean(zeros))
        assert all(abs(s - manifest["site_params"][site]["slices"]) <= 1 for s in shapes)
    (v0, zero0), (v1, zero1) = stats["site_00"], stats["site_01"]
    assert abs(v0 - v1) / max(v0, v1) > 0.1  # stored intensity scale differs
    # noise type: clipped Gaussian noise leaves exact zeros in the air, Rician (site_00) does not
    assert p0["noise_type"] == "rician" and zero0 < 0.005 < 0.02 < zero1


def test_deterministic_and_seeded(tmp_path, tiny_synthetic):
    again = tmp_path / "again"
    generate_dataset(again, sites=2, patients_per_site=2, seed=0, image_size=48)
    other = tmp_path / "other"
    generate_dataset(other, sites=2, patients_per_site=2, seed=1, image_size=48)
    a = _frames(tiny_synthetic, "site_01", "patient004")
    b = _frames(again, "site_01", "patient004")
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    c = _frames(other, "site_01", "patient004")
    assert a[0][0].shape != c[0][0].shape or not np.array_equal(a[0][0], c[0][0])


def test_patient_variation_scales_contrast_between_patients_not_anatomy(tmp_path):
    def blood_to_myocardium(root):
        """log(median LV blood / median myocardium) of each patient's ED frame, and the labels."""
        out = []
        for pid in json.loads((root / "manifest.json").read_text())["patients"]["site_00"]:
            image, label, _, _ = _frames(root, "site_00", pid)[0]
            out.append((np.log(np.median(image[label == 3]) / np.median(image[label == 2])), label))
        return out

    looks = {}
    for variation in (0.0, 3.0):
        root = tmp_path / f"v{variation:g}"
        generate_dataset(root, sites=1, patients_per_site=5, seed=0, image_size=48,
                         variation=PatientVariation(look=variation))
        assert json.loads((root / "manifest.json").read_text())["params"]["patient_variation"] == variation
        looks[variation] = blood_to_myocardium(root)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(looks[0.0], looks[3.0]))  # same anatomy
    spread = {v: np.std([ratio for ratio, _ in rows]) for v, rows in looks.items()}
    assert spread[3.0] > 1.5 * spread[0.0]  # the patients of one site differ more in contrast


def test_anatomy_variation_scales_heart_size_between_patients_not_scanner_or_position(tmp_path):
    def hearts(root):
        """Per ED frame of site_00: (LV cavity + myocardium area at the mid slice in mm^2, label centroid in mm)."""
        manifest = json.loads((root / "manifest.json").read_text())
        out = []
        for pid in manifest["patients"]["site_00"]:
            _, label, img, _ = _frames(root, "site_00", pid)[0]
            mid = label[label.shape[0] // 2]
            area = np.count_nonzero(mid >= 2) * float(np.prod(img.header.get_zooms()[:2]))
            out.append((area, np.argwhere(label > 0)[:, 1:].mean(0) * img.header.get_zooms()[0]))
        return manifest, out

    found = {}
    for anatomy in (0.0, 2.0):
        root = tmp_path / f"a{anatomy:g}"
        generate_dataset(root, sites=1, patients_per_site=8, seed=0, image_size=48,
                         variation=PatientVariation(anatomy=anatomy))
        found[anatomy] = hearts(root)
    (flat_manifest, flat), (wide_manifest, wide) = found[0.0], found[2.0]
    assert wide_manifest["params"]["anatomy_variation"] == 2.0
    assert flat_manifest["site_params"] == wide_manifest["site_params"]  # the same scanner
    # at 0 a patient's heart size is the middle of its ACDC group's range, at 2 the spread
    # within each group is twice the generator's
    flat_areas, wide_areas = np.array([a for a, _ in flat]), np.array([a for a, _ in wide])
    assert np.std(np.log(wide_areas)) > 3.0 * np.std(np.log(flat_areas))
    # the heart's position is not part of the knob: the label centroids move with the size
    # change only (scaled as well, from 0 to 2 x +-22 mm, they would move by ~20 mm on average)
    assert np.mean([np.linalg.norm(a[1] - b[1]) for a, b in zip(flat, wide)]) < 8.0


def test_refuses_non_empty_folder_and_bad_args(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DataError) as err:
        generate_dataset(tmp_path / "x", sites=1, patients_per_site=1, seed=0, image_size=32)
    assert err.value.path == tmp_path / "x" and "not empty" in str(err.value)
    with pytest.raises(DataError):
        generate_dataset(tmp_path / "y", sites=0, patients_per_site=1, seed=0)
    with pytest.raises(DataError, match="synthetic.patient_variation"):
        generate_dataset(tmp_path / "z", sites=1, patients_per_site=1, seed=0, variation=PatientVariation(look=7.0))
    with pytest.raises(DataError, match="synthetic.anatomy_variation"):
        generate_dataset(tmp_path / "z", sites=1, patients_per_site=1, seed=0, variation=PatientVariation(anatomy=2.5))
    assert not (tmp_path / "z").exists()


def test_builtin_dataset_generated_once(tmp_path):
    first = ensure_builtin_dataset(tmp_path, sites=1, patients_per_site=1, seed=0, image_size=32, spacing=1.5)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    second = ensure_builtin_dataset(tmp_path, sites=1, patients_per_site=1, seed=0, image_size=32, spacing=1.5)
    assert first == second and (second / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folders left
    varied = ensure_builtin_dataset(tmp_path, sites=1, patients_per_site=1, seed=0, image_size=32, spacing=1.5,
                                    variation=PatientVariation(look=2.0, anatomy=0.5))
    params = json.loads((varied / "manifest.json").read_text())["params"]
    assert varied.name == first.name + "_pv2_av0.5"
    assert (params["patient_variation"], params["anatomy_variation"]) == (2.0, 0.5)


def test_contraction_cycle():
    nb, es = 20, 8
    phases = [contraction(f, nb, es) for f in range(1, nb + 1)]
    assert phases[0] == 0.0 and phases[es - 1] == pytest.approx(1.0)
    assert all(0.0 <= c <= 1.0 for c in phases)
    assert np.all(np.diff(phases[:es]) > 0) and np.all(np.diff(phases[es - 1:]) < 0)  # systole, then diastole
    assert phases[-1] < 0.05  # back near ED at the end of the cycle


def test_cine_4d_file_holds_the_cycle(tmp_path, tiny_synthetic):
    root = tmp_path / "cine"
    generate_dataset(root, sites=1, patients_per_site=2, seed=0, image_size=48, cine=True)
    for pid in ("patient001", "patient002"):
        pdir = root / "site_00" / pid
        info = dict(line.split(": ") for line in (pdir / "Info.cfg").read_text().splitlines())
        cine = nib.load(pdir / f"{pid}_4d.nii.gz")
        frames = np.asarray(cine.dataobj)
        ed_img, es_img = (nib.load(pdir / f"{pid}_frame{int(info[k]):02d}.nii.gz") for k in ("ED", "ES"))
        assert frames.shape == (*ed_img.shape, int(info["NbFrame"]))
        assert np.allclose(cine.affine, ed_img.affine)
        # the ED and ES frames of the cycle are exactly the labeled 3D files
        assert np.array_equal(frames[..., int(info["ED"]) - 1], np.asarray(ed_img.dataobj))
        assert np.array_equal(frames[..., int(info["ES"]) - 1], np.asarray(es_img.dataobj))
        # frames between ED and ES are new images, closer to their neighbours than ED is to ES
        es = int(info["ES"]) - 1
        mid = frames[..., es // 2].astype(float)
        ed, esf = frames[..., 0].astype(float), frames[..., es].astype(float)
        assert not np.array_equal(mid, ed) and not np.array_equal(mid, esf)
        assert np.abs(mid - ed).mean() < np.abs(esf - ed).mean()
    # the labeled files do not depend on whether the cycle is written
    for pid in ("patient001", "patient002"):
        for path in (tiny_synthetic / "site_00" / pid).glob("*_frame*.nii.gz"):
            other = root / "site_00" / pid / path.name
            assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(other).dataobj))


def test_cine_frames_become_unlabeled_records(tmp_path):
    root = ensure_builtin_dataset(tmp_path, sites=1, patients_per_site=1, seed=0, image_size=32, spacing=1.5, cine=True)
    plain = ensure_builtin_dataset(tmp_path, sites=1, patients_per_site=1, seed=0, image_size=32, spacing=1.5)
    assert root != plain and not list(plain.glob("*/*/*_4d.nii.gz"))  # cached apart
    nb = int(dict(line.split(": ") for line in next(root.glob("*/*/Info.cfg")).read_text().splitlines())["NbFrame"])
    records = discover_site(root / "site_00", "synthetic", use_4d_frames=True)
    assert sum(r.label is not None for r in records) == 2
    assert sum(r.from_4d for r in records) == nb - 2  # ED and ES are not repeated
