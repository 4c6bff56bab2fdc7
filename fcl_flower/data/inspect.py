"""Inspect a dataset folder: what is in it, and every problem with it, plus a PNG montage.

``inspect_dataset`` never stops at the first problem: it walks every site, patient and
file, decodes each NIfTI once and runs the same checks as ``preprocess.load_volume``,
collecting one ``DataError`` per faulty file. Nothing is written anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fcl_flower.data.datasets import (
    VolumeRecord, discover_site, is_single_dataset, msd_classes, site_subfolders,
)
from fcl_flower.data.errors import DataError
from fcl_flower.data.preprocess import check_image, check_label, read_nifti

ACDC_CLASSES = [0, 1, 2, 3]
_OVERLAY = {1: (1.0, 0.2, 0.2), 2: (0.2, 1.0, 0.2), 3: (0.25, 0.45, 1.0)}


@dataclass
class VolumeInfo:
    """What was found in one image file (one frame, or a whole 4D cine file)."""

    record: VolumeRecord
    shape: Optional[tuple[int, ...]] = None          # stored voxel shape (X, Y, Z[, T])
    spacing: Optional[tuple[float, float, float]] = None  # (z, y, x) mm
    label_values: Optional[list[int]] = None
    ok: bool = False


@dataclass
class DatasetReport:
    """Result of ``inspect_dataset``.

    Attributes:
        root: the inspected folder.
        format: ``acdc`` | ``synthetic`` | ``msd`` (or ``mixed``/``unknown``).
        layout: ``single`` (one dataset folder) or ``sites`` (one sub-folder per site).
        sites: site name -> sorted patient ids.
        volumes: one entry per image file.
        problems: every problem found, each naming its file.
    """

    root: Path
    format: str
    layout: str
    sites: dict[str, list[str]] = field(default_factory=dict)
    volumes: list[VolumeInfo] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)

    def summary(self) -> str:
        """A human-readable multi-line summary, problems last."""
        n_pat = sum(len(p) for p in self.sites.values())
        lines = [f"dataset {self.root}: format {self.format}, "
                 + (f"{len(self.sites)} site folders" if self.layout == "sites" else "one dataset folder")
                 + f", {n_pat} patients, {len(self.volumes)} image files"]
        for site, patients in self.sites.items():
            vols = [v for v in self.volumes if v.record.site == site]
            good = [v for v in vols if v.ok and v.spacing is not None and v.shape is not None]
            labeled = sum(1 for v in vols if v.record.label is not None)
            fourd = sum(1 for v in vols if v.record.from_4d)
            text = (f"  {site}: {len(patients)} patients, {len(vols)} volumes "
                    f"({labeled} labeled, {len(vols) - labeled - fourd} unlabeled"
                    + (f", {fourd} 4D cine files" if fourd else "") + ")")
            if good:
                zs = [v.shape[2] for v in good]
                planes = sorted({f"{v.shape[0]}x{v.shape[1]}" for v in good})
                sz = [v.spacing[0] for v in good]
                sxy = [v.spacing[2] for v in good]
                values = sorted({x for v in good for x in (v.label_values or [])})
                text += (f", slices {min(zs)}-{max(zs)}, in-plane {', '.join(planes[:3])}"
                         + (" ..." if len(planes) > 3 else "")
                         + f", spacing z {min(sz):.2f}-{max(sz):.2f} mm, xy {min(sxy):.2f}-{max(sxy):.2f} mm"
                         + (f", label values {values}" if values else ""))
            lines.append(text)
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend(f"  - {p}" for p in self.problems)
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def detect_format(folder: Path) -> Optional[str]:
    """``msd`` (dataset.json), ``synthetic`` (patient folders + generator manifest),
    ``acdc`` (patient folders), or None."""
    folder = Path(folder)
    if (folder / "dataset.json").is_file():
        return "msd"
    if folder.is_dir() and is_single_dataset(folder, "acdc"):
        for manifest in (folder / "manifest.json", folder.parent / "manifest.json"):
            if manifest.is_file():
                try:
                    if "synthetic" in json.loads(manifest.read_text()).get("generator", ""):
                        return "synthetic"
                except (OSError, ValueError, AttributeError):
                    pass
        return "acdc"
    return None


def _zooms(affine: np.ndarray) -> tuple[float, float, float]:
    z = np.linalg.norm(affine[:3, :3], axis=0)
    return float(z[2]), float(z[1]), float(z[0])


def _inspect_record(rec: VolumeRecord, classes: list[int], is_msd: bool, problems: list[DataError]) -> VolumeInfo:
    info = VolumeInfo(rec)
    try:
        raw, affine = read_nifti(rec.image)
        info.shape = tuple(int(s) for s in raw.shape)
        info.spacing = _zooms(affine)
        if rec.from_4d:  # check every frame of the cine file at once
            if raw.ndim != 4:
                raise DataError(rec.image, f"expected a 4D cine file, got shape {info.shape}")
            for t in range(raw.shape[3]):
                check_image(rec.image, raw, from_4d=True, frame=t)
            info.ok = True
            return info
        vol = check_image(rec.image, raw, is_msd=is_msd)
        if rec.label is not None:
            lab, lab_affine = read_nifti(rec.label)
            lab = check_label(rec.label, lab, lab_affine, rec.image, vol.shape, affine, classes)
            info.label_values = sorted(int(v) for v in np.unique(lab))
        info.ok = True
    except DataError as err:
        problems.append(err)
    return info


def inspect_dataset(root: Path, fmt: str = "auto") -> DatasetReport:
    """Summarise a dataset folder and collect all its problems.

    Args:
        root: one ACDC / MSD / synthetic dataset folder, or a folder of site sub-folders.
        fmt: ``auto`` (dataset.json: msd; patientNNN folders: acdc, or synthetic when a
            generator manifest is present; otherwise site sub-folders, each detected),
            or one of ``synthetic``, ``acdc``, ``msd``.

    Raises:
        DataError: ``root`` does not exist or is not a folder (nothing to inspect).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(root, "folder does not exist")
    if not root.is_dir():
        raise DataError(root, "is not a folder")
    problems: list[DataError] = []
    single_fmt = detect_format(root) if fmt == "auto" else (fmt if is_single_dataset(root, fmt) else None)
    if single_fmt is not None:
        layout, site_dirs = "single", [(root, single_fmt)]
    else:
        layout, site_dirs = "sites", []
        subs = site_subfolders(root)
        if not subs:
            visible = [p for p in root.iterdir() if not p.name.startswith(".")]
            problems.append(DataError(root, "folder is empty" if not visible else
                                      "contains no ACDC patient folders, MSD dataset.json or site sub-folders"))
        for sub in subs:
            sub_fmt = detect_format(sub) if fmt == "auto" else fmt
            if sub_fmt is None:
                visible = [p for p in sub.iterdir() if not p.name.startswith(".")]
                problems.append(DataError(sub, "folder is empty" if not visible else
                                          "is neither an ACDC folder (patientNNN/) nor an MSD folder (dataset.json)"))
                continue
            site_dirs.append((sub, sub_fmt))
    formats = {f for _, f in site_dirs}
    report = DatasetReport(root=root, format=formats.pop() if len(formats) == 1 else ("mixed" if formats else "unknown"),
                           layout=layout, problems=problems)
    for site_dir, site_fmt in site_dirs:
        records = discover_site(site_dir, site_fmt, use_4d_frames=True, problems=problems)
        report.sites[site_dir.name] = sorted({r.patient for r in records})
        classes = ACDC_CLASSES
        if site_fmt == "msd":
            try:
                classes = msd_classes(site_dir)
            except DataError:
                pass  # already reported by discovery
        seen_4d: set[Path] = set()
        for rec in records:
            if rec.from_4d:
                if rec.image in seen_4d:
                    continue
                seen_4d.add(rec.image)
                rec = VolumeRecord(rec.site, rec.patient, rec.image, None, None, True)
            report.volumes.append(_inspect_record(rec, classes, site_fmt == "msd", problems))
    return report


