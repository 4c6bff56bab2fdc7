"""Flower ClientApp: thin NumPyClient adapters around the Flower-free trainer.

Each message carries the full run configuration (``config`` key, YAML) and the round
number, so a client needs nothing but its node config: ``partition-id`` in
simulation, ``data-dir`` / ``site-name`` / ``state-dir`` in deployment. No per-site
state is kept in this process (Ray reuses it for other sites; a SuperNode starts a new
one every round): it lives in the site's state folder.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Mapping

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, NDArrays, Scalar
from omegaconf import DictConfig

from fcl_flower.config import config_from_yaml, relays_banks
from fcl_flower.environment import ENVIRONMENT, environment_metric
from fcl_flower.site import RoundStateStore, Site, resolve_site, split_holdout
from fcl_flower.wire import SITE, bank_to_metrics, remote_bank_from_config

if TYPE_CHECKING:
    from fcl_flower.fedbn import SiteNormStore

LOG = logging.getLogger(__name__)
SITE_TAG = "[site={}]"


def process_start_time() -> float:
    """When this process started, as ``time.time()`` (Linux ``/proc``, 10 ms ticks; elsewhere: now)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0
    return time.time() - max(age, 0.0)


_PROCESS_START: float | None = process_start_time()


def message_start_time() -> float:
    """When this process began serving the current message: its own start time for the
    first message (a SuperNode starts a fresh ClientApp process per message), then the
    time of the call (Ray reuses its actor processes across messages)."""
    global _PROCESS_START
    start, _PROCESS_START = _PROCESS_START, None
    return time.time() if start is None else start


@functools.lru_cache(maxsize=2)
def _parsed_config(text: str) -> DictConfig:
    """The run config a message carries (read-only). Parsing and validating it costs ~80 ms
    of CPU, and a Ray actor serves every message of a run with the same text: parse once."""
    return config_from_yaml(text)


class SiteFailure(RuntimeError):
    """Any error on a site, re-raised with the site's name so the server can report it."""


@contextmanager
def failures_named(site: str) -> Iterator[None]:
    """Re-raise any exception inside as ``SiteFailure('[site=NAME] Type: message')``."""
    try:
        yield
    except SiteFailure:
        raise
    except Exception as exc:
        raise SiteFailure(f"{SITE_TAG.format(site)} {type(exc).__name__}: {exc}") from exc


class _SiteClient(NumPyClient):
    """Shared plumbing: config from the message, the site from the node config."""

    def __init__(self, node_config: Mapping[str, Scalar], started: float | None = None) -> None:
        self.node_config = dict(node_config)
        self.started = time.time() if started is None else started

    def _site_label(self) -> str:
        return str(self.node_config.get("site-name") or self.node_config.get("partition-id", "?"))

    @staticmethod
    def _config(config: Mapping[str, Scalar]) -> tuple[DictConfig, int]:
        return _parsed_config(str(config["config"])), int(config["round"])

    def _volumes(self, cfg: DictConfig, site: Site, held_out: bool) -> list[np.ndarray]:
        from fcl_flower.data.preprocess import load_site_volumes

        train, holdout = split_holdout(site.records, cfg.data.holdout_fraction, cfg.seed, site.name)
        return [v.image for v in load_site_volumes(holdout if held_out else train, cfg)]


