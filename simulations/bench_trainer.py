"""Throughput of ``pretrain_round`` against a minimal plain-PyTorch loop doing the same work.

Both sides train the same encoder + head (``cfg.model``) with the same optimizer on the same
``PartitionSampler`` batches (augmentation included in both), the FCL loss against a full
bank of K = ``pretrain.bank_sample_size`` rows, and the momentum update. The plain loop has
no queue, no bank draw, no site state and no metrics; the trainer's time is the whole
``pretrain_round`` call (model build, state load and save included). Runs alternate so a
busy neighbour slows both; medians are reported, in wall time and in this process's CPU
time (with one thread the CPU time hardly depends on what else the machine runs, so the
CPU ratio is the one to trust on a shared machine).

    python simulations/bench_trainer.py                      # default config: 20 volumes 96x96, 1 epoch
    python simulations/bench_trainer.py --repeats 5 pretrain.batch_volumes=8
    python simulations/bench_trainer.py pretrain.precision=bfloat16    # mixed precision, both sides
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fcl_flower.config import load_config
from fcl_flower.data.sampling import PartitionSampler
from fcl_flower.losses import fcl_loss
from fcl_flower.models import build_encoder, build_head
from fcl_flower.pretrain import initial_weights, pretrain_round, project


def _volumes(n: int, depth: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((depth, *size), dtype=np.float32) for _ in range(n)]


def _remote_bank(rows: int, dim: int, parts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((rows, dim)).astype(np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True), rng.integers(0, parts, rows)


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def plain_epoch(cfg, volumes: list[np.ndarray], bank: torch.Tensor, bank_part: torch.Tensor, seed: int) -> tuple[int, Clock]:
    """One epoch of the textbook MoCo loop; returns (slices, time of the loop)."""
    torch.manual_seed(seed)
    encoder, head = build_encoder(cfg), build_head(cfg)
    key_encoder, key_head = copy.deepcopy(encoder).requires_grad_(False), copy.deepcopy(head).requires_grad_(False)
    params = [*encoder.parameters(), *head.parameters()]
    key_params = [*key_encoder.parameters(), *key_head.parameters()]
    p = cfg.pretrain
    if p.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    sampler = PartitionSampler(volumes, cfg, np.random.default_rng(seed))
    slices = 0
    with Clock() as clock:
        for batch in sampler.epoch():
            q = project(encoder, head, batch.view1, p.precision)
            with torch.no_grad():
                k = project(key_encoder, key_head, batch.view2, p.precision)
            loss = fcl_loss(q, k, batch.partition, batch.partition, bank, bank_part, p.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for kp, qp in zip(key_params, params):
                    kp.mul_(p.ema_momentum).add_(qp, alpha=1 - p.ema_momentum)
            slices += batch.partition.numel()
    return slices, clock


def sampler_epoch(cfg, volumes: list[np.ndarray], seed: int) -> tuple[int, Clock]:
    """Sampling and augmentation alone; returns (slices, time)."""
    with Clock() as clock:
        slices = sum(b.partition.numel() for b in PartitionSampler(volumes, cfg, np.random.default_rng(seed)).epoch())
    return slices, clock


def measure(
    overrides: list[str] | tuple[str, ...] = (), volumes: int = 20, depth: int = 10, repeats: int = 3,
    remote_rows: int = 9 * 512, echo=print,
) -> dict:
    """Alternate ``pretrain_round`` and the plain loop ``repeats`` times (after one warm-up pair); the report."""
    cfg = load_config(["method=fcl", *overrides])
    torch.set_num_threads(cfg.pretrain.threads)
    vols = _volumes(volumes, depth, tuple(cfg.data.image_size), cfg.seed)
    remote = _remote_bank(remote_rows, cfg.model.proj_dim, cfg.data.num_partitions, cfg.seed)
    k = cfg.pretrain.bank_sample_size
    bank = torch.from_numpy(remote[0][:k]).clone()
    bank_part = torch.from_numpy(remote[1][:k]).clone()

    runs: dict[str, list[float]] = {"trainer": [], "trainer_cpu": [], "plain": [], "plain_cpu": [], "sampler": []}
    weights = initial_weights(cfg)
    with tempfile.TemporaryDirectory() as state_dir:
        for rep in range(repeats + 1):  # the first pair warms caches and is dropped
            with Clock() as trainer:
                result = pretrain_round(weights, remote, vols, cfg, Path(state_dir), rep + 1)
            slices, plain = plain_epoch(cfg, vols, bank, bank_part, cfg.seed + rep)
            aug_slices, aug = sampler_epoch(cfg, vols, cfg.seed + rep)
            if rep == 0:
                continue
            assert result.metrics["samples"] == slices
            for key, value in (("trainer", slices / trainer.wall), ("trainer_cpu", slices / trainer.cpu),
                               ("plain", slices / plain.wall), ("plain_cpu", slices / plain.cpu),
                               ("sampler", aug_slices / aug.wall)):
                runs[key].append(value)
            echo(f"repeat {rep}: trainer {runs['trainer'][-1]:.1f} slices/s wall, {runs['trainer_cpu'][-1]:.1f} cpu "
                 f"({trainer.wall:.2f} s/epoch); plain loop {runs['plain'][-1]:.1f} wall, {runs['plain_cpu'][-1]:.1f} cpu; "
                 f"sampling+augmentation alone {runs['sampler'][-1]:.0f} slices/s")

    median = {key: statistics.median(values) for key, values in runs.items()}
    return {
        "config": {"image_size": list(cfg.data.image_size), "channels": list(cfg.model.channels),
                   "batch_slices": cfg.pretrain.batch_volumes * cfg.data.num_partitions, "bank_rows": k,
                   "optimizer": cfg.pretrain.optimizer, "volumes": volumes, "depth": depth,
                   "threads": cfg.pretrain.threads, "precision": cfg.pretrain.precision, "repeats": repeats},
        "slices_per_s": median,
        "epoch_seconds_wall": volumes * cfg.data.num_partitions / median["trainer"],
        "overhead_wall": median["plain"] / median["trainer"] - 1.0,
        "overhead_cpu": median["plain_cpu"] / median["trainer_cpu"] - 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotlist overrides of conf/default.yaml")
    parser.add_argument("--volumes", type=int, default=20, help="volumes of the site (10 patients x ED/ES)")
    parser.add_argument("--depth", type=int, default=10, help="slices per volume")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remote-rows", type=int, default=9 * 512, help="rows of the remote bank (9 sites x 512)")
    parser.add_argument("--out", default="runs/bench_trainer.json")
    args = parser.parse_args()

    report = measure(args.overrides, args.volumes, args.depth, args.repeats, args.remote_rows)
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"trainer overhead over the plain loop: {100 * report['overhead_cpu']:+.1f}% CPU time, "
          f"{100 * report['overhead_wall']:+.1f}% wall time (written to {out})")


if __name__ == "__main__":
    main()
