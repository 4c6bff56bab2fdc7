"""U-Net halves, projection head, weight lists and encoder files, in 2D and 3D."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fcl_flower.config import load_config
from fcl_flower.models import (
    Decoder, Encoder, ProjectionHead, UNet, build_encoder, build_head, build_unet, encoder_from_weights,
    get_weights, load_encoder, save_encoder, set_weights,
)

torch.set_num_threads(1)
TINY = ["model.channels=[8,16,32]", "model.proj_hidden=16", "model.proj_dim=8"]


@pytest.mark.parametrize("res_units", [0, 1, 2])
def test_2d_shapes(res_units: int) -> None:
    cfg = load_config([*TINY, f"model.num_res_units={res_units}"])
    encoder = build_encoder(cfg)
    bottleneck, skips = encoder(torch.randn(3, 1, 32, 32))
    assert bottleneck.shape == (3, 32, 8, 8)
    assert [s.shape for s in skips] == [(3, 8, 32, 32), (3, 16, 16, 16)]
    assert build_unet(cfg, encoder)(torch.randn(3, 1, 32, 32)).shape == (3, 4, 32, 32)
    z = build_head(cfg)(bottleneck)
    assert z.shape == (3, 8)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def test_odd_sizes_restore_input_size() -> None:
    cfg = load_config(TINY)
    assert build_unet(cfg)(torch.randn(2, 1, 29, 35)).shape == (2, 4, 29, 35)


def test_3d_shapes_keep_slab_depth() -> None:
    cfg = load_config([*TINY, "data.spatial_dims=3"])
    encoder = build_encoder(cfg)
    bottleneck, skips = encoder(torch.randn(2, 1, 3, 32, 32))
    assert bottleneck.shape == (2, 32, 3, 8, 8)
    assert skips[1].shape == (2, 16, 3, 16, 16)
    assert build_unet(cfg, encoder)(torch.randn(2, 1, 3, 32, 32)).shape == (2, 4, 3, 32, 32)
    assert build_head(cfg)(bottleneck).shape == (2, 8)


def test_rotation_head_gives_four_raw_logits() -> None:
    head = build_head(load_config([*TINY, "method=rotation"]))
    logits = head(torch.randn(5, 32, 4, 4))
    assert logits.shape == (5, 4)
    assert not torch.allclose(logits.norm(dim=1), torch.ones(5))


def test_unet_from_pretrained_encoder_shares_it() -> None:
    cfg = load_config(TINY)
    encoder = build_encoder(cfg)
    unet = build_unet(cfg, encoder)
    assert isinstance(unet, UNet) and unet.encoder is encoder and isinstance(unet.decoder, Decoder)
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(unet(x), unet.decoder(*encoder(x)))


def test_weights_round_trip_and_fixed_order() -> None:
    cfg = load_config(TINY)
    torch.manual_seed(0)
    encoder, head = build_encoder(cfg), build_head(cfg)
    weights = get_weights(encoder, head)
    assert all(isinstance(w, np.ndarray) for w in weights)
    assert len(weights) == len(encoder.state_dict()) + len(head.state_dict())
    other_encoder, other_head = build_encoder(cfg), build_head(cfg)
    set_weights(other_encoder, other_head, [w.astype(np.float64) for w in weights])  # FedAvg may give float64
    assert all(np.array_equal(a, b) for a, b in zip(weights, get_weights(other_encoder, other_head)))
    assert all(w.dtype == np.float32 for w in get_weights(other_encoder, other_head))
    restored = encoder_from_weights(cfg, weights)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(restored(x)[0], encoder(x)[0])
    with pytest.raises(ValueError, match="weight arrays"):
        set_weights(other_encoder, other_head, weights[:-1])


def test_batch_norm_buffers_travel() -> None:
    cfg = load_config([*TINY, "model.norm=batch"])
    encoder, head = build_encoder(cfg), build_head(cfg)
    encoder(torch.randn(4, 1, 32, 32))  # updates running statistics
    weights = get_weights(encoder, head)
    fresh = encoder_from_weights(cfg, weights)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), fresh.state_dict().values()))


def test_save_load_encoder(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    encoder = build_encoder(cfg)
    save_encoder(encoder, tmp_path / "enc.pt")
    loaded = load_encoder(cfg, tmp_path / "enc.pt")
    assert isinstance(loaded, Encoder)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded(x)[0], encoder(x)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["enc.pt"]  # no temporary file left behind
    with pytest.raises(ValueError, match="architecture|holds"):
        load_encoder(load_config(["model.channels=[8,16,64]"]), tmp_path / "enc.pt")


def test_projection_head_standalone() -> None:
    head = ProjectionHead(6, 10, 3)
    z = head(torch.randn(4, 6, 2, 2, 2))
    assert z.shape == (4, 3) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
