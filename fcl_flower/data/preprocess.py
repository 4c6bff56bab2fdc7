"""Loading, checking and preprocessing of volumes with MONAI, behind an on-disk cache.

Pipeline (MONAI transforms; no hand-written resampling):

1. ``LoadImage`` (nibabel reader) of image and label; for a 4D cine file, one frame.
2. Checks: readable NIfTI, 3D volume (not 2D), finite voxels, label of the same shape
   and affine, label values within the declared classes. Every failure is a
   ``DataError`` naming the file.
3. ``Orientationd`` that only flips the in-plane axes to the positive direction (the
   voxel axes are never permuted, and the slice axis keeps its stored order, so a
   stack stays base-to-apex as written).
4. ``Spacingd`` to ``data.target_spacing`` in-plane; the slice spacing is kept (pixdim
   -1), labels with nearest-neighbour interpolation.
5. ``ResizeWithPadOrCropd`` to ``data.image_size`` in-plane (centre crop / zero pad).
6. ``ScaleIntensityRangePercentilesd`` (clip to ``data.intensity_percentiles``, 0..1),
   then ``NormalizeIntensityd`` (z-score over the volume).

Results are cached as ``.npz`` under ``cache_dir`` (``data.cache_dir``; null:
``~/.cache/fcl-flower/preprocessed``), keyed by SHA-256 of the image and label file
contents plus the preprocessing settings, so a cached volume is never decoded again and
any change of content or settings misses the cache. Writes are atomic (temporary file +
``os.replace``); nothing is ever written next to the input files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fcl_flower.data.datasets import VolumeRecord, msd_classes
from fcl_flower.data.errors import DataError

PREPROCESS_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/fcl-flower/preprocessed"
_AFFINE_ATOL_MM = 1e-3
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # NIfTI world space is RAS


@dataclass
class Volume:
    """A preprocessed volume.

    Attributes:
        image: float32 (Z, H, W); Z is the slice axis in stored order (base to apex for
            ACDC-style stacks), (H, W) = ``data.image_size``; z-scored intensities.
        label: uint8 (Z, H, W) class map, or None for an unlabeled volume.
        record: where it came from.
        spacing: (z, y, x) voxel size in mm after resampling.
    """

    image: np.ndarray
    label: Optional[np.ndarray]
    record: VolumeRecord
    spacing: tuple[float, float, float]


# --------------------------------------------------------------------------- reading + checks


def declared_classes(record: VolumeRecord, num_classes: int) -> list[int]:
    """Allowed label values: MSD ``dataset.json`` labels, else 0..num_classes-1."""
    dataset_dir = record.image.parent.parent
    if (dataset_dir / "dataset.json").is_file():
        return msd_classes(dataset_dir)
    return list(range(int(num_classes)))


def read_nifti(path: Path):
    """Decode a NIfTI file with MONAI's ``LoadImage`` (nibabel reader).

    Returns:
        ``(array, affine)``: the voxel array as stored (X, Y, Z[, T]) in float32 and
        the 4x4 voxel-to-mm affine.

    Raises:
        DataError: missing, unreadable, truncated or not a NIfTI file.
    """
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file does not exist")

    def detail(exc: BaseException) -> str:
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__

    try:  # header first: a clear message for files that are not NIfTI at all
        header = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types
        raise DataError(path, f"cannot read NIfTI: not a NIfTI file or unreadable header ({detail(exc)})") from exc
    if not isinstance(header, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"cannot read NIfTI: file is {type(header).__name__}, not NIfTI")
    try:
        img = LoadImage(reader=NibabelReader(), image_only=True, dtype=np.float32)(str(path))
        array = np.asarray(img.array)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # gzip / zlib / nibabel errors of truncated or corrupt data
        raise DataError(path, f"cannot read NIfTI: truncated or corrupt voxel data ({detail(exc)})") from exc
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, "has an invalid (singular or non-finite) affine")
    return array, affine


def check_image(path: Path, array: np.ndarray, from_4d: bool = False, frame: int | None = None,
                is_msd: bool = False) -> np.ndarray:
    """Check an image array and return the 3D volume (X, Y, Z) it holds.

    A 4D file gives frame ``frame`` when ``from_4d``; for MSD the first modality of a
    multi-modal file; a trailing axis of length 1 is dropped.

    Raises:
        DataError: 2D image, wrong number of dimensions, missing frame, NaN/Inf voxels.
    """
    if from_4d:
        if array.ndim != 4:
            raise DataError(path, f"expected a 4D cine file, got shape {tuple(array.shape)}")
        if frame is None or not 0 <= frame < array.shape[3]:
            raise DataError(path, f"has {array.shape[3]} frames, frame index {frame} does not exist")
        array = array[..., frame]
    elif array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    elif array.ndim == 4 and is_msd:
        array = array[..., 0]  # multi-modal MSD task: the first modality
    if array.ndim == 2 or (array.ndim == 3 and min(array.shape) == 1):
        raise DataError(path, f"is a 2D image (shape {tuple(array.shape)}); a 3D volume is expected")
    if array.ndim != 3:
        raise DataError(
            path, f"has {array.ndim} dimensions (shape {tuple(array.shape)}); a 3D volume is expected"
            + (" (4D cine files are read with data.use_4d_frames)" if array.ndim == 4 else "")
        )
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(path, f"has {bad} NaN/Inf voxels")
    return array


def check_label(path: Path, label: np.ndarray, label_affine: np.ndarray, image_path: Path,
                image_shape: tuple[int, ...], image_affine: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Check a label array against its image; return it as uint8 (X, Y, Z).

    Raises:
        DataError: shape or affine mismatch, non-integer, non-finite or undeclared values.
    """
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if tuple(label.shape) != tuple(image_shape):
        raise DataError(path, f"label shape {tuple(label.shape)} does not match image shape "
                              f"{tuple(image_shape)} of {image_path.name}")
    if not np.allclose(label_affine, image_affine, atol=_AFFINE_ATOL_MM, rtol=1e-5):
        worst = float(np.max(np.abs(label_affine - image_affine)))
        raise DataError(path, f"label affine differs from the affine of {image_path.name} "
                              f"(largest difference {worst:.4g})")
    if not np.all(np.isfinite(label)):
        raise DataError(path, "label has NaN/Inf voxels")
    values = np.unique(label)
    if not np.all(values == np.round(values)):
        raise DataError(path, f"label has non-integer values, e.g. {values[values != np.round(values)][:3].tolist()}")
    bad = sorted(set(int(v) for v in values) - set(int(c) for c in classes))
    if bad:
        raise DataError(path, f"label values {bad} are outside the declared classes {list(classes)}")
    return label.astype(np.uint8)


