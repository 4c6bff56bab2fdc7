"""One round of local contrastive pre-training on a site, Flower-free.

``pretrain_round`` loads the global encoder + head, trains for ``pretrain.local_epochs``
epochs over the site's volumes with the method ``cfg.method``, and returns the new
weights and (for FCL) the site's queue of momentum keys. Methods:

- ``fcl``: Wu et al. MoCo-style: queries q from the main encoder + head on view 1, keys
  k from the momentum copy on view 2, ``fcl_loss`` against Q' drawn each step from the
  local queue ∪ the frozen remote bank (``pretrain.use_feature_exchange``), then k
  enqueued. ``pretrain.use_remote_positives`` keeps or drops the Lambda term;
  ``pretrain.exclude_same_partition_negatives`` is the GD- ablation.
- ``local_cl``: Chaitanya et al. G_D within the batch (``local_cl_loss``), both views
  through the main encoder.
- ``simclr``: NT-Xent over the two views.
- ``rotation``: predict the 0/90/180/270 degree in-plane rotation of view 1.

Everything a site needs to continue lives in ``state_dir/trainer_state.pt``: the
momentum encoder + head, the queue, the optimizer state (``pretrain.keep_optimizer_state``),
the numpy and torch generator states and the last round, written atomically. A fresh
process given the same ``state_dir`` continues exactly where the last round stopped; no
per-site state lives in this module.

Momentum encoder at a round's start: the site keeps its *own* momentum encoder from the
previous round (MoCo: the key encoder is a slow average of the site's query encoders
and stays consistent with the keys already in its queue); in the site's first round
it is a copy of the global weights. The main encoder always starts from the global
weights.
"""

from __future__ import annotations

import copy
import itertools
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from fcl_flower.banks import FeatureQueue, sample_bank
from fcl_flower.config import with_overrides
from fcl_flower.data.sampling import ContrastiveBatch, PartitionSampler
from fcl_flower.losses import fcl_loss, local_cl_loss, nt_xent, rotation_loss
from fcl_flower.models import (
    ROTATION_CLASSES, atomic_torch_save, build_encoder, build_head, get_weights, set_weights,
)

STATE_FILE = "trainer_state.pt"
METHODS = ("fcl", "local_cl", "simclr", "rotation")


@dataclass
class RoundResult:
    """What one local round hands back to the federation."""

    weights: list[np.ndarray]  # main encoder + head, ``models.get_weights`` order
    bank_features: np.ndarray  # (N, d) float32, the local queue after the round (L2-normalised rows); N = 0 unless fcl
    bank_partitions: np.ndarray  # (N,) int64
    metrics: dict[str, float]  # loss (mean over the round), steps, samples, seconds, slices_per_second, ...
    num_samples: int  # distinct volumes trained on (FedAvg weight)


@dataclass
class _Nets:
    """Main encoder + head, and the key (momentum) encoder + head; the key pair may be the main one."""

    encoder: nn.Module
    head: nn.Module
    key_encoder: nn.Module
    key_head: nn.Module


def initial_weights(cfg: DictConfig) -> list[np.ndarray]:
    """Encoder + head weights initialised from ``cfg.seed`` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return get_weights(build_encoder(cfg), build_head(cfg))


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_source; buffers (BatchNorm statistics) are copied."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s, alpha=1.0 - momentum)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor]) -> torch.Tensor:
    """FedProx's ||w - w_global||^2 (Li et al., MLSys 2020): a scalar, summed over every tensor pair.

    ``params`` are the trainable tensors, ``anchor`` the same tensors as the round received them.
    """
    return torch.stack([(w - a).pow(2).sum() for w, a in zip(params, anchor, strict=True)]).sum()


def rotate_batch(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample of (N, C, ..., H, W) in-plane by a random multiple of 90 degrees.

    Returns the rotated batch (same shape; needs H == W) and the rotation classes (N,) int64 in 0..3.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"the rotation task needs square slices, got {tuple(x.shape[-2:])}")
    rotation = torch.from_numpy(rng.integers(0, ROTATION_CLASSES, size=x.shape[0]))
    out = x.clone()
    for r in range(1, ROTATION_CLASSES):
        idx = rotation == r
        out[idx] = torch.rot90(x[idx], r, dims=(-2, -1))
    return out, rotation


def project(encoder: nn.Module, head: nn.Module, x: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """``head(encoder(x))`` for a batch (N, C, [D,] H, W): (N, d) float32.

    ``precision="bfloat16"`` runs the networks under autocast (bfloat16 activations, float32
    weights and gradients: mixed-precision training); the output is float32 either way, so
    every loss is computed in float32.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        z = head(encoder(x)[0])
    return z.float()


