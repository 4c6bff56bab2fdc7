"""The collapse probe: pair kinds on hand-made projections, and a run folder end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "simulations"))

import representation_probe as rp  # noqa: E402

from fcl_flower.config import config_to_yaml  # noqa: E402
from fcl_flower.pretrain import initial_weights  # noqa: E402

PARTITION = torch.tensor([0, 1, 0, 1])
VOLUME = torch.tensor([0, 0, 1, 1])


def test_similarity_profile_tells_collapse_from_partition_only_from_distinct_slices() -> None:
    collapsed = F.normalize(torch.ones(4, 3), dim=1)
    assert rp.similarity_profile(collapsed, collapsed, PARTITION, VOLUME) == pytest.approx(
        {"own_view": 1.0, "same_partition": 1.0, "other_partition": 1.0})
    per_partition = F.normalize(torch.eye(2)[PARTITION], dim=1)  # one point per partition
    assert rp.similarity_profile(per_partition, per_partition, PARTITION, VOLUME) == pytest.approx(
        {"own_view": 1.0, "same_partition": 1.0, "other_partition": 0.0})
    distinct = torch.eye(4)  # every slice its own direction
    assert rp.similarity_profile(distinct, distinct, PARTITION, VOLUME) == pytest.approx(
        {"own_view": 1.0, "same_partition": 0.0, "other_partition": 0.0})


def test_probe_reads_a_run_folder(tiny_synthetic: Path, small_cfg, tmp_path: Path) -> None:
    cfg = small_cfg("sites=2", f"data.root={tiny_synthetic}", "method=fcl", "model.channels=[8,16]",
                    "model.proj_hidden=16", "model.proj_dim=8", f"output_dir={tmp_path / 'run'}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    with pytest.raises(SystemExit, match="global_weights.npz"):
        rp.main([str(run)])
    np.savez(run / "global_weights.npz", *initial_weights(cfg))
    assert rp.main([str(run), "--json", str(tmp_path / "probe.json")]) == 0
    profile = json.loads((tmp_path / "probe.json").read_text())[str(run)]
    assert set(profile) == set(rp.PAIR_KINDS)
    assert all(-1.0 <= v <= 1.0 for v in profile.values())
