"""Site-local normalisation layers for federated fine-tuning (FedBN).

With ``finetune.federated_norm = local`` the server still averages every array of the
U-Net, but each site overwrites the normalisation layers it receives with its own from
the previous round before it trains, and before it scores its held-out patients (FedBN,
Li et al., ICLR 2021). BatchNorm statistics of differently scaled scanners are then never
averaged into one. A site's own layers live in ``<state_dir>/finetune/norm/`` and never
leave the site.

A stored file belongs to one federated fine-tuning sequence: the stage's run key (its
fingerprint: config, initialisation and encoder), the label budget N and the fold. It is
used only by a later round of that same sequence, so a file from another run, another
encoder or an earlier config is never picked up.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fcl_flower.models import atomic_torch_save

# Layers whose weights and statistics FedBN keeps per site.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_state_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys of ``model``'s normalisation layers, in registration order.

    For BatchNorm: ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` of every layer. Instance norm without affine parameters or
    running statistics has none.
    """
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys += [f"{name}.{key}" for key in module.state_dict()]
    return keys


class SiteNormStore:
    """One site's own normalisation layers for one federated fine-tuning sequence (run, N, fold)."""

    def __init__(self, folder: Path, run_key: str, n_labeled: int, fold: int) -> None:
        self.path = folder / f"norm_n{n_labeled}_fold{fold}.pt"
        self.run_key = run_key

    def save(self, model: nn.Module, server_round: int) -> None:
        """Store ``model``'s normalisation layers as this site's after ``server_round``."""
        state = model.state_dict()
        layers = {key: state[key].detach().cpu().clone() for key in norm_state_keys(model)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"run": self.run_key, "round": int(server_round), "layers": layers}, self.path)

    def restore(self, model: nn.Module, before_round: int) -> bool:
        """Load this site's layers from its latest round before ``before_round`` into ``model``.

        Returns False, leaving ``model`` as received (the server's average), when this
        sequence has no stored layers from an earlier round: its first round, or a site
        that failed every round so far.
        """
        if not self.path.is_file():
            return False
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved["run"] != self.run_key or saved["round"] >= before_round:
            return False
        layers = saved["layers"]
        expected = norm_state_keys(model)
        if sorted(layers) != sorted(expected):
            raise ValueError(
                f"{self.path}: stored normalisation layers do not match this U-Net "
                f"({len(layers)} vs {len(expected)} entries)"
            )
        model.load_state_dict(layers, strict=False)
        return True
