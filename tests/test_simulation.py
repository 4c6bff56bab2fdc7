"""End to end: real `flwr run` simulations through `fcl-flower simulate` (Ray engine).

Tiny model and data so that each run takes well under a minute on 2 cores; every
assertion reads what the run wrote, not only its exit status.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fcl_flower.cli import main

pytestmark = pytest.mark.slow

TINY = [
    "sites=3", "synthetic.patients_per_site=3", "synthetic.image_size=64", "data.image_size=[32,32]",
    "data.target_spacing=[3.0,3.0]", "model.channels=[8,16,32]", "model.proj_hidden=32", "model.proj_dim=16",
    "pretrain.queue_size=64", "pretrain.bank_sample_size=64", "relay.max_rows_per_site=24",
    "federation.round_timeout=300",
]


def _simulate(tmp: Path, out: str, *extra: str) -> int:
    return main(["simulate", *TINY, f"output_dir={tmp / out}", f"synthetic.cache_root={tmp / 'synthetic'}",
                 f"data.cache_dir={tmp / 'cache'}", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture(scope="module")
def full_run(work: Path) -> Path:
    assert _simulate(work, "full", "rounds=2") == 0
    return work / "full"


def test_three_sites_two_rounds_write_metrics_checkpoints_and_encoder(full_run: Path):
    from fcl_flower.config import load_config
    from fcl_flower.models import load_encoder

    records = _records(full_run)
    assert [r["round"] for r in records] == [1, 2]
    for rec in records:
        assert sorted(rec["sites"]) == ["site_00", "site_01", "site_02"]
        assert rec["failures"] == [] and rec["rejected_banks"] == []
        assert all(math.isfinite(s["loss"]) and s["up_bank_bytes"] > 0 for s in rec["sites"].values())
        assert math.isfinite(rec["eval_loss"])
        # where the round was computed: each site's environment, sent by its own ClientApp process
        env = rec["environment"]
        assert sorted(env["sites"]) == sorted(rec["sites"]) and env["server"] in env["described"]
        assert all(env["described"][i]["torch"] == torch.__version__ for i in env["sites"].values())
    # Round 1: no bank exists yet. Round 2: each site gets the two other sites' banks,
    # each subsampled on the server to relay.max_rows_per_site rows.
    assert all(s["remote_rows"] == 0 for s in records[0]["sites"].values())
    stored = {name: s["bank_rows"] for name, s in records[0]["sites"].items()}
    assert all(rows > 0 for rows in stored.values())
    for name, s in records[1]["sites"].items():
        others = [min(24, rows) for other, rows in stored.items() if other != name]
        assert s["remote_sites"] == 2 and s["remote_rows"] == sum(others)
    assert all(s["down_bank_bytes"] > 0 for s in records[1]["sites"].values())
    assert sorted(p.name for p in (full_run / "checkpoints").glob("*.npz")) == ["round-00001.npz", "round-00002.npz"]
    assert (full_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len((full_run / "rounds.csv").read_text().splitlines()) == 1 + 2 * 3
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["completed"] and summary["failures"] == 0
    cfg = load_config([], full_run / "config.yaml")
    encoder = load_encoder(cfg, full_run / "encoder.pt")
    assert sum(p.numel() for p in encoder.parameters()) > 0


def test_resume_after_round_one_equals_uninterrupted_run(work: Path, full_run: Path):
    assert _simulate(work, "split", "rounds=1") == 0
    assert _simulate(work, "split", "rounds=1") == 2  # refuses to overwrite an existing run
    assert _simulate(work, "split", "rounds=2", "resume=true") == 0
    assert [r["round"] for r in _records(work / "split")] == [1, 2]
    with np.load(full_run / "global_weights.npz") as a, np.load(work / "split" / "global_weights.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_site_with_corrupt_data_fails_alone_and_the_run_completes(work: Path):
    from fcl_flower.data.synthetic import generate_dataset

    data = work / "broken-data"
    generate_dataset(data, sites=3, patients_per_site=3, seed=1, image_size=64)
    victim = sorted((data / "site_01").rglob("*_frame01.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated NIfTI
    assert _simulate(work, "broken", "rounds=2", f"data.root={data}") == 0
    records = _records(work / "broken")
    for rec in records:
        assert sorted(rec["sites"]) == ["site_00", "site_02"]
        assert [f["site"] for f in rec["failures"]] == ["site_01"]
        assert "DataError" in rec["failures"][0]["reason"] and victim.name in rec["failures"][0]["reason"]
    assert json.loads((work / "broken" / "summary.json").read_text())["failures"] == 2
    shutil.rmtree(data)
