"""Flower ServerApp: compose the config, build the strategy, run resumable rounds.

``server_fn`` composes the run configuration from the run config (``config-file`` and
``overrides``), makes sure the data exists, and returns an ``FCLServer``: Flower's own
round loop, plus a checkpoint after every round, ``resume=true`` from the last one, and
per-round metrics files. The contrastive model, the relay and the wrapped strategy are
built elsewhere; this module only wires them to Flower.
"""

from __future__ import annotations

import json
import math
import random
import re
import shlex
import time
import timeit
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Context, FitRes, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.history import History
from flwr.server.server import Server
from omegaconf import DictConfig

from fcl_flower.checkpoint import Checkpoint, load_latest_checkpoint, pack_arrays, save_checkpoint, unpack_arrays
from fcl_flower.config import ConfigError, config_differences, config_from_yaml, config_to_yaml, load_config, with_overrides
from fcl_flower.environment import compute_environment, environment_record
from fcl_flower.metrics import RunRecorder
from fcl_flower.models import encoder_from_weights, save_encoder
from fcl_flower.pretrain import initial_weights
from fcl_flower.wire import is_number
from strategies.feature_exchange import FeatureExchange
from strategies.registry import build_strategy

# Attributes in which flwr strategies keep state across rounds (FedOpt family, FedAvgM).
STRATEGY_STATE_ATTRS = ("current_weights", "m_t", "v_t", "momentum_vector")
SITE_FAILURE = re.compile(r"\[site=([^\]]+)\] ([^\n'\"\\]*)")


class RunExistsError(ConfigError):
    """``output_dir`` already holds checkpoints of a run and ``resume`` is false."""


def prepare_run(cfg: DictConfig) -> DictConfig:
    """The config a run uses: absolute ``output_dir``; refuses to overwrite an earlier run.

    The data root is not resolved here: the coordinator never reads site data (in
    simulation each client resolves ``data.root``, generating the built-in data once).
    """
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    if not cfg.resume and any((output_dir / "checkpoints").glob("round-*.npz")):
        raise RunExistsError(
            f"output_dir {output_dir} already holds a run: pass resume=true to continue it, "
            "or choose another output_dir (nothing was overwritten)"
        )
    return with_overrides(cfg, [f"output_dir={output_dir}"])


