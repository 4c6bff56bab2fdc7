"""Where a site's data and state live, for simulation and deployment alike.

A simulated site is addressed by ``partition-id`` into ``cfg.data.root``; a deployed
site by the ``data-dir`` (and optional ``site-name``, ``state-dir``) of its SuperNode's
``--node-config``. State that must survive rounds lives in per-round folders on the
site's disk, because Ray reuses processes across sites and a SuperNode starts a fresh
process for every round. Flower-free.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from omegaconf import DictConfig

from fcl_flower.config import with_overrides
from fcl_flower.data.datasets import VolumeRecord, dataset_root, site_records_for_partition, site_records_from_dir

DEFAULT_STATE_ROOT = Path.home() / ".fcl-flower" / "sites"


@dataclass(frozen=True)
class Site:
    """One site of the federation as seen from its own machine."""

    name: str
    records: list[VolumeRecord]
    state_dir: Path  # this run's state of this site


def resolve_data_root(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``data.root`` set; the built-in synthetic data is generated on first use."""
    if cfg.data.root is not None:
        return cfg
    return with_overrides(cfg, [f"data.root={dataset_root(cfg)}"])


def resolve_site(cfg: DictConfig, node_config: Mapping[str, object]) -> Site:
    """The site this process serves, from the SuperNode's node config.

    Deployment: ``data-dir`` (required), ``site-name`` (default: the folder name) and
    ``state-dir`` (default ``~/.fcl-flower/sites/<site-name>``). Simulation:
    ``partition-id`` into ``cfg.data.root``; state under ``<output_dir>/sites/<site>``.
    """
    run_key = Path(cfg.output_dir).name
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        name = str(node_config.get("site-name") or data_dir.name)
        state_root = Path(str(node_config.get("state-dir") or DEFAULT_STATE_ROOT / name)).expanduser()
        records = site_records_from_dir(data_dir, cfg.data.format, cfg.data.use_4d_frames)
        return Site(name, records, state_root / run_key)
    if "partition-id" not in node_config:
        raise ValueError("node config has neither 'data-dir' (deployment) nor 'partition-id' (simulation)")
    name, records = site_records_for_partition(cfg, int(node_config["partition-id"]))
    return Site(name, records, Path(cfg.output_dir) / "sites" / name)


def split_holdout(
    records: list[VolumeRecord], fraction: float, seed: int, site: str
) -> tuple[list[VolumeRecord], list[VolumeRecord]]:
    """Split a site's volumes by patient into (train, held-out); at least one train patient.

    Deterministic for (seed, site); all volumes of a patient land on the same side.
    """
    patients = sorted({r.patient for r in records})
    n_holdout = min(int(round(fraction * len(patients))), len(patients) - 1)
    site_seed = int.from_bytes(hashlib.sha256(f"{seed}:{site}".encode()).digest()[:8], "little")
    held = set(np.random.default_rng(site_seed).permutation(patients)[:n_holdout].tolist())
    return [r for r in records if r.patient not in held], [r for r in records if r.patient in held]


class RoundStateStore:
    """Per-round state folders of one site, so a re-run round starts from the same state.

    Round ``r`` starts from a copy of the state committed by the latest round before
    ``r`` (or from nothing) and commits its own state as ``round-<r>``. A server that
    resumes and re-runs a round therefore gets the same result as the first time, and a
    site that missed rounds continues from its last committed state.
    """

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep

    def _committed(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        rounds = [(int(p.name.split("-")[1]), p) for p in self.root.glob("round-*") if p.is_dir()]
        return sorted(rounds)

    def latest_before(self, server_round: int) -> Path | None:
        """The committed state folder of the latest round < ``server_round``, if any."""
        earlier = [p for r, p in self._committed() if r < server_round]
        return earlier[-1] if earlier else None

    def checkout(self, server_round: int) -> Path:
        """A fresh working folder holding a copy of the state to start ``server_round`` from."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".work-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = self.root / f".work-{server_round}-{uuid.uuid4().hex[:8]}"
        source = self.latest_before(server_round)
        if source is None:
            work.mkdir()
        else:
            shutil.copytree(source, work)
        return work

    def commit(self, server_round: int, work: Path) -> Path:
        """Make ``work`` the committed state of ``server_round``; keep the newest ``keep``."""
        target = self.root / f"round-{server_round:05d}"
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
        for _, old in self._committed()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target
