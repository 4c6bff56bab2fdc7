"""How much a pre-trained projection still tells slices apart: a label-free collapse probe.

For a finished pre-training run (``<run>/global_weights.npz`` and ``<run>/config.yaml``)
every site draws one batch (up to 8 of its volumes x S partitions, two augmented views,
the run's own sampler), both views go through the global encoder + head in training mode
(batch statistics, as in pre-training), and the cosine of the projections is averaged over
three kinds of pairs:

- ``own_view``: the two views of one slice;
- ``same_partition``: slices of the same partition from different volumes;
- ``other_partition``: slices of different partitions.

A representation that keeps what distinguishes one slice from another has ``own_view``
clearly above ``same_partition``; a partition-only representation (every slice of a
partition mapped to one point) has the two nearly equal; a fully collapsed one has all
three near 1. The means over sites are printed, one line per run, and written as JSON
with ``--json``::

    python simulations/representation_probe.py runs/paper-full/fcl runs/paper-full/fedsimclr
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fcl_flower.config import load_config  # noqa: E402
from fcl_flower.data.preprocess import load_site_volumes  # noqa: E402
from fcl_flower.data.sampling import PartitionSampler  # noqa: E402
from fcl_flower.models import build_encoder, build_head, set_weights  # noqa: E402
from fcl_flower.pretrain import METHODS  # noqa: E402
from fcl_flower.site import resolve_data_root, resolve_site  # noqa: E402

PAIR_KINDS = ("own_view", "same_partition", "other_partition")
VOLUMES_PER_SITE = 8


def similarity_profile(
    z1: torch.Tensor, z2: torch.Tensor, partition: torch.Tensor, volume: torch.Tensor
) -> dict[str, float]:
    """Mean cosine of the two views' projections over the three kinds of pairs.

    Args:
        z1, z2: (N, d) L2-normalised projections of view 1 and view 2 of N slices.
        partition, volume: (N,) int64 partition and volume ids of the slices.

    Returns:
        ``own_view`` (pairs (i, i)), ``same_partition`` (same partition, other volume) and
        ``other_partition``; nan for a kind with no pair.
    """
    sim = z1 @ z2.T
    same_volume = volume[:, None] == volume[None, :]
    same_partition = partition[:, None] == partition[None, :]
    masks = {
        "own_view": torch.eye(len(sim), dtype=torch.bool),
        "same_partition": same_partition & ~same_volume,
        "other_partition": ~same_partition,
    }
    return {k: float(sim[m].mean()) if m.any() else float("nan") for k, m in masks.items()}


def probe_run(run: Path, overrides: Sequence[str] = ()) -> dict[str, float]:
    """``similarity_profile`` of a run's global encoder + head, averaged over its sites."""
    cfg = resolve_data_root(load_config(overrides, run / "config.yaml"))
    if cfg.method not in METHODS or cfg.method == "rotation":
        raise SystemExit(f"representation_probe: {run} is a {cfg.method!r} run; the probe needs contrastive projections")
    weights_file = run / "global_weights.npz"
    if not weights_file.is_file():
        raise SystemExit(f"representation_probe: {weights_file} does not exist (a run that finished pre-training writes it)")
    with np.load(weights_file) as saved:
        weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    encoder, head = build_encoder(cfg), build_head(cfg)
    set_weights(encoder, head, weights)
    encoder.train()
    head.train()
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for partition in range(cfg.sites):
        site = resolve_site(cfg, {"partition-id": partition, "num-partitions": cfg.sites})
        volumes = [v.image for v in load_site_volumes(site.records, cfg)]
        batch = PartitionSampler(volumes, cfg, rng).sample(np.arange(min(VOLUMES_PER_SITE, len(volumes))))
        with torch.no_grad():
            z1, z2 = head(encoder(batch.view1)[0]), head(encoder(batch.view2)[0])
        rows.append(similarity_profile(z1, z2, batch.partition, batch.volume))
    return {k: float(np.nanmean([r[k] for r in rows])) for k in PAIR_KINDS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pre-training run folders (output_dir of a run)")
    parser.add_argument("--json", type=Path, default=None, help="also write {run: profile} here")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a dotlist override of the runs' configs, e.g. --set data.root=/data (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for run in args.runs:
        profile = probe_run(run, args.overrides)
        out[str(run)] = profile
        print(f"{run}: " + "  ".join(f"{k} {profile[k]:.3f}" for k in PAIR_KINDS), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
