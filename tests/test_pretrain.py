"""One local round of pre-training: methods, state on disk, resume in a fresh process, evaluation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fcl_flower.config import load_config
from fcl_flower.pretrain import (
    STATE_FILE, ema_update, evaluate_contrastive, initial_weights, pretrain_round, project, rotate_batch,
)

torch.set_num_threads(1)
TINY = [
    "model.channels=[8,16,32]", "model.proj_hidden=32", "model.proj_dim=16", "data.num_partitions=4",
    "pretrain.batch_volumes=2", "pretrain.queue_size=64", "pretrain.bank_sample_size=48",
]


def _volumes(n: int = 6, depth: int = 8, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Stacks whose anatomy changes along z: a bright disk shrinking from base to apex, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    out = []
    for _ in range(n):
        radius = np.linspace(0.4, 0.08, depth)[:, None, None] * size * rng.uniform(0.85, 1.15)
        disk = (np.hypot(yy, xx)[None] < radius).astype(np.float32)
        out.append(disk * rng.uniform(0.7, 1.3) + 0.1 * rng.standard_normal((depth, size, size), dtype=np.float32))
    return out


def _cfg(*overrides: str):
    return load_config([*TINY, *overrides])


def _remote(cfg, rows: int = 20, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((rows, cfg.model.proj_dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float16), rng.integers(0, cfg.data.num_partitions, rows)


def test_initial_weights_deterministic_and_leave_global_rng() -> None:
    cfg = _cfg()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = initial_weights(cfg), initial_weights(cfg)
    assert torch.rand(1) == before
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = initial_weights(_cfg("seed=1"))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_ema_update_math() -> None:
    target, source = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        target.weight.fill_(1.0)
        source.weight.fill_(3.0)
        source.running_mean.fill_(7.0)
    ema_update(target, source, 0.9)
    assert torch.allclose(target.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 3.0))
    assert torch.equal(target.running_mean, source.running_mean)


def test_rotate_batch_rotates_by_class() -> None:
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3).repeat(4, 1, 1, 1)
    y, r = rotate_batch(x, np.random.default_rng(0))
    for i in range(x.shape[0]):
        assert torch.equal(y[i], torch.rot90(x[i], int(r[i]), dims=(-2, -1)))


def test_fcl_round_result_and_state(tmp_path: Path) -> None:
    cfg = _cfg("pretrain.local_epochs=2")
    res = pretrain_round(initial_weights(cfg), _remote(cfg), _volumes(), cfg, tmp_path, 1)
    assert [w.shape for w in res.weights] == [w.shape for w in initial_weights(cfg)]
    assert res.metrics["steps"] == 6 and res.metrics["samples"] == 6 * 8 and res.metrics["remote_rows"] == 20
    assert res.num_samples == 6 and np.isfinite(res.metrics["loss"])
    assert res.bank_features.dtype == np.float32 and res.bank_features.shape == (48, 16)
    assert res.bank_partitions.dtype == np.int64 and set(res.bank_partitions.tolist()) == {0, 1, 2, 3}
    assert np.allclose(np.linalg.norm(res.bank_features, axis=1), 1.0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    with pytest.raises(ValueError, match="round 1"):
        pretrain_round(res.weights, None, _volumes(), cfg, tmp_path, 1)


def test_proximal_term_keeps_the_round_near_the_global_weights(tmp_path: Path) -> None:
    cfg = _cfg("pretrain.local_epochs=2")
    start = initial_weights(cfg)

    def drift(mu: float) -> tuple[float, dict]:
        res = pretrain_round(start, _remote(cfg), _volumes(), cfg, tmp_path / str(mu), 1, proximal_mu=mu)
        return sum(float(np.sum((w - s) ** 2)) for w, s in zip(res.weights, start)), res.metrics

    free, free_metrics = drift(0.0)
    held, held_metrics = drift(100.0)
    assert "proximal_term" not in free_metrics
    assert 0 < held < free / 3 and held_metrics["proximal_term"] > 0
    assert np.isfinite(held_metrics["loss"])  # the method's own loss, reported without the term


def test_switches_change_the_round(tmp_path: Path) -> None:
    cfg = _cfg("pretrain.max_steps_per_round=2")
    runs = {}
    for name, extra in {
        "default": [], "no_exchange": ["pretrain.use_feature_exchange=false"],
        "no_remote_pos": ["pretrain.use_remote_positives=false"], "gd_minus": ["pretrain.exclude_same_partition_negatives=true"],
    }.items():
        c = _cfg("pretrain.max_steps_per_round=2", *extra)
        runs[name] = pretrain_round(initial_weights(cfg), _remote(cfg), _volumes(), c, tmp_path / name, 1)
    assert runs["default"].metrics["steps"] == 2 and runs["default"].num_samples == 4
    assert runs["no_exchange"].metrics["remote_rows"] == 0 and runs["default"].metrics["remote_rows"] == 20
    losses = {name: r.metrics["loss"] for name, r in runs.items()}
    assert len(set(losses.values())) == 4, losses
    with pytest.raises(ValueError, match="remote bank"):
        pretrain_round(initial_weights(cfg), (np.zeros((3, 5), np.float32), np.zeros(3, np.int64)), _volumes(), cfg,
                       tmp_path / "bad", 1)


_ROUND_TWO = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_pretrain import _cfg, _remote, _volumes
    from fcl_flower.pretrain import pretrain_round
    cfg = _cfg(*{overrides!r})
    weights = list(np.load({weights!r}).values())
    res = pretrain_round(weights, _remote(cfg, seed=6), _volumes(), cfg, {state!r}, 2)
    np.savez({out!r}, *res.weights, bank=res.bank_features)
    """
)


