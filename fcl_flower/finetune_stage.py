"""The fine-tuning stage on the server: local k-fold and federated (FedAvg) fine-tuning.

``run_finetune_stage(server, timeout)`` is called by ``FCLServer.fit`` after
pre-training (if any). It talks to the sites only through Flower's
``fit_clients``/``evaluate_clients`` with ``FitIns``/``EvaluateIns`` whose config names
``stage = "finetune"`` and a ``task``; the sites' ``FinetuneClient`` does the work.

For the method of the run (``cfg.method``) it fills a grid of *cells*, one per
(``local`` | ``federated``, N):

- U-Net initialisation: ``finetune.init = auto`` takes ``finetune.encoder`` if given,
  else this run's pre-trained encoder (``server.encoder_path``) if pre-training ran,
  else a random U-Net; ``random`` always a random U-Net; ``local_pretrain`` first asks
  every site to pre-train alone (task ``local_pretrain``) and uses each site's own
  encoder for local fine-tuning and their FedAvg for federated fine-tuning. The
  decoder always starts from the same seeded initialisation.
- Local: one ``local`` message per site runs the whole k-fold local fine-tuning for
  every missing N and returns its Dice/HD95 per N (and per fold).
- Federated: for each N and each run fold, ``finetune.rounds`` rounds of supervised
  FedAvg of the whole U-Net over all sites (sum in site order: reproducible), then
  each site scores the final U-Net on its held-out fold.

Results: ``<output_dir>/finetune/results.json`` (cells with per-site rows, mean and
std across sites, failures, the fingerprint and config key each cell was computed
under, and where: the server's and each site's compute environment, see
``fcl_flower.environment``) and ``results.csv``; federated round losses in ``rounds.jsonl`` there; one
``[fcl]`` console line per cell and per federated round. With ``resume=true`` a cell
already in ``results.json`` with the same fingerprint and no failed site is not computed
again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.server import evaluate_clients, fit_clients
from omegaconf import DictConfig

from fcl_flower.config import FINETUNE_TASKS, config_to_yaml
from fcl_flower.environment import EnvironmentRecord, environment_record, merge_records
from fcl_flower.finetune import (
    average_weights, config_fingerprint, initial_unet_weights, metric_keys, replace_encoder,
)
from fcl_flower.models import encoder_from_weights, load_encoder
from fcl_flower.pretrain import initial_weights
from fcl_flower.wire import SITE, is_number, result_problem
from strategies.feature_exchange import screen_updates

if TYPE_CHECKING:
    from fcl_flower.server_app import FCLServer

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def cell_key(task: str, n_labeled: int) -> str:
    """``"local/4"``: the key of a cell in ``results.json``."""
    return f"{task}/{n_labeled}"


def requested_cells(finetune: DictConfig) -> list[tuple[str, int]]:
    """The (task, N) cells a run's ``finetune`` config asks for: local before federated, N as listed."""
    return [(t, n) for t in FINETUNE_TASKS if t in finetune.tasks for n in finetune.n_labeled]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def weights_sha256(arrays: Sequence[Any]) -> str:
    """SHA-256 of a list of arrays / tensors: shapes, dtypes and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def site_stats(sites: dict[str, dict[str, Any]], keys: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) std across sites of each metric; nan-aware."""
    mean, std = {}, {}
    for key in keys:
        values = np.array([s.get(key, np.nan) for s in sites.values()], dtype=np.float64)
        values = values[np.isfinite(values)]
        mean[key] = float(values.mean()) if len(values) else float("nan")
        std[key] = float(values.std()) if len(values) else float("nan")
    return mean, std


def screen_results(
    results: list[tuple[ClientProxy, Any]], required: Sequence[str]
) -> tuple[list[tuple[ClientProxy, Any]], list[ValueError]]:
    """Split one message's results into usable ones and, for the others, a failure each.

    A result needs its own site name and every ``required`` metric as a number
    (``wire.result_problem``); a failure reads ``[site=<name>] result rejected: <problem>``, so it
    is reported under the site's name and the other sites' results are kept.
    """
    kept, rejected, taken = [], [], set()
    for proxy, res in results:
        problem = result_problem(res.metrics, required, taken)
        if problem is None:
            taken.add(res.metrics[SITE])
            kept.append((proxy, res))
        else:
            site = res.metrics.get(SITE)
            rejected.append(ValueError(f"[site={site if isinstance(site, str) and site else f'node:{proxy.cid}'}] "
                                       f"result rejected: {problem}"))
    return kept, rejected


