"""U-Net with a separable encoder, the projection head, and the weights that travel.

The encoder is what contrastive pre-training learns and what the federation averages;
fine-tuning builds ``UNet(pretrained_encoder, Decoder(...))``. Both halves are built from
MONAI blocks (``ResidualUnit`` when ``model.num_res_units > 0``, else ``Convolution``)
and work for 2D slices or 3D slabs through ``data.spatial_dims`` alone.

Layout for ``model.channels = [c0, c1, ..., cL]``::

    x ──level0 (stride 1, c0)──> skip0 ──level1 (down, c1)──> skip1 ... ──levelL (down, cL)──> bottleneck
    bottleneck ──up (transposed conv)──> cat(skip_{L-1}) ──unit──> ... ──> cat(skip0) ──unit──> 1x1 conv ──> logits

Downsampling is by 2 in-plane. In 3D the slab axis (the first spatial axis, the
slice axis of a thick-slice short-axis stack, only ``data.slab_depth`` slices deep) is
never downsampled: stride (1, 2, 2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from omegaconf import DictConfig
from torch import nn

ROTATION_CLASSES = 4  # the rotation pretext task predicts one of 0/90/180/270 degrees
# LeakyReLU rather than MONAI UNet's PReLU: same role, and a training step is ~15% faster on
# CPU (the backward of PReLU's shared slope is a full reduction over every activation).
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _down_stride(spatial_dims: int) -> tuple[int, ...]:
    """Stride 2 in-plane; in 3D the slab (slice) axis keeps its resolution."""
    return (2, 2) if spatial_dims == 2 else (1, 2, 2)


def _unit(
    spatial_dims: int, in_ch: int, out_ch: int, strides: int | Sequence[int], num_res_units: int, norm: str
) -> nn.Module:
    """One MONAI block: a residual unit with ``num_res_units`` convs, or a single conv block."""
    if num_res_units > 0:
        return ResidualUnit(spatial_dims, in_ch, out_ch, strides=strides, subunits=num_res_units, act=ACT, norm=norm)
    return Convolution(spatial_dims, in_ch, out_ch, strides=strides, act=ACT, norm=norm)


class Encoder(nn.Module):
    """Contracting half of the U-Net.

    Args:
        spatial_dims: 2 (input (N, C, H, W)) or 3 (input (N, C, D, H, W)).
        in_channels: image channels C.
        channels: feature channels per level, e.g. ``[16, 32, 64, 128]``; the last is
            the bottleneck. H and W shrink by 2 per level after the first.
        num_res_units: convs per MONAI ``ResidualUnit``; 0 uses plain conv blocks.
        norm: MONAI norm name, ``"instance"`` or ``"batch"``.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, channels: Sequence[int], num_res_units: int, norm: str
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"model.channels needs at least two levels, got {list(channels)}")
        self.spatial_dims = spatial_dims
        self.channels = tuple(channels)
        stride = _down_stride(spatial_dims)
        self.levels = nn.ModuleList(
            _unit(spatial_dims, c_in, c_out, 1 if i == 0 else stride, num_res_units, norm)
            for i, (c_in, c_out) in enumerate(zip((in_channels, *channels[:-1]), channels))
        )

    @property
    def out_channels(self) -> int:
        """Channels of the bottleneck."""
        return self.channels[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, C, *spatial) -> bottleneck (N, channels[-1], *spatial / 2**L), skips [level0, ..., level L-1]."""
        skips = []
        for level in self.levels[:-1]:
            x = level(x)
            skips.append(x)
        return self.levels[-1](x), skips


class Decoder(nn.Module):
    """Expanding half of the U-Net; mirrors an ``Encoder`` with the same ``channels``.

    Args:
        spatial_dims, channels, num_res_units, norm: as for the matching ``Encoder``.
        num_classes: output channels (segmentation classes, background included).
    """

    def __init__(
        self, spatial_dims: int, channels: Sequence[int], num_classes: int, num_res_units: int, norm: str
    ) -> None:
        super().__init__()
        stride = _down_stride(spatial_dims)
        pairs = list(zip(channels[:0:-1], channels[-2::-1]))  # (c_deep, c_shallow) from the bottom up
        self.ups = nn.ModuleList(
            Convolution(spatial_dims, c_deep, c_shallow, strides=stride, is_transposed=True, act=ACT, norm=norm)
            for c_deep, c_shallow in pairs
        )
        self.fuse = nn.ModuleList(
            _unit(spatial_dims, 2 * c_shallow, c_shallow, 1, num_res_units, norm) for _, c_shallow in pairs
        )
        self.out = Convolution(spatial_dims, channels[0], num_classes, kernel_size=1, conv_only=True)

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Bottleneck and skips from ``Encoder.forward`` -> logits (N, num_classes, *spatial of the input)."""
        x = bottleneck
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips)):
            x = up(x)
            # a transposed conv restores ceil(n / 2) * 2 >= n: crop odd sizes back to the skip
            x = x[(..., *(slice(0, s) for s in skip.shape[2:]))]
            x = fuse(torch.cat([x, skip], dim=1))
        return self.out(x)


