"""Feature banks: the local FIFO queue of momentum keys, and the per-step sampled bank Q'.

A site's queue holds its own momentum-encoder keys with their partition ids; at the end
of a round it is what the site shares. The remote bank (other sites' queues from the
last round) is frozen for the whole round; each step draws Q' from queue ∪ remote.
"""

from __future__ import annotations

import numpy as np
import torch


class FeatureQueue:
    """MoCo-style fixed-capacity FIFO of (d,) keys and their partition ids.

    Args:
        capacity: maximum number of keys kept.
        dim: key size d.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        self.feats = torch.zeros(capacity, dim)
        self.parts = torch.zeros(capacity, dtype=torch.int64)
        self.ptr = 0  # next row to overwrite
        self.filled = 0  # rows holding keys

    @property
    def capacity(self) -> int:
        return self.feats.shape[0]

    def __len__(self) -> int:
        return self.filled

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, parts: torch.Tensor) -> None:
        """Write keys (B, d) and parts (B,) over the oldest rows, wrapping around; B > capacity keeps the last rows."""
        keys, parts = keys[-self.capacity :], parts[-self.capacity :]
        rows = (self.ptr + torch.arange(keys.shape[0])) % self.capacity
        self.feats[rows] = keys.detach().to(self.feats.dtype)
        self.parts[rows] = parts
        self.ptr = (self.ptr + keys.shape[0]) % self.capacity
        self.filled = min(self.filled + keys.shape[0], self.capacity)

    def features(self) -> torch.Tensor:
        """(N, d) view of the filled rows (storage order, not age order)."""
        return self.feats[: self.filled]

    def partitions(self) -> torch.Tensor:
        """(N,) int64 view of the filled rows' partition ids."""
        return self.parts[: self.filled]

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the filled part: float32 (N, d) and int64 (N,), e.g. to share with the server."""
        return self.features().numpy().astype(np.float32, copy=True), self.partitions().numpy().copy()

    def state_dict(self) -> dict:
        return {"feats": self.feats.clone(), "parts": self.parts.clone(), "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["feats"].shape) != tuple(self.feats.shape):
            raise ValueError(f"queue state has shape {tuple(state['feats'].shape)}, expected {tuple(self.feats.shape)}")
        self.feats.copy_(state["feats"])
        self.parts.copy_(state["parts"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])


def sample_bank(
    local_feats: torch.Tensor,
    local_parts: torch.Tensor,
    remote_feats: torch.Tensor | None,
    remote_parts: torch.Tensor | None,
    k: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q': ``k`` rows drawn uniformly without replacement from local ∪ remote (all rows if fewer).

    Args:
        local_feats, local_parts: (N, d), (N,) the site's queue.
        remote_feats, remote_parts: (M, d), (M,) the frozen remote bank, or None.
        k: number of rows wanted.
        generator: the torch RNG of the draw.

    Returns:
        bank (min(k, N + M), d) and bank_part (min(k, N + M),) int64.
    """
    feats, parts = local_feats, local_parts
    if remote_feats is not None and remote_feats.shape[0] > 0:
        feats, parts = torch.cat([local_feats, remote_feats]), torch.cat([local_parts, remote_parts])
    if feats.shape[0] <= k:
        return feats, parts
    idx = torch.randperm(feats.shape[0], generator=generator)[:k]
    return feats[idx], parts[idx]