class FCLServer(Server):
    """Flower's round loop with a checkpoint per round, resume, and metrics files."""

    def __init__(self, cfg: DictConfig, strategy: FeatureExchange) -> None:
        super().__init__(client_manager=SimpleClientManager(), strategy=strategy)
        self.cfg = cfg
        self.relay = strategy
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.recorder = RunRecorder(self.output_dir, echo=lambda line: log(INFO, line))
        self.environment = compute_environment()  # the server's; the sites send theirs with every result

    # -- checkpoints -----------------------------------------------------------------
    def _save(self, server_round: int, stage: str) -> None:
        wrapped = self.relay.strategy
        arrays = pack_arrays("weights", parameters_to_ndarrays(self.parameters))
        for attr in STRATEGY_STATE_ATTRS:
            value = getattr(wrapped, attr, None)
            if value is not None:
                arrays.update(pack_arrays(f"strategy.{attr}", list(value)))
        arrays.update({f"relay/{k}": v for k, v in self.relay.state_dict().items()})
        meta = {
            "stage": stage,
            "config": config_to_yaml(self.cfg),
            "python_random": _jsonable_random_state(random.getstate()),
        }
        save_checkpoint(self.ckpt_dir, Checkpoint(server_round, arrays, meta))

    def _restore(self) -> int:
        """Load the last checkpoint if ``resume``; return the last completed round (0: none)."""
        if not self.cfg.resume:
            return 0
        ckpt = load_latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            log(WARNING, "resume=true but %s holds no checkpoint: starting from round 1", self.ckpt_dir)
            return 0
        saved = config_from_yaml(ckpt.meta["config"])
        changed = [k for k in config_differences(saved, self.cfg) if k not in ("resume", "rounds")]
        weights = unpack_arrays("weights", ckpt.arrays)
        if [w.shape for w in weights] != [w.shape for w in initial_weights(self.cfg)]:
            model_keys = [k for k in changed if k.startswith(("model.", "data.spatial_dims", "data.slab_depth"))]
            raise ConfigError(
                f"{self.ckpt_dir}: the checkpoint holds another model than this config builds (it differs in "
                f"{', '.join(model_keys or changed) or 'nothing the config names'}); resume with the checkpoint's "
                "settings or start the run in another output_dir"
            )
        if changed:
            log(WARNING, "resuming with a config that differs from the checkpoint's in %s", ", ".join(changed))
        self.parameters = ndarrays_to_parameters(weights)
        wrapped = self.relay.strategy
        for attr in STRATEGY_STATE_ATTRS:
            value = unpack_arrays(f"strategy.{attr}", ckpt.arrays)
            if value:
                setattr(wrapped, attr, value)
        relay_arrays = {k[len("relay/"):]: v for k, v in ckpt.arrays.items() if k.startswith("relay/")}
        self.relay.load_state_dict(relay_arrays)
        random.setstate(_random_state_from_json(ckpt.meta["python_random"]))
        self.recorder.truncate_after(ckpt.server_round, ckpt.meta["stage"])
        log(INFO, "[fcl] resumed from %s after round %d", self.ckpt_dir, ckpt.server_round)
        return ckpt.server_round

    # -- the run ---------------------------------------------------------------------
    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Run the configured stages in order: contrastive pre-training, then fine-tuning."""
        history = History()
        start_time = timeit.default_timer()
        failures = 0
        if "pretrain" in self.cfg.stages:
            failures += self._pretrain(num_rounds, timeout, history)
        if "finetune" in self.cfg.stages:
            from fcl_flower.finetune_stage import run_finetune_stage

            failures += run_finetune_stage(self, timeout)
        self._finish(num_rounds, failures)
        return history, timeit.default_timer() - start_time

    def _pretrain(self, num_rounds: int, timeout: float | None, history: History) -> int:
        """Contrastive pre-training rounds with a checkpoint after each; returns site failures."""
        done = self._restore()
        if done == 0:
            self.parameters = self._get_initial_parameters(server_round=0, timeout=timeout)
        failures = 0
        for server_round in range(done + 1, num_rounds + 1):
            t0 = time.perf_counter()
            res_fit = self.fit_round(server_round=server_round, timeout=timeout)
            results, fit_failures = ([], []) if res_fit is None else res_fit[2]
            if res_fit is not None and res_fit[0] is not None:
                self.parameters = res_fit[0]
            res_eval = self.evaluate_round(server_round=server_round, timeout=timeout)
            record = self._round_record(server_round, "pretrain", results, fit_failures, res_eval, time.perf_counter() - t0)
            failures += len(record["failures"])
            self._save(server_round, "pretrain")
            self.recorder.record(record, num_rounds)
            if record["loss"] is not None:
                history.add_loss_distributed(server_round, record["loss"])
        weights = parameters_to_ndarrays(self.parameters)
        np.savez(self.output_dir / "global_weights.npz", *weights)
        save_encoder(encoder_from_weights(self.cfg, weights), self.encoder_path)
        return failures

    def _round_record(
        self, server_round: int, stage: str, results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any], res_eval: Any, seconds: float,
    ) -> dict[str, Any]:
        report = self.relay.last_round_report() or {}
        sites: dict[str, dict[str, Any]] = {}
        for _, res in results:
            name = str(res.metrics.get("site", "?"))
            sites[name] = _numbers(res.metrics)
            sites[name].update(_numbers(report.get("sites", {}).get(name, {})))
        eval_loss = None
        if res_eval is not None:
            eval_loss = res_eval[0]
            for _, eres in res_eval[2][0]:
                name = str(eres.metrics.get("site", "?"))
                if name in sites:
                    sites[name]["eval_loss"] = eres.loss
        # Flower's failures, then the updates the relay refused to average (named "[site=...] update rejected: ...")
        failed = [describe_failure(f) for f in [*failures, *map(ValueError, report.get("rejected_updates", []))]]
        # Flower's failure exceptions carry no node: name the unnamed ones after the
        # sampled sites that neither returned a result nor a named failure.
        named = {f["site"] for f in failed}
        missing = sorted(
            name for name, entry in report.get("sites", {}).items()
            if not entry.get("returned") and name not in named and not name.startswith("node:")
        )
        unnamed = [f for f in failed if f["site"] == "?"]
        if len(unnamed) == len(missing):
            for failure, name in zip(unnamed, missing):
                failure["site"] = name
        # the samples-weighted mean over the sites that report a (finite) loss and a positive sample count
        weighted = [(s["loss"], s["samples"]) for s in sites.values() if "loss" in s and s.get("samples", 0) > 0]
        n = sum(w for _, w in weighted)
        loss = sum(value * w for value, w in weighted) / n if n else None
        return {
            "round": server_round,
            "stage": stage,
            "seconds": seconds,
            "loss": loss,
            "eval_loss": eval_loss,
            "sites": sites,
            "failures": failed,
            "rejected_banks": report.get("rejected", []),
            "environment": environment_record(self.environment, {str(res.metrics.get("site", "?")): res.metrics
                                                                 for _, res in results}),
        }

    @property
    def encoder_path(self) -> Path:
        """Where the pre-trained encoder of this run is written (input of fine-tuning)."""
        return self.output_dir / "encoder.pt"

    def _finish(self, num_rounds: int, failures_total: int) -> None:
        curves = self.recorder.plot()
        summary = {
            "completed": True,
            "rounds": num_rounds,
            "stages": list(self.cfg.stages),
            "method": self.cfg.method,
            "sites": self.cfg.sites,
            "failures": failures_total,
            "final_loss": next((r["loss"] for r in reversed(self.recorder.records()) if r["loss"] is not None), None),
            "encoder": str(self.encoder_path),
            "curves": str(curves),
            "metrics": str(self.recorder.jsonl),
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log(INFO, "[fcl] run complete: %d rounds, %d site failures, outputs in %s", num_rounds, failures_total, self.output_dir)


def _numbers(values: dict[str, Any]) -> dict[str, int | float]:
    """The finite numbers among a site's metrics (a string, a NaN or a byte string from a site is left out)."""
    return {k: v for k, v in values.items() if is_number(v) and math.isfinite(v)}