def parse_local_results(res: Any, budgets: Sequence[int], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A site's local k-fold cells, ``{str(N): cell}`` from its ``metrics["results"]`` JSON (messages without quotes,
    as ``wire.result_problem``'s).

    Raises:
        ValueError: not JSON, a budget without a cell, or a cell metric that is not a number.
    """
    try:
        cells = json.loads(str(res.metrics.get("results")))
    except json.JSONDecodeError as exc:
        raise ValueError(f"the results metric is not JSON ({exc.msg} at character {exc.pos})") from None
    for n in budgets:
        cell = cells.get(str(n)) if isinstance(cells, dict) else None
        if not isinstance(cell, dict):
            raise ValueError(f"the results metric has no cell for N = {n}")
        bad = [k for k in keys if k in cell and not is_number(cell[k])]
        if bad:
            raise ValueError(f"the results metric for N = {n} has non-numbers in {', '.join(bad)}")
    return cells


class ResultsStore:
    """``results.json`` + ``results.csv`` of a run's fine-tuning cells, written atomically after every cell."""

    def __init__(self, folder: Path, cfg: DictConfig, fingerprint: str, config_key: str = "") -> None:
        self.folder = folder
        self.config_key = config_key
        self.json_path = folder / RESULTS_JSON
        self.csv_path = folder / RESULTS_CSV
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.cells: dict[str, dict[str, Any]] = {}
        if cfg.resume and self.json_path.is_file():
            self.cells = json.loads(self.json_path.read_text()).get("cells", {})
        for cell in self.cells.values():  # cells stored before they carried a config key get it from their fingerprint
            if cell.get("fingerprint") == fingerprint:
                cell["config_key"] = config_key

    def done(self, task: str, n_labeled: int) -> bool:
        """The cell is stored, complete, and was computed with this fingerprint."""
        cell = self.cells.get(cell_key(task, n_labeled))
        return bool(cell and cell.get("complete") and cell.get("fingerprint") == self.fingerprint)

    def put(self, task: str, n_labeled: int, sites: dict[str, dict[str, Any]], failures: list[dict[str, str]],
            seconds: float, environment: EnvironmentRecord) -> dict[str, Any]:
        keys = metric_keys(self.cfg.model.num_classes)
        mean, std = site_stats(sites, keys)
        cell = {
            "method": self.cfg.method,
            "finetune": task,
            "n_labeled": n_labeled,
            "fingerprint": self.fingerprint,
            "config_key": self.config_key,
            "complete": not failures and len(sites) >= self.cfg.sites,
            "dice_mean": mean["dice"],
            "dice_std": std["dice"],
            "mean": mean,
            "std": std,
            "sites": dict(sorted(sites.items())),
            "failures": failures,
            "seconds": seconds,
            "environment": environment,
        }
        self.cells[cell_key(task, n_labeled)] = cell
        self.write()
        return cell

    def write(self) -> None:
        order = {t: i for i, t in enumerate(FINETUNE_TASKS)}
        cells = dict(sorted(self.cells.items(), key=lambda kv: (order.get(kv[1]["finetune"], 9), kv[1]["n_labeled"])))
        payload = {
            "method": self.cfg.method, "init": self.cfg.finetune.init, "config_key": self.config_key,
            "fingerprint": self.fingerprint, "cells": cells,
        }
        _atomic_write(self.json_path, json.dumps(payload, indent=1, allow_nan=True) + "\n")
        keys = metric_keys(self.cfg.model.num_classes)
        rows = []
        for cell in cells.values():
            head = [cell["method"], cell["finetune"], cell["n_labeled"]]
            for site, values in cell["sites"].items():
                rows.append([*head, site, *(values.get(k, "") for k in keys)])
            rows.append([*head, "mean", *(cell["mean"].get(k, "") for k in keys)])
            rows.append([*head, "std", *(cell["std"].get(k, "") for k in keys)])
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["method", "finetune", "n_labeled", "site", *keys])
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)