class FCLClient(_SiteClient):
    """Contrastive pre-training client: one local round per ``fit``, bank out, remote bank in."""

    def get_parameters(self, config: Mapping[str, Scalar]) -> NDArrays:
        from fcl_flower.pretrain import initial_weights

        cfg, _ = self._config(config)
        return initial_weights(cfg)

    def fit(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        from fcl_flower.pretrain import pretrain_round

        with failures_named(self._site_label()):
            cfg, server_round = self._config(config)
            site = resolve_site(cfg, self.node_config)
        with failures_named(site.name):
            volumes = self._volumes(cfg, site, held_out=False)
            remote = remote_bank_from_config(config) if relays_banks(cfg) else None
            store = RoundStateStore(site.state_dir / "pretrain")
            work = store.checkout(server_round)
            called = time.time()
            # FedProx (strategy.name=fedprox) sends its mu with every fit; other strategies send none
            proximal_mu = float(config.get("proximal_mu", 0.0))
            result = pretrain_round(parameters, remote, volumes, cfg, work, server_round, proximal_mu)
            store.commit(server_round, work)
            metrics: dict[str, Scalar] = {"site": site.name, **result.metrics}
            # message in -> first training step: process start, imports, data, model build, state load
            metrics["startup_seconds"] = called - self.started + result.metrics["setup_seconds"]
            metrics[ENVIRONMENT] = environment_metric()
            if relays_banks(cfg):  # otherwise no feature leaves the site
                metrics.update(bank_to_metrics(result.bank_features, result.bank_partitions))
            return result.weights, result.num_samples, metrics

    def evaluate(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        from fcl_flower.pretrain import evaluate_contrastive

        with failures_named(self._site_label()):
            cfg, server_round = self._config(config)
            site = resolve_site(cfg, self.node_config)
        with failures_named(site.name):
            volumes = self._volumes(cfg, site, held_out=True)
            state = RoundStateStore(site.state_dir / "pretrain").latest_before(server_round + 1)
            if not volumes or state is None:
                return 0.0, 0, {"site": site.name}
            metrics = evaluate_contrastive(parameters, volumes, cfg, state)
            return float(metrics["loss"]), len(volumes), {"site": site.name, **metrics}


class FinetuneClient(_SiteClient):
    """Fine-tuning client; ``config["task"]`` says what to do with the site's labeled patients.

    - ``local_pretrain`` (fit): pre-train the encoder on this site alone (``finetune.init =
      local_pretrain``); returns encoder + head weights, cached on the site's disk.
    - ``local`` (fit): the whole local k-fold fine-tuning for every N in ``n_labeled``
      (comma-separated), starting from the U-Net in ``parameters`` (its encoder replaced
      by the site's own for ``local_pretrain``); returns no weights and the results as
      JSON in ``metrics["results"]``.
    - ``federated`` (fit): ``finetune.fed_local_steps`` steps on the N labeled patients of
      fold ``fold``; returns the U-Net and the number of training slices.
    - ``federated`` (evaluate): Dice / HD95 of the U-Net on the fold's held-out patients.

    Overlays (held-out slices with ground truth and prediction) go to the site's state
    folder, ``<state_dir>/finetune/overlays``; images never leave the site.
    """

    def get_parameters(self, config: Mapping[str, Scalar]) -> NDArrays:
        from fcl_flower.finetune import initial_unet_weights

        cfg, _ = self._config(config)
        return initial_unet_weights(cfg, None)

    def _labeled(self, cfg: DictConfig, site: Site, patients: list[str] | None = None):
        from fcl_flower.data.preprocess import load_site_volumes
        from fcl_flower.finetune import labeled_volumes

        records = [r for r in site.records if r.label is not None and (patients is None or r.patient in patients)]
        return labeled_volumes(load_site_volumes(records, cfg))

    def _split(self, cfg: DictConfig, site: Site, n_labeled: int, fold: int):
        from fcl_flower.finetune import fold_splits

        patients = sorted({r.patient for r in site.records if r.label is not None})
        splits = fold_splits(patients, cfg, n_labeled)
        if fold >= len(splits):
            raise ValueError(f"fold {fold} is not run (finetune.folds={cfg.finetune.folds}, run_folds={cfg.finetune.run_folds})")
        return splits[fold]

    def _own_norm(
        self, cfg: DictConfig, site: Site, config: Mapping[str, Scalar], n: int, fold: int
    ) -> SiteNormStore | None:
        """This site's normalisation layers for the message's federated sequence (FedBN), or None."""
        if cfg.finetune.federated_norm != "local":
            return None
        from fcl_flower.fedbn import SiteNormStore

        return SiteNormStore(site.state_dir / "finetune" / "norm", str(config["run"]), n, fold)

    def fit(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        import json
        import time

        import torch

        from fcl_flower import finetune as ft

        with failures_named(self._site_label()):
            cfg, server_round = self._config(config)
            site = resolve_site(cfg, self.node_config)
        with failures_named(site.name):
            torch.set_num_threads(cfg.finetune.threads)
            task = str(config["task"])
            state = site.state_dir / "finetune"
            t0 = time.perf_counter()
            if task == "local_pretrain":
                train, _ = split_holdout(site.records, cfg.data.holdout_fraction, cfg.seed, site.name)
                from fcl_flower.data.preprocess import load_site_volumes

                volumes = [v.image for v in load_site_volumes(train, cfg)]
                weights, metrics = ft.local_pretrain(parameters, volumes, cfg, state, ft.local_pretrain_fingerprint(cfg))
                return weights, len(volumes), {"site": site.name, **metrics, ENVIRONMENT: environment_metric()}
            if task == "local":
                from fcl_flower.models import encoder_from_weights

                init = list(parameters)
                if cfg.finetune.init == "local_pretrain":
                    cached = state / ft.LOCAL_ENCODER_FILE
                    if not cached.is_file():
                        raise RuntimeError("finetune.init=local_pretrain but this site has no locally pre-trained encoder yet")
                    with np.load(cached, allow_pickle=False) as saved:
                        own = [saved[f"w{i}"] for i in range(int(saved["count"]))]
                    init = ft.replace_encoder(cfg, init, encoder_from_weights(cfg, own))
                budgets = [int(n) for n in str(config["n_labeled"]).split(",")]

                def overlays(n: int, fold: int, model, test, result) -> None:
                    if fold == 0:
                        ft.write_overlays(
                            state / "overlays", f"local_n{n}", f"{cfg.method} | local fine-tuning | N={n} | {site.name}",
                            test, result.predictions, cfg,
                        )

                hook = overlays if cfg.finetune.overlay_slices > 0 else None
                cells = ft.local_finetune(self._labeled(cfg, site), init, cfg, budgets, site.name, on_fold=hook)
                results = {str(n): cell.to_json() for n, cell in cells.items()}
                return [], len(budgets), {
                    "site": site.name, "results": json.dumps(results), "seconds": time.perf_counter() - t0,
                    ENVIRONMENT: environment_metric(),
                }
            if task == "federated":
                n, fold = int(config["n_labeled"]), int(config["fold"])
                split = self._split(cfg, site, n, fold)
                model = ft.build_unet_from(cfg, parameters)
                own_norm = self._own_norm(cfg, site, config, n, fold)
                if own_norm:
                    own_norm.restore(model, before_round=server_round)
                train = ft.train_segmentation(
                    model, self._labeled(cfg, site, split.labeled), cfg, cfg.finetune.fed_local_steps,
                    ft.stable_seed(cfg.seed, site.name, "federated", n, fold, server_round),
                    first_step=(server_round - 1) * cfg.finetune.fed_local_steps,
                )
                if own_norm:
                    own_norm.save(model, server_round)
                return ft.unet_weights(model), train.samples, {
                    "site": site.name, "loss": train.loss, "samples": train.samples, "seconds": train.seconds,
                    ENVIRONMENT: environment_metric(),
                }
            raise ValueError(f"unknown fine-tuning task {task!r}")

    def evaluate(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        import torch

        from fcl_flower import finetune as ft

        with failures_named(self._site_label()):
            cfg, _ = self._config(config)
            site = resolve_site(cfg, self.node_config)
        with failures_named(site.name):
            torch.set_num_threads(cfg.finetune.threads)
            n, fold = int(config["n_labeled"]), int(config["fold"])
            split = self._split(cfg, site, n, fold)
            test = self._labeled(cfg, site, split.test)
            model = ft.build_unet_from(cfg, parameters)
            own_norm = self._own_norm(cfg, site, config, n, fold)
            if own_norm and not own_norm.restore(model, before_round=int(config["round"]) + 1):
                LOG.warning("%s: no normalisation layers of its own for N=%d fold %d (FedBN); scoring with the "
                            "server's average", site.name, n, fold)
            result = ft.evaluate_volumes(model, test, cfg, keep_predictions=cfg.finetune.overlay_slices > 0)
            if fold == 0 and cfg.finetune.overlay_slices > 0:
                ft.write_overlays(
                    site.state_dir / "finetune" / "overlays", f"federated_n{n}",
                    f"{cfg.method} | federated fine-tuning | N={n} | {site.name}", test, result.predictions, cfg,
                )
            metrics: dict[str, Scalar] = {
                "site": site.name, **{k: float(v) for k, v in result.mean.items()}, ENVIRONMENT: environment_metric(),
            }
            return 1.0 - float(result.mean["dice"]), len(test), metrics


# The client that serves each stage of a run; the server names the stage in every message.
STAGE_CLIENTS: dict[str, type[_SiteClient]] = {"pretrain": FCLClient, "finetune": FinetuneClient}


class StageClient(_SiteClient):
    """Hands each message to the client of the stage it names (``config["stage"]``)."""

    def _client(self, config: Mapping[str, Scalar]) -> _SiteClient:
        stage = str(config.get("stage", "pretrain"))
        if stage not in STAGE_CLIENTS:
            raise SiteFailure(f"{SITE_TAG.format(self.node_config.get('site-name', '?'))} unknown stage {stage!r}")
        return STAGE_CLIENTS[stage](self.node_config, self.started)

    def get_properties(self, config: Mapping[str, Scalar]) -> dict[str, Scalar]:
        """``{"site": name}``: lets the server map this node to its site (config: a fit config)."""
        with failures_named(self._site_label()):
            cfg, _ = self._config(config)
            return {SITE: resolve_site(cfg, self.node_config).name}

    def get_parameters(self, config: Mapping[str, Scalar]) -> NDArrays:
        return self._client(config).get_parameters(config)

    def fit(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return self._client(config).fit(parameters, config)

    def evaluate(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        return self._client(config).evaluate(parameters, config)


def client_fn(context: Context):
    """Build the client for this node; the stage is chosen by the server per message."""
    return StageClient(context.node_config, message_start_time()).to_client()


app = ClientApp(client_fn=client_fn)
