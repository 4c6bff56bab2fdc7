"""The supervised-encoder ceiling script: trains on every site's labels, writes a loadable encoder."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "simulations"))

import supervised_encoder as se  # noqa: E402

from fcl_flower.config import load_config  # noqa: E402
from fcl_flower.finetune import build_finetune_unet, stable_seed  # noqa: E402
from fcl_flower.models import load_encoder  # noqa: E402


def test_supervised_encoder_uses_every_site_and_writes_a_trained_encoder(tiny_synthetic: Path, tmp_path: Path) -> None:
    overrides = [
        "sites=2", f"data.root={tiny_synthetic}", "data.image_size=[32,32]", "data.target_spacing=[2.5,2.5]",
        f"data.cache_dir={tmp_path / 'cache'}", "model.channels=[8,16,32]", "model.norm=batch", "finetune.batch_size=4",
    ]
    cfg = load_config(overrides)
    volumes = se.federation_labeled_volumes(cfg)
    # 2 sites x 2 patients x (ED, ES), each patient once per frame
    assert len(volumes) == 8 and len({v.patient for v in volumes}) == 4
    out = tmp_path / "ceiling" / "encoder.pt"
    assert se.main(["--out", str(out), "--steps", "6", *overrides]) == 0
    trained = load_encoder(cfg, out).state_dict()
    untrained = build_finetune_unet(cfg, None, stable_seed(cfg.seed, "supervised-encoder", 0)).encoder.state_dict()
    assert trained.keys() == untrained.keys()
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)
    # another draw (initialisation and batch order) gives another encoder
    assert se.main(["--out", str(tmp_path / "draw1.pt"), "--steps", "6", "--draw", "1", *overrides]) == 0
    other = load_encoder(cfg, tmp_path / "draw1.pt").state_dict()
    assert any(not torch.equal(trained[k], other[k]) for k in trained)
