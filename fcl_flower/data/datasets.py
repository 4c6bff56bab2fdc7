"""Dataset discovery: ACDC and MSD folder layouts, sites, and the built-in synthetic data.

Layouts (``fmt``):

* ``acdc`` (and ``synthetic``, which is written in the ACDC layout): a folder of
  ``patientNNN/`` sub-folders, each with ``patientNNN_frameFF.nii.gz`` images, optional
  ``patientNNN_frameFF_gt.nii.gz`` labels, optional ``Info.cfg`` and optional
  ``patientNNN_4d.nii.gz`` cine sequence (its frames become unlabeled volumes with
  ``use_4d_frames``).
* ``msd`` (Medical Segmentation Decathlon): ``dataset.json`` with ``labels``,
  ``training`` (image/label pairs) and ``test`` lists, ``imagesTr/``, ``labelsTr/``,
  ``imagesTs/`` (unlabeled). Hidden files (``._x.nii.gz``) are ignored.

A data root is either one such folder (split across ``cfg.sites`` sites) or a folder
with one such sub-folder per site. Discovery only lists files (and reads NIfTI headers
where a 4D frame count is needed); decoding and voxel checks happen in ``preprocess``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from fcl_flower.data.errors import DataError

FORMATS = ("synthetic", "acdc", "msd")
_PATIENT_DIR = re.compile(r"^patient\d+$")
_FRAME = re.compile(r"^(?P<pid>patient\d+)_frame(?P<frame>\d+)(?P<gt>_gt)?\.nii(\.gz)?$")
_FOURD = re.compile(r"^(?P<pid>patient\d+)_4d\.nii(\.gz)?$")
_NIFTI = re.compile(r"^[^.].*\.nii(\.gz)?$")


@dataclass(frozen=True)
class VolumeRecord:
    """One 3D volume on disk.

    Attributes:
        site: site name (folder name, or ``site_XX`` when one folder is split).
        patient: patient id (ACDC ``patientNNN``; MSD file name without extension).
        image: the image NIfTI file.
        label: the label NIfTI file, or None for an unlabeled volume.
        frame: ACDC frame number (1-based, as in the file name), or the 0-based index
            of the frame within a 4D file when ``from_4d``; None for MSD.
        from_4d: the volume is one frame of a 4D cine file (``image``).
    """

    site: str
    patient: str
    image: Path
    label: Optional[Path]
    frame: Optional[int]
    from_4d: bool = False


class _Problems:
    """Collects problems (inspection) or raises the first one (everything else)."""

    def __init__(self, sink: list[DataError] | None) -> None:
        self.sink = sink

    def add(self, path: Path, problem: str) -> None:
        err = DataError(path, problem)
        if self.sink is None:
            raise err
        self.sink.append(err)


def _nifti_stem(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name)


def read_info_cfg(path: Path) -> dict[str, str]:
    """ACDC ``Info.cfg`` as a dict (``ED``, ``ES``, ``Group``, ``Height``, ``NbFrame``, ``Weight``).

    Raises:
        DataError: unreadable file or a line that is not ``key: value``.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read Info.cfg ({exc})") from exc
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if ":" not in line:
            raise DataError(path, f"line {number} is not 'key: value': {line.strip()!r}")
        key, value = line.split(":", 1)
        out[key.strip()] = value.strip()
    return out


def _check_folder(folder: Path, problems: _Problems) -> bool:
    if not folder.exists():
        problems.add(folder, "folder does not exist")
        return False
    if not folder.is_dir():
        problems.add(folder, "is not a folder")
        return False
    if not any(p for p in folder.iterdir() if not p.name.startswith(".")):
        problems.add(folder, "folder is empty")
        return False
    return True


def _frames_in_4d(path: Path, info: dict[str, str], problems: _Problems) -> int:
    """Number of frames of a 4D file, from the NIfTI header (Info.cfg NbFrame as a cross-check)."""
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # nibabel raises several types for broken files
        problems.add(path, f"cannot read NIfTI header ({type(exc).__name__}: {exc})")
        return 0
    if len(shape) != 4:
        problems.add(path, f"a 4D cine file must have 4 dimensions, has shape {tuple(shape)}")
        return 0
    if "NbFrame" in info and info["NbFrame"].isdigit() and int(info["NbFrame"]) != shape[3]:
        problems.add(path, f"has {shape[3]} frames but Info.cfg says NbFrame: {info['NbFrame']}")
    return int(shape[3])