def weighted_metrics(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
    """Flower's hook: for each metric, the example-weighted mean over the sites that reported it as a
    finite number, so one site's malformed value cannot fail the aggregation."""
    numbers = [(n, _numbers(m)) for n, m in metrics]
    out = {}
    for key in sorted({k for _, m in numbers for k in m}):
        pairs = [(n, m[key]) for n, m in numbers if key in m]
        total = sum(n for n, _ in pairs)
        if total:
            out[key] = sum(n * value for n, value in pairs) / total
    return out


def describe_failure(failure: Any) -> dict[str, str]:
    """``{"site": ..., "reason": ...}`` for an exception or a ``(proxy, res)`` failure."""
    if isinstance(failure, BaseException):
        match = SITE_FAILURE.search(str(failure))
        if match:
            return {"site": match.group(1), "reason": match.group(2).strip()}
        return {"site": "?", "reason": f"{type(failure).__name__}: {str(failure)[:300]}"}
    proxy, res = failure
    return {"site": f"node {proxy.cid}", "reason": str(getattr(res, "status", res))[:300]}


def _jsonable_random_state(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _random_state_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def server_fn(context: Context) -> ServerAppComponents:
    """Compose the config from the run config and build the server for this run."""
    run_config = context.run_config
    cfg = load_config(shlex.split(str(run_config.get("overrides", ""))), str(run_config.get("config-file", "")) or None)
    cfg = prepare_run(cfg)
    message = {"config": config_to_yaml(cfg), "stage": "pretrain"}

    def round_config(server_round: int) -> dict[str, Any]:
        return {**message, "round": server_round}

    strategy = build_strategy(
        cfg,
        ndarrays_to_parameters(initial_weights(cfg)),
        on_fit_config_fn=round_config,
        on_evaluate_config_fn=round_config,
        fit_metrics_aggregation_fn=weighted_metrics,
        evaluate_metrics_aggregation_fn=weighted_metrics,
    )
    server = FCLServer(cfg, FeatureExchange.from_config(strategy, cfg))
    return ServerAppComponents(
        server=server, config=ServerConfig(num_rounds=cfg.rounds, round_timeout=cfg.federation.round_timeout)
    )


app = ServerApp(server_fn=server_fn)