def cell_line(cell: dict[str, Any], num_classes: int) -> str:
    """``[fcl] finetune local N=2 | dice 0.612 ± 0.051 (rv .. myo .. lv ..) | hd95 9.1 mm | sites 10 ok 0 failed | 80 s``"""
    from fcl_flower.finetune import class_names

    m = cell["mean"]
    classes = " ".join(f"{c} {m.get('dice_' + c, float('nan')):.3f}" for c in class_names(num_classes))
    return (
        f"[fcl] finetune {cell['finetune']} N={cell['n_labeled']} | method {cell['method']} | "
        f"dice {cell['dice_mean']:.4f} ± {cell['dice_std']:.4f} ({classes}) | hd95 {m.get('hd95', float('nan')):.2f} mm | "
        f"sites {len(cell['sites'])} ok {len(cell['failures'])} failed | {cell['seconds']:.1f} s"
    )


class FinetuneStage:
    """One run of the fine-tuning stage on ``server`` (see the module docstring)."""

    def __init__(self, server: "FCLServer", timeout: float | None) -> None:
        self.server = server
        self.cfg: DictConfig = server.cfg
        self.timeout = timeout
        self.folder = Path(server.output_dir) / "finetune"
        self.message = {"config": config_to_yaml(self.cfg), "stage": "finetune"}
        self.group = 10_000  # Flower group ids of this stage's messages, after pre-training's rounds
        self.encoder_file = self._encoder_file()
        self.config_key = config_fingerprint(self.cfg)
        self.fingerprint = config_fingerprint(self.cfg, self.init_kind, self._encoder_digest())
        self.store = ResultsStore(self.folder, self.cfg, self.fingerprint, self.config_key)
        self.upstream: list[EnvironmentRecord] = []  # where the sites' own encoders were pre-trained (local CL)
        self.failures = 0
        self._init: list[np.ndarray] | None = None
        self._federated_init: list[np.ndarray] | None = None

    # -- initialisation ----------------------------------------------------------------
    def _encoder_file(self) -> Path | None:
        ft = self.cfg.finetune
        if ft.init != "auto":
            return None
        if ft.encoder:
            path = Path(ft.encoder).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"finetune.encoder {path} does not exist")
            return path
        if "pretrain" in self.cfg.stages:
            return Path(self.server.encoder_path)
        return None

    @property
    def init_kind(self) -> str:
        if self.cfg.finetune.init == "local_pretrain":
            return "local_pretrain"
        return "encoder" if self.encoder_file else "random"

    def _encoder_digest(self) -> str:
        """SHA-256 of the encoder's weights (not of the file: a resumed run writes the same weights again)."""
        if not self.encoder_file:
            return ""
        return weights_sha256(list(load_encoder(self.cfg, self.encoder_file).state_dict().values()))

    def initial_weights(self) -> list[np.ndarray]:
        """The U-Net every site starts from (pre-trained encoder or random + the seeded decoder)."""
        if self._init is None:
            encoder = load_encoder(self.cfg, self.encoder_file) if self.encoder_file else None
            self._init = initial_unet_weights(self.cfg, encoder)
        return self._init

    def federated_initial_weights(self) -> list[np.ndarray]:
        """``initial_weights``, or for ``local_pretrain`` its encoder replaced by the FedAvg of the sites' own."""
        if self._federated_init is None:
            self._federated_init = self.initial_weights()
            if self.cfg.finetune.init == "local_pretrain":
                self._federated_init = replace_encoder(
                    self.cfg, self._federated_init, encoder_from_weights(self.cfg, self._local_pretrain())
                )
        return self._federated_init

    def _local_pretrain(self) -> list[np.ndarray]:
        """Every site pre-trains alone; returns the sample-weighted mean of their encoder + head weights."""
        t0 = time.perf_counter()
        start = initial_weights(self.cfg)
        results, failures = self._fit_all(ndarrays_to_parameters(start), {"task": "local_pretrain"},
                                          self.cfg.finetune.local_timeout, required=("loss",))
        results, rejected = screen_updates(results, [a.shape for a in start])
        self._report_failures("local pre-training", [*failures, *rejected])
        self.upstream.append(self._environment(results))
        if not results:
            raise RuntimeError("local pre-training failed on every site")
        weights = [parameters_to_ndarrays(res.parameters) for _, res in results]
        losses = ", ".join(f"{res.metrics['site']} {float(res.metrics['loss']):.3f}" for _, res in results)
        self.server.recorder.echo(
            f"[fcl] finetune local pre-training ({self.cfg.method}, {self.cfg.rounds} rounds per site, alone) | "
            f"sites {len(results)} ok {len(failures) + len(rejected)} failed | loss {losses} | {time.perf_counter() - t0:.1f} s"
        )
        return average_weights(weights, [res.num_examples for _, res in results])

    # -- plumbing ----------------------------------------------------------------------
    def _clients(self) -> list[ClientProxy]:
        manager = self.server.client_manager()
        manager.wait_for(self.cfg.sites, timeout=int(self.cfg.federation.round_timeout or 600))
        return [proxy for _, proxy in sorted(manager.all().items())]

    def _next_group(self) -> int:
        self.group += 1
        return self.group

    def _fit_all(self, parameters, extra: dict[str, Any], timeout: float | None, required: Sequence[str] = ()):
        """Every site's fit; results without a site name or a ``required`` metric become failures."""
        ins = FitIns(parameters, {**self.message, "round": 0, **extra})
        results, failures = fit_clients(
            [(proxy, ins) for proxy in self._clients()], self.server.max_workers, timeout, self._next_group()
        )
        results, rejected = screen_results(results, required)
        return sorted(results, key=lambda r: str(r[1].metrics[SITE])), [*failures, *rejected]

    def _evaluate_all(self, parameters, extra: dict[str, Any]):
        """Every site's evaluation; results without a site name or a metric of ``metric_keys`` become failures."""
        ins = EvaluateIns(parameters, {**self.message, "round": 0, **extra})
        results, failures = evaluate_clients(
            [(proxy, ins) for proxy in self._clients()], self.server.max_workers, self.timeout, self._next_group()
        )
        results, rejected = screen_results(results, metric_keys(self.cfg.model.num_classes))
        return sorted(results, key=lambda r: str(r[1].metrics[SITE])), [*failures, *rejected]

    def _report_failures(self, what: str, failures: list[Any]) -> list[dict[str, str]]:
        from fcl_flower.server_app import describe_failure

        described = [describe_failure(f) for f in failures]
        for f in described:
            self.server.recorder.echo(f"[fcl] finetune {what}: site {f['site']} failed: {f['reason']}")
        self.failures += len(described)
        return described

    # -- the cells ---------------------------------------------------------------------
    def run(self) -> int:
        cells = requested_cells(self.cfg.finetune)
        todo = [(t, n) for t, n in cells if not self.store.done(t, n)]
        done = [(t, n) for t, n in cells if self.store.done(t, n)]
        if done:
            self.server.recorder.echo(
                f"[fcl] finetune: {len(done)} cells already in {self.store.json_path} (resume), "
                f"{len(todo)} to compute: {', '.join(cell_key(t, n) for t, n in todo) or 'none'}"
            )
        self.store.write()
        if not todo:
            return 0
        local = [n for t, n in todo if t == "local"]
        if local:
            self._local(local)
        for t, n in todo:
            if t == "federated":
                self._federated(n)
        return self.failures

    def _local(self, budgets: list[int]) -> None:
        if self.cfg.finetune.init == "local_pretrain":
            self.federated_initial_weights()  # the sites' own encoders must exist first
        t0 = time.perf_counter()
        results, failures = self._fit_all(
            ndarrays_to_parameters(self.initial_weights()),
            {"task": "local", "n_labeled": ",".join(str(n) for n in budgets)},
            self.cfg.finetune.local_timeout,
        )
        keys = metric_keys(self.cfg.model.num_classes)
        per_site, unreadable = {}, []
        for proxy, res in results:
            try:
                per_site[res.metrics[SITE]] = parse_local_results(res, budgets, keys)
            except ValueError as exc:  # that site's cells are lost, the others' are kept
                unreadable.append(ValueError(f"[site={res.metrics[SITE]}] result rejected: {exc}"))
        results = [(proxy, res) for proxy, res in results if res.metrics[SITE] in per_site]
        described = self._report_failures("local", [*failures, *unreadable])
        environment = merge_records([*self.upstream, self._environment(results)])
        for n in budgets:
            sites = {site: cells[str(n)] for site, cells in per_site.items()}
            cell = self.store.put("local", n, sites, described, time.perf_counter() - t0, environment)
            self.server.recorder.echo(cell_line(cell, self.cfg.model.num_classes))

    def _federated(self, n: int) -> None:
        ft = self.cfg.finetune
        t0 = time.perf_counter()
        folds = ft.run_folds or ft.folds  # the first run_folds folds, as in local fine-tuning
        keys = metric_keys(self.cfg.model.num_classes)
        per_site: dict[str, dict[str, Any]] = {}
        described: list[dict[str, str]] = []
        environments: list[EnvironmentRecord] = []
        for fold in range(folds):
            weights = self.federated_initial_weights()
            sequence = {"task": "federated", "n_labeled": n, "fold": fold, "run": self.fingerprint}
            for rnd in range(1, ft.rounds + 1):
                t_round = time.perf_counter()
                extra = {**sequence, "round": rnd}
                results, failures = self._fit_all(ndarrays_to_parameters(weights), extra, self.timeout, required=("loss",))
                results, rejected = screen_updates(results, [a.shape for a in weights])
                round_failures = self._report_failures(f"federated N={n} fold {fold} round {rnd}", [*failures, *rejected])
                described += round_failures
                environments.append(self._environment(results))
                if results:
                    weights = average_weights(
                        [parameters_to_ndarrays(res.parameters) for _, res in results],
                        [res.num_examples for _, res in results],
                    )
                losses = [float(res.metrics["loss"]) for _, res in results]
                record = {
                    "n_labeled": n, "fold": fold, "round": rnd, "seconds": time.perf_counter() - t_round,
                    "loss": float(np.mean(losses)) if losses else None,
                    "sites": {str(res.metrics["site"]): {"loss": float(res.metrics["loss"]),
                                                         "samples": int(res.num_examples)} for _, res in results},
                    "failures": round_failures,
                }
                self._append_round(record)
                loss_text = f"{record['loss']:.4f}" if record["loss"] is not None else "n/a"
                self.server.recorder.echo(
                    f"[fcl] finetune federated N={n} fold {fold} round {rnd}/{ft.rounds} | loss {loss_text} | "
                    f"sites {len(results)} ok {len(round_failures)} failed | {record['seconds']:.1f} s"
                )
            results, failures = self._evaluate_all(ndarrays_to_parameters(weights), {**sequence, "round": ft.rounds})
            described += self._report_failures(f"federated N={n} fold {fold} evaluation", failures)
            environments.append(self._environment(results))
            for _, res in results:
                row = {k: float(res.metrics[k]) for k in keys}
                per_site.setdefault(res.metrics[SITE], {"folds": []})["folds"].append(
                    {"fold": fold, **row, "volumes": res.num_examples})
        for site, entry in per_site.items():
            for key in keys:
                values = np.array([f.get(key, np.nan) for f in entry["folds"]], dtype=np.float64)
                entry[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        cell = self.store.put("federated", n, per_site, described, time.perf_counter() - t0,
                              merge_records([*self.upstream, *environments]))
        self.server.recorder.echo(cell_line(cell, self.cfg.model.num_classes))

    def _environment(self, results: list[tuple[ClientProxy, Any]]) -> EnvironmentRecord:
        """Where one message's results were computed: this server and each site that answered.

        A cell's record merges those of all messages it depends on: its own, and for
        ``finetune.init=local_pretrain`` the sites' local pre-training.
        """
        return environment_record(self.server.environment, {str(res.metrics["site"]): res.metrics for _, res in results})

    def _append_round(self, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps({"method": self.cfg.method, **record}) + "\n")


def stage_time_budget(cfg: DictConfig) -> float:
    """Seconds the fine-tuning stage may take at most (a watchdog bound for the runner, not an estimate).

    The local k-fold message is bounded by ``finetune.local_timeout`` (or Flower's 12 h
    message TTL), local pre-training likewise, and every federated round and evaluation
    by ``federation.round_timeout`` (or 1 h).
    """
    ft = cfg.finetune
    message_ttl = float(ft.local_timeout or 43_200)
    round_s = float(cfg.federation.round_timeout or 3600)
    budget = 0.0
    if ft.init == "local_pretrain":
        budget += message_ttl
    if "local" in ft.tasks:
        budget += message_ttl
    if "federated" in ft.tasks:
        budget += len(ft.n_labeled) * (ft.run_folds or ft.folds) * (ft.rounds + 1) * round_s
    return budget


def run_finetune_stage(server: "FCLServer", timeout: float | None) -> int:
    """Run the fine-tuning stage of ``server``'s run; returns the number of site failures."""
    return FinetuneStage(server, timeout).run()
