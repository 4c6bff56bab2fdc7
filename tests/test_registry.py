"""Strategy registry: names -> configured flwr strategies, with clear config errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from omegaconf import DictConfig, OmegaConf

from fcl_flower.config import ConfigError, load_config
from strategies.registry import STRATEGIES, build_strategy

INIT = ndarrays_to_parameters([np.ones((2, 2), np.float32)])
REQUIRED = {"fedprox": ["strategy.options.proximal_mu=0.1"]}


def cfg_for(name: str, *overrides: str) -> DictConfig:
    return load_config([f"strategy.name={name}", "sites=4", *REQUIRED.get(name, []), *overrides])


def unchecked(cfg: DictConfig, **strategy: object) -> DictConfig:
    """A mutable copy with ``strategy`` keys replaced, past the config loader's checks."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg))
    copy.strategy = {**OmegaConf.to_container(cfg.strategy), **strategy}  # type: ignore[dict-item]
    return copy


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_builds_each_named_strategy_with_federation_settings(name: str) -> None:
    cfg = cfg_for(
        name, "federation.fraction_fit=0.5", "federation.min_fit_sites=3",
        "federation.min_available_sites=4", "federation.accept_failures=false",
        "federation.fraction_evaluate=0.25", "federation.min_evaluate_sites=1",
    )
    strategy = build_strategy(cfg, INIT)
    assert type(strategy) is STRATEGIES[name]
    assert strategy.fraction_fit == 0.5 and strategy.min_fit_clients == 3  # type: ignore[attr-defined]
    assert strategy.min_available_clients == 4  # type: ignore[attr-defined]
    assert strategy.accept_failures is False  # type: ignore[attr-defined]
    assert strategy.fraction_evaluate == 0.25  # type: ignore[attr-defined]
    assert strategy.min_evaluate_clients == 1  # type: ignore[attr-defined]
    assert strategy.initialize_parameters(SimpleClientManager()) == INIT


def test_options_reach_the_strategy() -> None:
    assert build_strategy(cfg_for("fedprox"), INIT).proximal_mu == 0.1  # type: ignore[attr-defined]
    trimmed = build_strategy(cfg_for("fedtrimmedavg", "strategy.options.beta=0.1"), INIT)
    assert trimmed.beta == 0.1  # type: ignore[attr-defined]
    krum = build_strategy(cfg_for("krum", "strategy.options.num_malicious_clients=1"), INIT)
    assert krum.num_malicious_clients == 1  # type: ignore[attr-defined]


def test_hooks_pass_through_and_unknown_hooks_fail() -> None:
    def fit_config(server_round: int) -> dict:
        return {"round": server_round}

    def aggregate(metrics: list) -> dict:
        return {}

    strategy = build_strategy(
        cfg_for("fedavg"), INIT, on_fit_config_fn=fit_config,
        on_evaluate_config_fn=fit_config, fit_metrics_aggregation_fn=aggregate,
        evaluate_metrics_aggregation_fn=aggregate, evaluate_fn=None,
    )
    assert strategy.on_fit_config_fn is fit_config  # type: ignore[attr-defined]
    assert strategy.on_evaluate_config_fn is fit_config  # type: ignore[attr-defined]
    assert strategy.fit_metrics_aggregation_fn is aggregate  # type: ignore[attr-defined]
    assert strategy.evaluate_metrics_aggregation_fn is aggregate  # type: ignore[attr-defined]
    assert strategy.evaluate_fn is None  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="on_fit_fn"):
        build_strategy(cfg_for("fedavg"), INIT, on_fit_fn=fit_config)


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ConfigError, match="strategy.name"):
        build_strategy(unchecked(cfg_for("fedavg"), name="fedfoo"), INIT)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.options\.proximal_mu.*FedAvg"):
        build_strategy(cfg_for("fedavg", "strategy.options.proximal_mu=0.1"), INIT)


def test_options_set_by_the_project_are_refused() -> None:
    for key in ("fraction_fit", "initial_parameters", "on_fit_config_fn"):
        cfg = unchecked(cfg_for("fedavg"), options={key: 1})
        with pytest.raises(ConfigError, match=rf"strategy\.options\.{key}"):
            build_strategy(cfg, INIT)


def test_missing_required_option_is_named() -> None:
    cfg = unchecked(cfg_for("fedprox"), options={})
    with pytest.raises(ConfigError, match=r"strategy\.options\.proximal_mu"):
        build_strategy(cfg, INIT)


def test_option_value_refused_by_the_strategy() -> None:
    with pytest.raises(ConfigError, match="FedTrimmedAvg"):
        build_strategy(cfg_for("fedtrimmedavg", "strategy.options.beta=0.7"), INIT)
    with pytest.raises(ConfigError, match=r"strategy\.options\.proximal_mu.*at least 0"):
        build_strategy(cfg_for("fedprox", "strategy.options.proximal_mu=-0.1"), INIT)
    with pytest.raises(ConfigError, match=r"strategy\.options\.proximal_mu"):
        build_strategy(cfg_for("fedprox", "strategy.options.proximal_mu=strong"), INIT)


def test_strategies_import_neither_torch_nor_the_trainer() -> None:
    code = (
        "import sys, strategies; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('fcl_flower.pretrain')]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