def test_resume_in_fresh_process_equals_uninterrupted(tmp_path: Path) -> None:
    # fcl carries the most state: momentum encoder + head, queue, optimizer, both generators
    overrides = ["method=fcl", "pretrain.optimizer=sgd", "pretrain.keep_optimizer_state=true"]
    cfg = _cfg(*overrides)
    first = pretrain_round(initial_weights(cfg), _remote(cfg), _volumes(), cfg, tmp_path / "a", 1)
    uninterrupted = pretrain_round(first.weights, _remote(cfg, seed=6), _volumes(), cfg, tmp_path / "a", 2)

    again = pretrain_round(initial_weights(cfg), _remote(cfg), _volumes(), cfg, tmp_path / "b", 1)
    np.savez(tmp_path / "w.npz", *again.weights)
    script = _ROUND_TWO.format(tests=str(Path(__file__).parent), overrides=overrides, weights=str(tmp_path / "w.npz"),
                               state=str(tmp_path / "b"), out=str(tmp_path / "out.npz"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    resumed = np.load(tmp_path / "out.npz")
    assert all(np.array_equal(resumed[f"arr_{i}"], w) for i, w in enumerate(uninterrupted.weights))
    assert np.array_equal(resumed["bank"], uninterrupted.bank_features)

    # and the state really matters: round 2 from an empty state folder differs
    fresh = pretrain_round(first.weights, _remote(cfg, seed=6), _volumes(), cfg, tmp_path / "c", 2)
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.weights, uninterrupted.weights))


