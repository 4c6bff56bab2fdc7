"""Strategy name -> a configured Flower strategy, from the project config.

``cfg.strategy.name`` picks the class, ``cfg.strategy.options`` adds its own keyword
arguments (e.g. ``{proximal_mu: 0.01}`` for FedProx), ``cfg.federation`` sets the sampling
and failure policy. The ServerApp wraps the result:
``FeatureExchange.from_config(build_strategy(cfg, initial_parameters, ...), cfg)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flwr.common import Parameters
from flwr.server.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from omegaconf import DictConfig, OmegaConf

from fcl_flower.config import ConfigError
from fcl_flower.wire import is_number

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

# Options whose value must be at least this, checked before the strategy sees them (flwr does not).
OPTION_MINIMA = {"proximal_mu": 0.0}

HOOKS = (
    "evaluate_fn",
    "on_fit_config_fn",
    "on_evaluate_config_fn",
    "fit_metrics_aggregation_fn",
    "evaluate_metrics_aggregation_fn",
)
"""Callables the ServerApp may pass through ``build_strategy(**hooks)``."""


def build_strategy(
    cfg: DictConfig,
    initial_parameters: Parameters,
    **hooks: Callable[..., Any] | None,
) -> Strategy:
    """Instantiate the strategy named by ``cfg.strategy.name``.

    Args:
        cfg: the project config (``strategy`` and ``federation`` sections are read).
        initial_parameters: the global model's starting weights; always passed (the
            FedOpt family needs them, the others then skip asking a client for them).
        **hooks: any of ``HOOKS``, passed to the strategy as they are; ``None`` values
            are left out.

    Raises:
        ConfigError: unknown strategy name, unknown option (naming
            ``strategy.options.<key>``), an option that is set from ``federation`` or a
            hook, a required option missing, or an option value the strategy refuses.
        TypeError: a hook that is not one of ``HOOKS``.
    """
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ConfigError(f"config key 'strategy.name': {name!r} is not one of {list(STRATEGIES)}")
    unknown_hooks = sorted(set(hooks) - set(HOOKS))
    if unknown_hooks:
        raise TypeError(f"build_strategy got unknown hooks {unknown_hooks}; known: {list(HOOKS)}")
    cls = STRATEGIES[name]
    fed = cfg.federation
    base: dict[str, Any] = {
        "fraction_fit": float(fed.fraction_fit),
        "fraction_evaluate": float(fed.fraction_evaluate),
        "min_fit_clients": int(fed.min_fit_sites),
        "min_evaluate_clients": int(fed.min_evaluate_sites),
        "min_available_clients": int(fed.min_available_sites),
        "accept_failures": bool(fed.accept_failures),
        "initial_parameters": initial_parameters,
    }
    options = _options(cfg.strategy.options)
    accepted = {
        p.name: p for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    for key in options:
        if key in base or key in HOOKS:
            raise ConfigError(
                f"config key 'strategy.options.{key}': set by the project (federation.* or "
                "the ServerApp), not a strategy option"
            )
        if key not in accepted:
            valid = sorted(set(accepted) - set(base) - set(HOOKS))
            raise ConfigError(
                f"config key 'strategy.options.{key}': not an option of {cls.__name__}; "
                f"its options are {valid}"
            )
    for key, least in OPTION_MINIMA.items():
        value = options.get(key, least)
        if not is_number(value) or not value >= least:
            raise ConfigError(f"config key 'strategy.options.{key}': must be a number at least {least}, got {value!r}")
    missing = [
        p for p in accepted
        if accepted[p].default is inspect.Parameter.empty and p not in base and p not in options
    ]
    if missing:
        raise ConfigError(
            f"strategy {name!r} needs config key(s) "
            + ", ".join(f"'strategy.options.{p}'" for p in missing)
        )
    chosen_hooks = {key: fn for key, fn in hooks.items() if fn is not None}
    try:
        return cls(**base, **options, **chosen_hooks)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"config key 'strategy.options': {cls.__name__} refuses {options}: {exc}"
        ) from exc


def _options(options: Any) -> dict[str, Any]:
    """``cfg.strategy.options`` as a plain dict (a DictConfig or any mapping)."""
    if isinstance(options, DictConfig):
        container = OmegaConf.to_container(options, resolve=True)
        assert isinstance(container, dict)
        return {str(k): v for k, v in container.items()}
    if not isinstance(options, Mapping):
        raise ConfigError(f"config key 'strategy.options': expected a mapping, got {options!r}")
    return dict(options)