def _discover_acdc(site_dir: Path, site: str, use_4d_frames: bool, problems: _Problems) -> list[VolumeRecord]:
    patients = sorted(p for p in site_dir.iterdir() if p.is_dir() and _PATIENT_DIR.match(p.name))
    if not patients:
        problems.add(site_dir, "contains no patientNNN folders (ACDC layout expected)")
        return []
    records: list[VolumeRecord] = []
    for pdir in patients:
        images: dict[int, Path] = {}
        labels: dict[int, Path] = {}
        fourd: Path | None = None
        for f in sorted(pdir.iterdir()):
            m = _FRAME.match(f.name)
            if m:
                if m["pid"] != pdir.name:
                    problems.add(f, f"file name does not match its folder {pdir.name}")
                    continue
                (labels if m["gt"] else images)[int(m["frame"])] = f
            elif _FOURD.match(f.name):
                fourd = f
        info: dict[str, str] = {}
        if (pdir / "Info.cfg").is_file():
            try:
                info = read_info_cfg(pdir / "Info.cfg")
            except DataError as err:
                problems.add(err.path, err.problem)
        for frame, lab in sorted(labels.items()):
            if frame not in images:
                problems.add(lab, f"label without an image (no {pdir.name}_frame{frame:02d}.nii.gz)")
        for key in ("ED", "ES"):
            value = info.get(key, "")
            if value.isdigit() and int(value) not in images:
                problems.add(pdir, f"Info.cfg names {key} frame {int(value)} but its image file is missing")
        if not images and fourd is None:
            problems.add(pdir, "has no patientNNN_frameFF.nii.gz or patientNNN_4d.nii.gz files")
            continue
        for frame, img in sorted(images.items()):
            records.append(VolumeRecord(site, pdir.name, img, labels.get(frame), frame))
        if use_4d_frames and fourd is not None:
            for index in range(_frames_in_4d(fourd, info, problems)):
                if index + 1 not in images:  # frames already present as 3D files are not repeated
                    records.append(VolumeRecord(site, pdir.name, fourd, None, index, from_4d=True))
    return records