# --------------------------------------------------------------------------- transforms


def _settings(cfg, classes: Sequence[int]) -> dict:
    lo, hi = (float(v) for v in cfg.data.intensity_percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        from fcl_flower.config import ConfigError

        raise ConfigError("config key 'data.intensity_percentiles': need [low, high] with 0 <= low < high <= 100")
    return {
        "version": PREPROCESS_VERSION,
        "target_spacing": [float(v) for v in cfg.data.target_spacing],
        "image_size": [int(v) for v in cfg.data.image_size],
        "intensity_percentiles": [lo, hi],
        "classes": [int(c) for c in classes],
    }


def _flip_only_axcodes(affine: np.ndarray) -> str:
    """Orientation codes that flip the two in-plane axes to R/A/S-positive, keeping axis order
    and the slice axis direction."""
    from nibabel.orientations import aff2axcodes

    positive = {"L": "R", "R": "R", "P": "A", "A": "A", "I": "S", "S": "S"}
    codes = list(aff2axcodes(affine))
    return "".join([positive[codes[0]], positive[codes[1]], codes[2]])


def _transform(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, settings: dict):
    """MONAI preprocessing of one (X, Y, Z) volume; returns (Z, H, W) arrays and (z, y, x) spacing."""
    from monai.data import MetaTensor
    from monai.transforms import (
        Compose, NormalizeIntensityd, Orientationd, ResizeWithPadOrCropd,
        ScaleIntensityRangePercentilesd, Spacingd,
    )

    keys = ["image"] + (["label"] if label is not None else [])
    modes = ["bilinear"] + (["nearest"] if label is not None else [])
    ty, tx = settings["target_spacing"]
    h, w = settings["image_size"]
    lo, hi = settings["intensity_percentiles"]
    pipeline = Compose([
        Orientationd(keys=keys, axcodes=_flip_only_axcodes(affine), labels=_AXIS_LABELS),
        Spacingd(keys=keys, pixdim=(tx, ty, -1.0), mode=modes),
        ResizeWithPadOrCropd(keys=keys, spatial_size=(w, h, -1)),
        ScaleIntensityRangePercentilesd(keys="image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True),
        NormalizeIntensityd(keys="image"),
    ])
    data = {"image": MetaTensor(np.ascontiguousarray(image[None], dtype=np.float32), affine=affine)}
    if label is not None:
        data["label"] = MetaTensor(np.ascontiguousarray(label[None], dtype=np.float32), affine=affine)
    out = pipeline(data)
    img = np.asarray(out["image"].array, dtype=np.float32)[0].transpose(2, 1, 0)
    zooms = np.linalg.norm(np.asarray(out["image"].affine, dtype=np.float64)[:3, :3], axis=0)
    lab = None
    if label is not None:
        lab = np.rint(np.asarray(out["label"].array)[0]).astype(np.uint8).transpose(2, 1, 0)
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return np.ascontiguousarray(img), (np.ascontiguousarray(lab) if lab is not None else None), spacing


# --------------------------------------------------------------------------- cache


def default_cache_dir(cfg) -> Path:
    """``cfg.data.cache_dir``, or ``~/.cache/fcl-flower/preprocessed`` when null."""
    return Path(str(cfg.data.cache_dir or DEFAULT_CACHE_DIR)).expanduser()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return digest.hexdigest()


def _key(image_hash: str, label_hash: str | None, record: VolumeRecord, frame: int | None, settings: dict) -> str:
    payload = json.dumps({
        "image": image_hash, "label": label_hash, "from_4d": record.from_4d,
        "frame": frame if record.from_4d else None, "settings": settings,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _entry(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.npz"


def _read_entry(path: Path, record: VolumeRecord, settings: dict) -> Volume | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            image = npz["image"]
            label = npz["label"] if "label" in npz.files else None
            spacing = tuple(float(v) for v in npz["spacing"])
    except Exception:  # a damaged entry is a miss; it is rewritten
        return None
    h, w = settings["image_size"]
    if image.ndim != 3 or image.shape[1:] != (h, w) or (label is not None and label.shape != image.shape):
        return None
    if (label is None) != (record.label is None):
        return None
    return Volume(image=image, label=label, record=record, spacing=spacing)  # type: ignore[arg-type]


def _write_entry(path: Path, volume: Volume) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"image": volume.image, "spacing": np.asarray(volume.spacing, dtype=np.float64)}
    if volume.label is not None:
        arrays["label"] = volume.label
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_cache_location(cache_dir: Path, record: VolumeRecord) -> None:
    data_dir = record.image.parent.parent.resolve()
    where = cache_dir.resolve()
    if where == data_dir or data_dir in where.parents:
        raise DataError(cache_dir, f"cache folder is inside the input folder {data_dir}; "
                                   "set data.cache_dir outside the data")


# --------------------------------------------------------------------------- public API


def load_volume(record: VolumeRecord, cfg, cache_dir: Path | None = None) -> Volume:
    """The preprocessed volume of ``record``, from the cache or decoded, checked and cached.

    A miss on one frame of a 4D file preprocesses and caches every frame of it, so the
    file is decoded once.

    Raises:
        DataError: any problem with the files (naming the file).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(cfg)
    _check_cache_location(cache_dir, record)
    is_msd = (record.image.parent.parent / "dataset.json").is_file()
    classes = declared_classes(record, cfg.model.num_classes)
    settings = _settings(cfg, classes)
    image_hash = file_sha256(record.image)
    label_hash = file_sha256(record.label) if record.label is not None else None
    path = _entry(cache_dir, _key(image_hash, label_hash, record, record.frame, settings))
    cached = _read_entry(path, record, settings)
    if cached is not None:
        return cached

    raw, affine = read_nifti(record.image)
    if record.from_4d:
        if raw.ndim != 4:
            raise DataError(record.image, f"expected a 4D cine file, got shape {tuple(raw.shape)}")
        wanted = None
        for t in range(raw.shape[3]):
            vol = check_image(record.image, raw, from_4d=True, frame=t)
            img, _, spacing = _transform(vol, None, affine, settings)
            frame_record = VolumeRecord(record.site, record.patient, record.image, None, t, True)
            volume = Volume(img, None, frame_record, spacing)
            _write_entry(_entry(cache_dir, _key(image_hash, None, record, t, settings)), volume)
            if t == record.frame:
                wanted = Volume(img, None, record, spacing)
        if wanted is None:
            raise DataError(record.image, f"has {raw.shape[3]} frames, frame index {record.frame} does not exist")
        return wanted

    vol = check_image(record.image, raw, is_msd=is_msd)
    lab = None
    if record.label is not None:
        lab_raw, lab_affine = read_nifti(record.label)
        lab = check_label(record.label, lab_raw, lab_affine, record.image, vol.shape, affine, classes)
    img, label, spacing = _transform(vol, lab, affine, settings)
    volume = Volume(img, label, record, spacing)
    _write_entry(path, volume)
    return volume


def load_site_volumes(records: list[VolumeRecord], cfg, cache_dir: Path | None = None) -> list[Volume]:
    """``load_volume`` for each record, in order."""
    return [load_volume(r, cfg, cache_dir) for r in records]