def _embed_views(nets: _Nets, batch: ContrastiveBatch, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views through the main encoder + head in one pass: two (N, d)."""
    return project(nets.encoder, nets.head, torch.cat([batch.view1, batch.view2]), precision).chunk(2)


def _batch_loss(
    cfg: DictConfig,
    nets: _Nets,
    batch: ContrastiveBatch,
    queue: FeatureQueue,
    remote: tuple[torch.Tensor, torch.Tensor] | None,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The method's loss on one batch, and the momentum keys (N, d) to enqueue (``fcl`` only, else None)."""
    p = cfg.pretrain
    if cfg.method == "fcl":
        q = project(nets.encoder, nets.head, batch.view1, p.precision)
        with torch.no_grad():
            k = project(nets.key_encoder, nets.key_head, batch.view2, p.precision)
        remote_feats, remote_parts = remote if remote is not None else (None, None)
        bank, bank_part = sample_bank(
            queue.features(), queue.partitions(), remote_feats, remote_parts, p.bank_sample_size, generator
        )
        loss = fcl_loss(
            q, k, batch.partition, batch.partition, bank, bank_part, p.temperature,
            exclude_same_partition_negatives=p.exclude_same_partition_negatives,
            bank_positives=p.use_remote_positives,
        )
        return loss, k
    if cfg.method == "local_cl":
        return local_cl_loss(*_embed_views(nets, batch, p.precision), batch.partition, p.temperature), None
    if cfg.method == "simclr":
        return nt_xent(*_embed_views(nets, batch, p.precision), p.temperature), None
    x, rotation = rotate_batch(batch.view1, rng)
    return rotation_loss(project(nets.encoder, nets.head, x, p.precision), rotation), None


# ---------------------------------------------------------------- site state


def _data_fingerprint(volumes: Sequence[np.ndarray]) -> int:
    """CRC-32 of the site's volumes."""
    crc = 0
    for v in volumes:
        crc = zlib.crc32(np.ascontiguousarray(v).data, crc)
    return crc


def _generators(
    state: dict | None, cfg: DictConfig, volumes: Sequence[np.ndarray]
) -> tuple[np.random.Generator, torch.Generator]:
    """The site's numpy (sampling, augmentation) and torch (bank draws) generators, restored or new.

    New ones are seeded from ``cfg.seed`` and a checksum of the site's volumes, so sites
    draw different streams and a rerun draws the same.
    """
    if state is None:
        seeds = np.random.SeedSequence([cfg.seed, _data_fingerprint(volumes)]).generate_state(2)
        return np.random.default_rng(seeds[0]), torch.Generator().manual_seed(int(seeds[1]))
    rng, generator = np.random.default_rng(), torch.Generator()
    rng.bit_generator.state = state["numpy_rng"]
    generator.set_state(state["torch_rng"])
    return rng, generator


def _load_state(state_dir: Path) -> dict | None:
    path = Path(state_dir) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _remote_tensors(
    remote_bank: tuple[np.ndarray, np.ndarray] | None, dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The remote bank as float32 tensors, rows re-normalised (float16 transit bends norms slightly)."""
    if remote_bank is None or len(remote_bank[0]) == 0:
        return None
    feats, parts = remote_bank
    if feats.ndim != 2 or feats.shape[1] != dim or parts.shape != (feats.shape[0],):
        raise ValueError(f"remote bank must be (M, {dim}) features and (M,) partitions, got {feats.shape}, {parts.shape}")
    return F.normalize(torch.as_tensor(feats, dtype=torch.float32), dim=1), torch.as_tensor(parts, dtype=torch.int64)


def _optimizer(params: list[nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    p = cfg.pretrain
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)


def _sampling_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` for the sampler: the rotation task turns flips off (a flip makes 0 and 180 degrees, or 90
    and 270 after a mirror, the same picture, so the rotation would not be predictable)."""
    return with_overrides(cfg, ["data.augment.flip_prob=0"]) if cfg.method == "rotation" else cfg


def _check_method(cfg: DictConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} has no pre-training; expected one of {list(METHODS)}")


def pretrain_round(
    global_weights: list[np.ndarray],
    remote_bank: tuple[np.ndarray, np.ndarray] | None,
    volumes: list[np.ndarray],
    cfg: DictConfig,
    state_dir: Path,
    server_round: int,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """One round of local pre-training of this site.

    Args:
        global_weights: encoder + head weights from the server (``models.get_weights`` order).
        remote_bank: other sites' banks, ((M, d) float32/16 L2-normalised, (M,) int64), or None.
            Used only by ``fcl`` with ``pretrain.use_feature_exchange``.
        volumes: the site's training volumes, (Z, H, W) float32 each.
        cfg: the run config.
        state_dir: the site's state folder; read at the start, rewritten at the end.
        server_round: this round's number; must be later than the round saved in ``state_dir``.
        proximal_mu: FedProx's mu, sent by ``strategy.name=fedprox`` in the fit config; above 0,
            each step's loss gets ``mu / 2 * proximal_term`` towards ``global_weights``.

    Returns:
        The round's ``RoundResult``; its ``loss`` metric is the method's loss without the proximal
        term. With ``proximal_mu`` above 0, ``proximal_term`` is that distance after the round.
    """
    entered = time.perf_counter()
    _check_method(cfg)
    if not volumes:
        raise ValueError("pretrain_round got no volumes")
    torch.set_num_threads(cfg.pretrain.threads)
    p = cfg.pretrain
    state = _load_state(state_dir)
    if state is not None and state["last_round"] >= server_round:
        raise ValueError(f"{state_dir} holds the state after round {state['last_round']}, cannot run round {server_round}")

    encoder, head = build_encoder(cfg), build_head(cfg)
    set_weights(encoder, head, global_weights)
    key_encoder, key_head = encoder, head
    if cfg.method == "fcl":
        key_encoder, key_head = copy.deepcopy(encoder).requires_grad_(False), copy.deepcopy(head).requires_grad_(False)
        if state is not None:
            key_encoder.load_state_dict(state["key_encoder"])
            key_head.load_state_dict(state["key_head"])
    nets = _Nets(encoder, head, key_encoder, key_head)
    queue = FeatureQueue(p.queue_size, cfg.model.proj_dim)
    trainable = [*encoder.parameters(), *head.parameters()]
    optimizer = _optimizer(trainable, cfg)
    anchor = [w.detach().clone() for w in trainable] if proximal_mu > 0 else None
    rng, generator = _generators(state, cfg, volumes)
    if state is not None:
        queue.load_state_dict(state["queue"])
        if p.keep_optimizer_state and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
    remote = _remote_tensors(remote_bank, cfg.model.proj_dim) if p.use_feature_exchange else None

    sampler = PartitionSampler(volumes, _sampling_config(cfg), rng)
    for module in (encoder, head, key_encoder, key_head):
        module.train()
    losses, slices, seen = [], 0, set()
    start = time.perf_counter()
    batches = itertools.chain.from_iterable(sampler.epoch() for _ in range(p.local_epochs))
    for batch in itertools.islice(batches, p.max_steps_per_round or None):
        loss, keys = _batch_loss(cfg, nets, batch, queue, remote, rng, generator)
        objective = loss if anchor is None else loss + proximal_mu / 2 * proximal_term(trainable, anchor)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if keys is not None:
            ema_update(key_encoder, encoder, p.ema_momentum)
            ema_update(key_head, head, p.ema_momentum)
            queue.enqueue(keys, batch.partition)
        losses.append(loss.item())
        slices += batch.partition.numel()
        seen.update(batch.volume.tolist())
    seconds = time.perf_counter() - start

    atomic_torch_save(
        {
            "last_round": server_round,
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": generator.get_state(),
            "queue": queue.state_dict(),
            "key_encoder": key_encoder.state_dict() if cfg.method == "fcl" else None,
            "key_head": key_head.state_dict() if cfg.method == "fcl" else None,
            "optimizer": optimizer.state_dict() if p.keep_optimizer_state else None,
        },
        Path(state_dir) / STATE_FILE,
    )
    bank_features, bank_partitions = queue.as_arrays()
    metrics = {
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "steps": float(len(losses)),
        "samples": float(slices),
        "seconds": seconds,
        "setup_seconds": start - entered,  # model build, state load: before the first step
        "slices_per_second": slices / seconds if seconds > 0 else 0.0,
        "queue_rows": float(len(queue)),
        "remote_rows": float(0 if remote is None else remote[0].shape[0]),
    }
    if anchor is not None:
        with torch.no_grad():
            metrics["proximal_term"] = proximal_term(trainable, anchor).item()
    return RoundResult(get_weights(encoder, head), bank_features, bank_partitions, metrics, len(seen))


@torch.no_grad()
def _partition_probe(encoder: nn.Module, batch: ContrastiveBatch) -> float:
    """Label-free probe: share of slices whose nearest neighbour (cosine, pooled bottleneck) among the
    other volumes' slices in the batch has the same partition; nan with a single volume."""
    feats = F.normalize(encoder(batch.view1)[0].flatten(2).mean(dim=2), dim=1)
    sim = (feats @ feats.T).masked_fill(batch.volume[:, None] == batch.volume[None, :], float("-inf"))
    if torch.isinf(sim).all():
        return float("nan")
    return (batch.partition[sim.argmax(dim=1)] == batch.partition).float().mean().item()


@torch.no_grad()
def evaluate_contrastive(
    global_weights: list[np.ndarray], volumes: list[np.ndarray], cfg: DictConfig, state_dir: Path
) -> dict[str, float]:
    """The method's loss of the global encoder + head on held-out volumes; trains and writes nothing.

    Views are drawn from a generator seeded by ``cfg.seed`` alone, so rounds are compared on
    the same samples. For ``fcl`` the keys come from the global encoder itself and the bank
    is the site's queue in ``state_dir`` (read only; empty if absent).

    Returns:
        ``loss`` (mean over batches), ``partition_nn_acc`` (see ``_partition_probe``), ``samples``.
    """
    _check_method(cfg)
    if not volumes:
        raise ValueError("evaluate_contrastive got no volumes")
    torch.set_num_threads(cfg.pretrain.threads)
    encoder, head = build_encoder(cfg), build_head(cfg)
    set_weights(encoder, head, global_weights)
    encoder.eval()
    head.eval()
    nets = _Nets(encoder, head, encoder, head)
    queue = FeatureQueue(cfg.pretrain.queue_size, cfg.model.proj_dim)
    state = _load_state(state_dir) if cfg.method == "fcl" else None
    if state is not None:
        queue.load_state_dict(state["queue"])
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses, probes, slices = [], [], 0
    for batch in PartitionSampler(volumes, _sampling_config(cfg), rng).epoch():
        losses.append(_batch_loss(cfg, nets, batch, queue, None, rng, generator)[0].item())
        probes.append(_partition_probe(encoder, batch))
        slices += batch.partition.numel()
    probes = [x for x in probes if not np.isnan(x)]
    return {
        "loss": float(np.mean(losses)),
        "partition_nn_acc": float(np.mean(probes)) if probes else float("nan"),
        "samples": float(slices),
    }