def read_msd_json(dataset_dir: Path) -> dict:
    """The parsed ``dataset.json`` of an MSD task folder.

    Raises:
        DataError: missing or invalid JSON, or no ``labels`` mapping.
    """
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise DataError(path, "missing (an MSD task folder needs dataset.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise DataError(path, "has no 'labels' mapping")
    try:
        {int(k) for k in meta["labels"]}
    except ValueError as exc:
        raise DataError(path, f"'labels' keys must be integers ({exc})") from exc
    return meta


def msd_classes(dataset_dir: Path) -> list[int]:
    """Label values declared in an MSD ``dataset.json``, sorted."""
    return sorted(int(k) for k in read_msd_json(dataset_dir)["labels"])


def _msd_path(dataset_dir: Path, entry: str) -> Path:
    return dataset_dir / entry  # pathlib drops the "./" of "./imagesTr/x.nii.gz"


def _discover_msd(site_dir: Path, site: str, problems: _Problems) -> list[VolumeRecord]:
    try:
        meta = read_msd_json(site_dir)
    except DataError as err:
        problems.add(err.path, err.problem)
        return []
    pairs: list[tuple[Path, Path | None]] = []
    if isinstance(meta.get("training"), list) or isinstance(meta.get("test"), list):
        for item in meta.get("training") or []:
            if not isinstance(item, dict) or "image" not in item:
                problems.add(site_dir / "dataset.json", f"training entry {item!r} has no 'image'")
                continue
            label = item.get("label")
            pairs.append((_msd_path(site_dir, item["image"]), _msd_path(site_dir, label) if label else None))
        for item in meta.get("test") or []:
            entry = item.get("image") if isinstance(item, dict) else item
            pairs.append((_msd_path(site_dir, str(entry)), None))
    else:  # no lists: take the folders as they are
        labels_dir = site_dir / "labelsTr"
        for sub in ("imagesTr", "imagesTs"):
            folder = site_dir / sub
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if _NIFTI.match(f.name):
                    lab = labels_dir / f.name if sub == "imagesTr" else None
                    pairs.append((f, lab if lab is not None and lab.exists() else None))
    records: list[VolumeRecord] = []
    seen: set[str] = set()
    for image, label in pairs:
        if not image.is_file():
            problems.add(image, "listed in dataset.json but missing")
            continue
        if label is not None and not label.is_file():
            problems.add(label, "listed in dataset.json but missing")
            continue
        patient = _nifti_stem(image.name)
        if patient in seen:
            problems.add(image, f"duplicate case id {patient}")
            continue
        seen.add(patient)
        records.append(VolumeRecord(site, patient, image, label, None))
    if not records:
        problems.add(site_dir, "contains no usable images (MSD layout expected)")
    return records


def discover_site(site_dir: Path, fmt: str, use_4d_frames: bool = False,
                  problems: list[DataError] | None = None, site: str | None = None) -> list[VolumeRecord]:
    """All volumes of one site folder, sorted by patient and frame.

    Args:
        site_dir: an ACDC-style folder of ``patientNNN/`` or an MSD task folder.
        fmt: ``synthetic`` | ``acdc`` | ``msd``.
        use_4d_frames: ACDC: also one unlabeled record per frame of ``patientNNN_4d``
            (frames that exist as 3D frame files are not repeated).
        problems: if given, problems are appended to it and discovery continues;
            otherwise the first problem is raised.
        site: the site name for the records (default: the folder name).

    Raises:
        DataError: missing or empty folder, no patients, a label without image, a
            missing file listed in dataset.json, unreadable Info.cfg ...
    """
    site_dir = Path(site_dir)
    collector = _Problems(problems)
    if fmt not in FORMATS:
        collector.add(site_dir, f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
        return []
    if not _check_folder(site_dir, collector):
        return []
    name = site or site_dir.name
    if fmt == "msd":
        return _discover_msd(site_dir, name, collector)
    return _discover_acdc(site_dir, name, use_4d_frames, collector)


def is_single_dataset(folder: Path, fmt: str) -> bool:
    """True when ``folder`` itself is one dataset (not a folder of site sub-folders)."""
    folder = Path(folder)
    if fmt == "msd":
        return (folder / "dataset.json").is_file()
    return any(p.is_dir() and _PATIENT_DIR.match(p.name) for p in folder.iterdir())


def site_subfolders(root: Path) -> list[Path]:
    """Non-hidden sub-folders of ``root``, sorted by name."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def site_name(index: int, sites: int) -> str:
    """``site_00`` ... : the name of a site cut from a single dataset folder."""
    return f"site_{index:0{max(2, len(str(sites - 1)))}d}"


def dataset_root(cfg) -> Path:
    """``cfg.data.root``, or the built-in synthetic dataset (generated once) when it is null.

    The built-in data has 4D cine files exactly when ``data.use_4d_frames`` asks for them.
    """
    if cfg.data.root is not None:
        return Path(str(cfg.data.root)).expanduser()
    from fcl_flower.config import ConfigError
    from fcl_flower.data.synthetic import PatientVariation, ensure_builtin_dataset

    if cfg.data.format != "synthetic":
        raise ConfigError(
            f"config key 'data.root' is null (built-in synthetic data) but 'data.format' is "
            f"{cfg.data.format!r}; set data.root to the dataset folder"
        )
    cache_root = cfg.synthetic.cache_root or "~/.cache/fcl-flower/synthetic"
    return ensure_builtin_dataset(
        Path(str(cache_root)).expanduser(), sites=cfg.sites,
        patients_per_site=cfg.synthetic.patients_per_site, seed=cfg.seed,
        image_size=cfg.synthetic.image_size, spacing=cfg.synthetic.spacing,
        cine=bool(cfg.data.use_4d_frames), variation=PatientVariation.of(cfg.synthetic),
    )


def patients_of(records: list[VolumeRecord]) -> list[str]:
    """Sorted unique patient ids of some records."""
    return sorted({r.patient for r in records})


def discover_sites(cfg) -> dict[str, list[VolumeRecord]]:
    """Every site's records, by site name (sorted).

    If ``cfg.data.root`` has one sub-folder per site, those are the sites and there must
    be exactly ``cfg.sites`` of them. If it is a single dataset folder, its patients are
    split across ``cfg.sites`` sites named ``site_00``... with ``cfg.data.split``
    (``iid`` or ``dirichlet`` with ``cfg.data.dirichlet_alpha``), seeded by ``cfg.seed``.

    Raises:
        DataError: root missing, wrong number of site folders, too few patients, or any
            discovery problem (naming the file).
    """
    from fcl_flower.data.splits import split_dirichlet, split_iid

    root = dataset_root(cfg)
    fmt = cfg.data.format
    use_4d = bool(cfg.data.use_4d_frames)
    if not root.is_dir():
        raise DataError(root, "data root does not exist" if not root.exists() else "data root is not a folder")
    if is_single_dataset(root, fmt):
        records = discover_site(root, fmt, use_4d)
        patients = patients_of(records)
        if len(patients) < cfg.sites:
            raise DataError(root, f"has {len(patients)} patients, fewer than sites = {cfg.sites}")
        try:
            if cfg.data.split == "dirichlet":
                groups = split_dirichlet(patients, cfg.sites, cfg.data.dirichlet_alpha, cfg.seed)
            else:
                groups = split_iid(patients, cfg.sites, cfg.seed)
        except ValueError as exc:
            raise DataError(root, str(exc)) from exc
        owner = {p: site_name(i, cfg.sites) for i, group in enumerate(groups) for p in group}
        out: dict[str, list[VolumeRecord]] = {site_name(i, cfg.sites): [] for i in range(cfg.sites)}
        for rec in records:
            out[owner[rec.patient]].append(replace(rec, site=owner[rec.patient]))
        return out
    return {p.name: discover_site(p, fmt, use_4d) for p in _checked_site_folders(cfg, root)}


def _checked_site_folders(cfg, root: Path) -> list[Path]:
    """The site sub-folders of ``root``, sorted; ``DataError`` unless there are ``cfg.sites``."""
    folders = site_subfolders(root)
    if len(folders) != cfg.sites:
        names = ", ".join(p.name for p in folders[:12]) + (" ..." if len(folders) > 12 else "")
        raise DataError(
            root,
            f"has {len(folders)} site sub-folders ({names or 'none'}) but sites = {cfg.sites}; "
            f"set sites={len(folders)} or point data.root at one dataset folder to split it"
            if folders else f"contains neither {cfg.data.format} data nor site sub-folders",
        )
    return folders


def site_records_for_partition(cfg, partition_id: int) -> tuple[str, list[VolumeRecord]]:
    """The site (name, records) that simulation partition ``partition_id`` stands for.

    Sites are ordered by name; partition ``i`` is the i-th site. With one folder per site
    only that site's folder is read (every simulated message resolves its site, so reading
    all of them made a round's cost grow with the square of the number of sites).
    """
    root = dataset_root(cfg)
    if root.is_dir() and not is_single_dataset(root, cfg.data.format):
        folders = _checked_site_folders(cfg, root)
        if not 0 <= int(partition_id) < len(folders):
            raise DataError(root, f"partition-id {partition_id} is out of range 0..{len(folders) - 1}")
        folder = folders[int(partition_id)]
        return folder.name, discover_site(folder, cfg.data.format, bool(cfg.data.use_4d_frames))
    sites = discover_sites(cfg)
    names = sorted(sites)
    if not 0 <= int(partition_id) < len(names):
        raise DataError(dataset_root(cfg), f"partition-id {partition_id} is out of range 0..{len(names) - 1}")
    name = names[int(partition_id)]
    return name, sites[name]


def site_records_from_dir(data_dir: Path, fmt: str, use_4d_frames: bool) -> list[VolumeRecord]:
    """Deployment: the records of the one site whose data lives in ``data_dir``."""
    return discover_site(Path(data_dir).expanduser(), fmt, use_4d_frames)
