"""The ceiling of encoder pre-training: an encoder trained WITH every label of a federation.

A U-Net is trained supervised (the fine-tuning loss, optimiser and augmentation of
``finetune.*``) on every labeled volume of every site of the configured federation, and
its encoder is written as an encoder file. Fine-tuning that encoder on a *different*
federation with N labeled patients per site shows how much any pre-trained encoder,
contrastive or not, can add to random init under the fine-tuning protocol: a
self-supervised encoder is not expected to beat one that saw thousands of labeled slices.

Use another data seed for the encoder than for the evaluation, so that no evaluated patient
(nor site) was seen::

    python simulations/supervised_encoder.py --out runs/ceiling/encoder.pt --config conf/profile/full.yaml seed=1
    fcl-flower finetune --encoder runs/ceiling/encoder.pt --config conf/profile/full.yaml method=fcl \\
        "finetune.tasks=[local]" "finetune.n_labeled=[1]" output_dir=runs/ceiling/finetune
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fcl_flower.config import load_config  # noqa: E402
from fcl_flower.data.preprocess import load_site_volumes  # noqa: E402
from fcl_flower.finetune import (  # noqa: E402
    LabeledVolume, build_finetune_unet, labeled_volumes, stable_seed, train_segmentation,
)
from fcl_flower.models import save_encoder  # noqa: E402
from fcl_flower.site import resolve_data_root, resolve_site  # noqa: E402


def federation_labeled_volumes(cfg) -> list[LabeledVolume]:
    """Every labeled volume of every site of ``cfg``'s federation, site by site."""
    out: list[LabeledVolume] = []
    for partition in range(cfg.sites):
        site = resolve_site(cfg, {"partition-id": partition, "num-partitions": cfg.sites})
        out += labeled_volumes(load_site_volumes([r for r in site.records if r.label is not None], cfg))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="encoder file to write (models.save_encoder)")
    parser.add_argument("--config", default=None, help="a YAML layer over conf/default.yaml, e.g. conf/profile/full.yaml")
    parser.add_argument("--steps", type=int, default=3000, help="supervised optimiser steps")
    parser.add_argument("--draw", type=int, default=0,
                        help="which draw of the initialisation and batch order (the ceiling varies between draws)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. seed=1")
    args = parser.parse_args(argv)

    cfg = resolve_data_root(load_config(args.overrides, args.config))
    torch.set_num_threads(cfg.finetune.threads)
    volumes = federation_labeled_volumes(cfg)
    model = build_finetune_unet(cfg, None, stable_seed(cfg.seed, "supervised-encoder", args.draw))
    result = train_segmentation(model, volumes, cfg, args.steps, stable_seed(cfg.seed, "supervised-encoder", args.draw, "train"))
    save_encoder(model.encoder, args.out)
    print(f"[supervised-encoder] {len(volumes)} labeled volumes of {cfg.sites} sites, {args.steps} steps, "
          f"final DiceCE {result.loss:.4f}, {result.seconds:.0f} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
