"""Data layer: synthetic generator, dataset discovery, preprocessing + cache, splits, inspection.

Submodules are imported lazily by their users (MONAI and matplotlib are slow to import):
``errors``, ``synthetic``, ``datasets``, ``preprocess``, ``splits``, ``inspect``, ``sampling``.
"""

from fcl_flower.data.errors import DataError

__all__ = ["DataError"]