class UNet(nn.Module):
    """``Decoder(Encoder(x))``: (N, C, *spatial) -> logits (N, num_classes, *spatial)."""

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(*self.encoder(x))


class ProjectionHead(nn.Module):
    """Global average pool of the bottleneck, then a two-layer MLP with BatchNorm on the hidden layer.

    The BatchNorm (as in the SimCLR and MoCo v3 projectors) always uses the statistics
    of the current batch and keeps no buffers. It matters with ``model.norm=instance``:
    instance norm gives every bottleneck channel the same mean in every image, so the
    pooled vectors of different slices start almost identical (cosine ~0.99) and
    contrastive training barely moves; centring them across the batch restores the
    differences. A forward pass therefore needs at least two samples.

    Args:
        in_channels: bottleneck channels.
        hidden: MLP hidden width.
        out_dim: output size d.
        normalize: L2-normalise the output rows (contrastive projections); ``False``
            gives raw logits (the rotation classifier).
    """

    def __init__(self, in_channels: int, hidden: int, out_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.BatchNorm1d(hidden, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, *spatial) -> (N, out_dim)."""
        z = self.mlp(bottleneck.flatten(2).mean(dim=2))
        return F.normalize(z, dim=1) if self.normalize else z


def build_encoder(cfg: DictConfig) -> Encoder:
    """The encoder described by ``cfg.model`` and ``cfg.data.spatial_dims``."""
    m = cfg.model
    return Encoder(cfg.data.spatial_dims, m.in_channels, list(m.channels), m.num_res_units, m.norm)


def build_decoder(cfg: DictConfig) -> Decoder:
    """A freshly initialised decoder matching ``build_encoder(cfg)``."""
    m = cfg.model
    return Decoder(cfg.data.spatial_dims, list(m.channels), m.num_classes, m.num_res_units, m.norm)


def build_unet(cfg: DictConfig, encoder: Encoder | None = None) -> UNet:
    """``UNet(encoder or a fresh one, fresh decoder)``."""
    return UNet(encoder if encoder is not None else build_encoder(cfg), build_decoder(cfg))


def build_head(cfg: DictConfig) -> ProjectionHead:
    """The pre-training head: a d-dim L2-normalised projection, or 4 rotation logits for ``method=rotation``."""
    m = cfg.model
    if cfg.method == "rotation":
        return ProjectionHead(m.channels[-1], m.proj_hidden, ROTATION_CLASSES, normalize=False)
    return ProjectionHead(m.channels[-1], m.proj_hidden, m.proj_dim)


# ---------------------------------------------------------------- weights that travel


def get_weights(encoder: Encoder, head: nn.Module) -> list[np.ndarray]:
    """Encoder then head ``state_dict`` entries (parameters and buffers), in registration order, as numpy copies."""
    return [t.detach().cpu().numpy().copy() for t in (*encoder.state_dict().values(), *head.state_dict().values())]


def copy_arrays(targets: Sequence[torch.Tensor], weights: Sequence[np.ndarray], what: str) -> None:
    """Copy ``weights`` into ``targets`` in order, each cast to its tensor's dtype (FedAvg may return float64)."""
    if len(weights) != len(targets):
        raise ValueError(f"expected {len(targets)} weight arrays ({what}), got {len(weights)}")
    with torch.no_grad():
        for t, w in zip(targets, weights):
            if tuple(t.shape) != tuple(np.shape(w)):
                raise ValueError(f"weight shape {np.shape(w)} does not match {tuple(t.shape)}")
            t.copy_(torch.as_tensor(np.asarray(w)).to(t.dtype))


def set_weights(encoder: Encoder, head: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Inverse of ``get_weights``."""
    copy_arrays([*encoder.state_dict().values(), *head.state_dict().values()], weights, "encoder + head")


def encoder_from_weights(cfg: DictConfig, weights: Sequence[np.ndarray]) -> Encoder:
    """An encoder loaded from a pre-training weight list (``get_weights`` order); the head part is dropped."""
    encoder, head = build_encoder(cfg), build_head(cfg)
    set_weights(encoder, head, weights)
    return encoder


# ---------------------------------------------------------------- encoder files


def _architecture(encoder: Encoder) -> dict:
    return {"spatial_dims": encoder.spatial_dims, "channels": list(encoder.channels)}


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_encoder(encoder: Encoder, path: str | Path) -> None:
    """Write the encoder weights and its architecture (spatial dims, channels) to ``path``, atomically."""
    atomic_torch_save({"architecture": _architecture(encoder), "state_dict": encoder.state_dict()}, Path(path))


def load_encoder(cfg: DictConfig, path: str | Path) -> Encoder:
    """``build_encoder(cfg)`` with the weights from ``save_encoder``; a clear error if the architecture differs."""
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    encoder = build_encoder(cfg)
    if saved["architecture"] != _architecture(encoder):
        raise ValueError(f"encoder file {path} holds {saved['architecture']}, config asks for {_architecture(encoder)}")
    encoder.load_state_dict(saved["state_dict"])
    return encoder
