"""inspect_dataset / write_montage and the make-synthetic / inspect-data subcommands."""

import hashlib
import shutil

import numpy as np
import pytest
from conftest import make_acdc_patient, make_msd, write_nifti

from fcl_flower.cli import main
from fcl_flower.data.errors import DataError
from fcl_flower.data.inspect import DatasetReport, detect_format, inspect_dataset, write_montage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fingerprint(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns,
                   hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
                  for p in root.rglob("*"))


def test_clean_synthetic_dataset(tiny_synthetic, tmp_path):
    report = inspect_dataset(tiny_synthetic)
    assert isinstance(report, DatasetReport)
    assert report.format == "synthetic" and report.layout == "sites" and report.problems == []
    assert report.sites == {"site_00": ["patient001", "patient002"], "site_01": ["patient003", "patient004"]}
    assert len(report.volumes) == 8 and all(v.ok for v in report.volumes)
    assert all(v.label_values == [0, 1, 2, 3] for v in report.volumes)
    text = report.summary()
    assert "site_00: 2 patients, 4 volumes" in text and "no problems found" in text
    png = write_montage(report, tmp_path / "m.png", slices=4)
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 2000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05


def test_detect_single_folders(tmp_path):
    make_acdc_patient(tmp_path / "acdc", "patient001", frames=(1,))
    make_msd(tmp_path / "msd")
    assert detect_format(tmp_path / "acdc") == "acdc"
    assert detect_format(tmp_path / "msd") == "msd"
    assert detect_format(tmp_path) is None
    report = inspect_dataset(tmp_path / "msd")
    assert report.layout == "single" and report.format == "msd" and report.problems == []
    assert len(report.volumes) == 5 and sum(v.label_values is not None for v in report.volumes) == 3


def _broken_dataset(root):
    """Two ACDC sites with one problem in each of several files; returns the culprits."""
    a, b = root / "site_a", root / "site_b"
    for i in (1, 2, 3):
        make_acdc_patient(a, f"patient{i:03d}", frames=(1,))
    make_acdc_patient(b, "patient004", frames=(1,), with_4d=True, nb_frames=3)
    make_acdc_patient(b, "patient005", frames=(1,))
    culprits = []
    img = a / "patient001" / "patient001_frame01.nii.gz"
    img.write_bytes(img.read_bytes()[:100])  # truncated
    culprits.append(img)
    lab = a / "patient002" / "patient002_frame01_gt.nii.gz"
    write_nifti(lab, np.full((24, 20, 6), 9), dtype=np.uint8)  # out of range
    culprits.append(lab)
    lab = a / "patient003" / "patient003_frame01_gt.nii.gz"
    write_nifti(lab, np.zeros((24, 20, 4)), dtype=np.uint8)  # shape mismatch
    culprits.append(lab)
    cine = b / "patient004" / "patient004_4d.nii.gz"
    arr = np.zeros((24, 20, 6, 3), dtype=np.float32)
    arr[0, 0, 0, 2] = np.nan
    write_nifti(cine, arr, dtype=np.float32)  # NaN in a 4D frame
    culprits.append(cine)
    img = b / "patient005" / "patient005_frame01.nii.gz"
    write_nifti(img, np.ones((24, 20)), dtype=np.int16)  # 2D
    culprits.append(img)
    (root / "site_c").mkdir()  # empty site folder
    culprits.append(root / "site_c")
    return culprits


def test_all_problems_listed_and_nothing_modified(tmp_path, capsys):
    root = tmp_path / "data"
    culprits = _broken_dataset(root)
    before = _fingerprint(root)
    report = inspect_dataset(root, fmt="auto")
    assert sorted(str(p.path) for p in report.problems) == sorted(str(c) for c in culprits)
    assert all(isinstance(p, DataError) for p in report.problems)
    code = main(["inspect-data", str(root), "--montage", str(tmp_path / "m.png")])
    out = capsys.readouterr().out
    assert code != 0
    for culprit in culprits:
        assert f"{culprit}: " in out
    assert f"{len(culprits)} problem(s)" in out
    assert (tmp_path / "m.png").read_bytes().startswith(PNG_SIGNATURE)  # good volumes still shown
    assert _fingerprint(root) == before


def test_inspect_missing_or_empty_root(tmp_path, capsys):
    assert main(["inspect-data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing'}: folder does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main(["inspect-data", str(tmp_path / "empty")]) == 1
    assert f"{tmp_path / 'empty'}: folder is empty" in capsys.readouterr().out
    with pytest.raises(DataError):
        write_montage(inspect_dataset(tmp_path / "empty"), tmp_path / "x.png")


def test_make_synthetic_cli(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(["make-synthetic", "--out", str(out), "--sites", "2", "--patients-per-site", "1",
                 "--seed", "3", "synthetic.image_size=32"])
    assert code == 0 and (out / "manifest.json").is_file()
    assert "wrote 2 sites x 1 patients" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "site_00", "site_01"]
    assert main(["inspect-data", str(out)]) == 0
    # refusing to overwrite is a clean DataError, exit 2
    assert main(["make-synthetic", "--out", str(out), "--sites", "1", "--patients-per-site", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    shutil.rmtree(out)