def _montage_rows(report: DatasetReport, max_rows: int = 8) -> list[VolumeInfo]:
    candidates = [v for v in report.volumes if v.ok and not v.record.from_4d]
    labeled = [v for v in candidates if v.record.label is not None] or candidates
    rows: list[VolumeInfo] = []
    by_site: dict[str, list[VolumeInfo]] = {}
    for v in labeled:
        by_site.setdefault(v.record.site, []).append(v)
    while len(rows) < max_rows and any(by_site.values()):  # round-robin over sites
        for site in list(by_site):
            if by_site[site] and len(rows) < max_rows:
                rows.append(by_site[site].pop(0))
    return rows


def write_montage(report: DatasetReport, png: Path, slices: int = 8) -> Path:
    """Write a PNG grid: one row per volume (one per site first), ``slices`` evenly spaced
    slices from base to apex, label classes overlaid in colour (1 red, 2 green, 3 blue).

    Raises:
        DataError: no readable volume to show, or the PNG cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    png = Path(png)
    rows = _montage_rows(report)
    if not rows:
        raise DataError(report.root, "no readable volume to show in a montage")
    slices = max(1, int(slices))
    fig = Figure(figsize=(1.6 * slices, 1.75 * len(rows)), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    for r, info in enumerate(rows):
        image, _ = read_nifti(info.record.image)
        image = check_image(info.record.image, image)
        label = None
        if info.record.label is not None:
            label, _ = read_nifti(info.record.label)
            label = label.reshape(image.shape)
        lo, hi = np.percentile(image, [1.0, 99.5])
        index = np.unique(np.linspace(0, image.shape[2] - 1, slices).round().astype(int))
        for c in range(slices):
            ax = fig.add_subplot(len(rows), slices, r * slices + c + 1)
            ax.set_axis_off()
            if c >= len(index):
                continue
            k = int(index[c])
            ax.imshow(image[:, :, k].T, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
            if label is not None:
                rgba = np.zeros(label.shape[:2][::-1] + (4,), dtype=np.float32)
                lab = label[:, :, k].T
                for value, colour in _OVERLAY.items():
                    rgba[lab == value] = (*colour, 0.35)
                ax.imshow(rgba, interpolation="nearest")
            if c == 0:
                frame = f" frame {info.record.frame}" if info.record.frame is not None else ""
                ax.set_title(f"{info.record.site} {info.record.patient}{frame}", color="white",
                             fontsize=7, loc="left")
            else:
                ax.set_title(f"z={k}", color="white", fontsize=6, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.03, hspace=0.18)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, format="png", facecolor="black")
    except OSError as exc:
        raise DataError(png, f"cannot write the montage ({exc.strerror or exc})") from exc
    return png