@pytest.fixture(scope="module")
def nifti_volumes(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Six volumes (3 patients x ED/ES) of the synthetic generator, written as NIfTI and read back
    through the data layer at 32 x 32."""
    from fcl_flower.data.datasets import discover_site
    from fcl_flower.data.preprocess import load_site_volumes
    from fcl_flower.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("nifti")
    generate_dataset(root / "data", sites=1, patients_per_site=3, seed=0, image_size=64, spacing=3.0)
    (site,) = [p for p in (root / "data").iterdir() if p.is_dir()]
    cfg = _cfg("data.image_size=[32,32]", "data.target_spacing=[6.0,6.0]", f"data.cache_dir={root / 'cache'}")
    return [v.image for v in load_site_volumes(discover_site(site, "synthetic"), cfg)]


def _four_rounds(cfg, volumes: list[np.ndarray], state_dir: Path):
    """Rounds 1-4 of one site, each from the last one's weights: (the last ``RoundResult``, the four losses)."""
    weights, losses = initial_weights(cfg), []
    for server_round in range(1, 5):
        res = pretrain_round(weights, None, volumes, cfg, state_dir, server_round)
        weights = res.weights
        losses.append(res.metrics["loss"])
    return res, losses


# queue = one batch of keys, so the FCL bank has the same size in every round
LEARNING = ["pretrain.local_epochs=5", "pretrain.queue_size=8", "pretrain.lr=0.003"]


@pytest.mark.parametrize("method", ["fcl", "local_cl", "simclr", "rotation"])
def test_each_method_loss_decreases_over_rounds(tmp_path: Path, method: str, nifti_volumes: list[np.ndarray]) -> None:
    assert len(nifti_volumes) == 6 and nifti_volumes[0].shape[1:] == (32, 32)
    _, losses = _four_rounds(_cfg(f"method={method}", *LEARNING), nifti_volumes, tmp_path)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_bfloat16_projection_runs_the_networks_in_bfloat16_and_returns_float32(norm: str) -> None:
    from fcl_flower.models import build_encoder, build_head

    cfg = _cfg(f"model.norm={norm}")
    torch.manual_seed(0)
    encoder, head = build_encoder(cfg), build_head(cfg)
    x = torch.from_numpy(np.stack(_volumes(n=1, depth=8)[0][:, None]))  # (8, 1, 32, 32)
    full, mixed = project(encoder, head, x), project(encoder, head, x, "bfloat16")
    assert full.dtype == mixed.dtype == torch.float32 and mixed.shape == full.shape == (8, 16)
    # bfloat16 keeps 8 bits of mantissa: close to float32, yet not the same numbers
    assert not torch.equal(full, mixed)
    assert torch.nn.functional.cosine_similarity(full, mixed).min() > 0.99
    mixed.sum().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in encoder.parameters())


@pytest.mark.parametrize("method", ["fcl", "rotation"])
def test_bfloat16_rounds_learn_and_keep_float32_weights(
    tmp_path: Path, method: str, nifti_volumes: list[np.ndarray]
) -> None:
    common = [f"method={method}", *LEARNING]
    cfg = _cfg(*common, "pretrain.precision=bfloat16")
    res, losses = _four_rounds(cfg, nifti_volumes, tmp_path / "mixed")
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(w.dtype == np.float32 for w in res.weights) and res.bank_features.dtype == np.float32
    full = pretrain_round(initial_weights(cfg), None, nifti_volumes, _cfg(*common), tmp_path / "full", 1)
    assert full.metrics["loss"] != losses[0]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_3d_fcl_round(tmp_path: Path, precision: str) -> None:
    cfg = _cfg("data.spatial_dims=3", "data.slab_depth=3", "pretrain.max_steps_per_round=2", f"pretrain.precision={precision}")
    res = pretrain_round(initial_weights(cfg), _remote(cfg), _volumes(n=4, size=16), cfg, tmp_path, 1)
    assert res.metrics["steps"] == 2 and res.bank_features.shape == (16, 16) and np.isfinite(res.metrics["loss"])


def test_evaluate_changes_nothing_and_is_repeatable(tmp_path: Path) -> None:
    cfg = _cfg()
    res = pretrain_round(initial_weights(cfg), None, _volumes(), cfg, tmp_path, 1)
    before = (tmp_path / STATE_FILE).read_bytes()
    held_out = _volumes(n=3, seed=9)
    m1 = evaluate_contrastive(res.weights, held_out, cfg, tmp_path)
    m2 = evaluate_contrastive(res.weights, held_out, cfg, tmp_path)
    assert m1 == m2 and np.isfinite(m1["loss"]) and 0.0 <= m1["partition_nn_acc"] <= 1.0 and m1["samples"] == 12
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert np.isfinite(evaluate_contrastive(res.weights, held_out, cfg, tmp_path / "missing")["loss"])
    rot = _cfg("method=rotation")
    assert np.isfinite(evaluate_contrastive(initial_weights(rot), held_out, rot, tmp_path / "r")["loss"])


def test_method_none_has_no_round(tmp_path: Path) -> None:
    cfg = _cfg("method=none", "stages=[finetune]")  # with stages=[pretrain] the config itself is refused
    with pytest.raises(ValueError, match="no pre-training"):
        pretrain_round(initial_weights(cfg), None, _volumes(), cfg, tmp_path, 1)
