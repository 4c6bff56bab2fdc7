"""Server-side strategies: the bank relay wrapper and the strategy registry.

Flower + numpy only; nothing here imports torch or the trainer.
"""

from strategies.feature_exchange import FeatureExchange
from strategies.registry import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "FeatureExchange", "build_strategy"]
