"""Atomic, numpy-only run checkpoints: one ``.npz`` per completed round.

A checkpoint holds named arrays (global weights, stored banks, strategy state) and one
JSON document (round, stage, config, RNG states, bookkeeping). It is written to a
temporary file and renamed into place, so a crash never leaves a half-written
checkpoint; the newest ``keep`` are kept. Flower-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_META_KEY = "__meta__"


@dataclass
class Checkpoint:
    """What a run needs to continue after its last completed round."""

    server_round: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def checkpoint_path(folder: Path, server_round: int) -> Path:
    return folder / f"round-{server_round:05d}.npz"


def save_checkpoint(folder: Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write ``ckpt`` atomically as ``folder/round-NNNNN.npz``; prune older ones."""
    folder.mkdir(parents=True, exist_ok=True)
    if _META_KEY in ckpt.arrays:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    meta = json.dumps({"server_round": ckpt.server_round, **ckpt.meta})
    target = checkpoint_path(folder, ckpt.server_round)
    tmp = target.with_suffix(".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **ckpt.arrays, **{_META_KEY: np.array(meta)})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    for old in sorted(folder.glob("round-*.npz"))[:-keep]:
        if not old.name.endswith(".tmp.npz"):
            old.unlink()
    return target


def load_latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``folder``, or None if there is none."""
    candidates = sorted(p for p in folder.glob("round-*.npz") if not p.name.endswith(".tmp.npz"))
    if not candidates:
        return None
    with np.load(candidates[-1], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != _META_KEY}
        meta = json.loads(str(data[_META_KEY]))
    return Checkpoint(server_round=int(meta.pop("server_round")), arrays=arrays, meta=meta)


def pack_arrays(prefix: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Name a list of arrays ``prefix/0000``, ``prefix/0001``... for a checkpoint."""
    return {f"{prefix}/{i:04d}": a for i, a in enumerate(arrays)}


def unpack_arrays(prefix: str, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The list stored by ``pack_arrays(prefix, ...)``, in order."""
    keys = sorted(k for k in arrays if k.startswith(prefix + "/"))
    return [arrays[k] for k in keys]
