"""Relay of feature banks between sites around any Flower strategy.

``FeatureExchange`` wraps a ``flwr.server.strategy.Strategy`` the way Flower's own DP
wrappers do. Everything about model parameters (initialisation, aggregation, evaluation)
is the wrapped strategy's business and is delegated unchanged. The wrapper adds what
federated contrastive learning (Wu et al., MICCAI 2021) needs on top:

- ``aggregate_fit`` takes each site's feature bank out of ``FitRes.metrics`` (wire format:
  ``fcl_flower.wire``), validates it and stores it. The wrapped strategy receives the
  results without the bank bytes, so its metric aggregation never sees them; its
  parameter aggregation is bit-identical to running it on the bare results.
- ``configure_fit`` gives every sampled site its own ``FitIns`` whose config carries the
  *remote bank*: the stored banks of all other sites, concatenated in site-name order,
  each subsampled to ``max_rows_per_site`` rows and optionally cast to float16. A site
  never receives its own bank. ``max_remote_rows`` caps the whole remote bank, split
  evenly over the other sites, so what a site downloads per round does not grow with the
  number of sites.

Site identity. A site is named by the string it reports in ``FitRes.metrics["site"]``.
``proxy.cid`` is the SuperNode's node id: stable in simulation, but a new id every time a
SuperNode restarts in deployment, so it is only a fallback name for clients that report
no ``site``. The wrapper learns a one-to-one mapping cid -> site from each round's results
(a site reporting from a new cid replaces its old cid) and uses it in the next
``configure_fit`` to know whom a proxy belongs to. A proxy whose cid is not yet mapped
while banks are stored (a restarted SuperNode, or every node after the server resumed
from a checkpoint) is asked for its site name with ``get_properties`` (its config is the
round's fit config, so the client can resolve its site; the reply is
``{"site": name}``). A proxy that does not answer gets no remote bank for that round,
since its own bank could not be excluded.

Refused updates. A result whose weights do not fit the model sent that round (another number
of arrays, another shape, NaN or Inf, ``num_examples`` below 1) is left out of the aggregation,
bank included, so one diverged or misconfigured site cannot crash the round or spoil the
global model; it counts as that site's failure (``screen_updates``). Federated fine-tuning
screens its rounds the same way.

Rejected banks. An incoming bank that fails validation is logged (WARNING, naming the
site and the reason), recorded in the round report and not stored; it never reaches
other sites and the round goes on. The site's previous valid bank, if any, is *kept*,
exactly as if the site had failed the round: it ages and is dropped once it is
``stale_after_rounds`` rounds old.

Staleness. A bank received in round ``r`` is relayed in rounds ``r + 1`` to
``r + stale_after_rounds``; if the site has sent no newer valid bank by then, the bank is
dropped at the start of the next ``configure_fit``. ``stale_after_rounds = 0`` keeps banks
forever.

``enabled=False`` turns the relay off: ``configure_fit`` returns the wrapped strategy's
instructions as they are, banks in results are stripped and ignored. Byte accounting
still runs, so the relay's cost can be compared with plain federated MoCo/SimCLR.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns, EvaluateRes, FitIns, FitRes, GetPropertiesIns, Parameters, Scalar, parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fcl_flower import wire
from fcl_flower.config import relays_banks

RoundReport = dict[str, Any]

STATE_KEYS = ("sites", "bank_rounds", "bank_rows", "features", "partitions", "cids", "cid_sites")


@dataclass(frozen=True)
class _Bank:
    """A validated bank as stored: ``features`` (N, d) float32, ``partitions`` (N,) int64."""

    features: np.ndarray
    partitions: np.ndarray
    server_round: int


@dataclass
class _RoundRecord:
    """Accounting of the round under way, keyed by cid until site names are known."""

    server_round: int
    down: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_stale: list[str] = field(default_factory=list)
    reference: list[tuple[int, ...]] | None = None  # shapes of the global weights sent this round


def _usable_evaluation(res: EvaluateRes) -> bool:
    n, loss = res.num_examples, res.loss
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and wire.is_number(loss) and math.isfinite(loss)


def screen_updates(
    results: list[tuple[ClientProxy, FitRes]], reference: list[tuple[int, ...]]
) -> tuple[list[tuple[ClientProxy, FitRes]], list[ValueError]]:
    """Split results into those whose weights can be averaged and, for the others, a failure each.

    A failure reads ``[site=<name>] update rejected: <problem>`` (``wire.update_problem``), so the
    server reports it under the site's name; the round goes on with the rest.
    """
    kept, rejected = [], []
    for proxy, res in results:
        problem = wire.update_problem(parameters_to_ndarrays(res.parameters), res.num_examples, reference)
        if problem is None:
            kept.append((proxy, res))
            continue
        site = res.metrics.get(wire.SITE) or f"node:{proxy.cid}"
        log(WARNING, "update of site %s (node %s) rejected: %s", site, proxy.cid, problem)
        rejected.append(ValueError(f"[site={site}] update rejected: {problem}"))
    return kept, rejected


def _parameters_nbytes(parameters: Parameters) -> int:
    return sum(len(tensor) for tensor in parameters.tensors)


class FeatureExchange(Strategy):
    """Wrap ``strategy`` and relay each site the validated banks of the other sites.

    Args:
        strategy: any Flower strategy; it does all parameter aggregation.
        enabled: ``False``: no banks are relayed (plain federated baselines).
        proj_dim: ``d``, the feature dimension every bank must have.
        num_partitions: ``S``; partition ids must lie in ``[0, S)``.
        max_rows_per_site: relay at most this many rows of each other site's bank,
            sampled uniformly without replacement, seeded by (seed, round, source site),
            so every receiver gets the same rows of a site in a round; 0: all rows.
        max_remote_rows: at most this many rows in the whole remote bank of one site:
            each of its ``n`` other sites contributes at most ``max_remote_rows // n``
            rows (plus one for ``max_remote_rows % n`` of them, chosen per round), drawn
            from the rows above as a prefix of a permutation seeded by (seed, round,
            source site), so receivers given the same count get the same rows; 0: no cap.
        float16: relay features as float16 (stored as float32 either way).
        stale_after_rounds: drop a stored bank this many rounds after it was received
            unless a newer one arrives; 0: never.
        max_rows: reject incoming banks with more rows than this.
        norm_tolerance: reject incoming banks with a row whose L2 norm differs from 1
            by more than this.
        seed: base seed of the subsampling.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        enabled: bool,
        proj_dim: int,
        num_partitions: int,
        max_rows_per_site: int,
        float16: bool,
        stale_after_rounds: int,
        max_rows: int,
        norm_tolerance: float,
        seed: int,
        identify_timeout: float | None = None,
        max_remote_rows: int = 0,
    ) -> None:
        super().__init__()
        for name, value, least in (
            ("proj_dim", proj_dim, 1),
            ("num_partitions", num_partitions, 1),
            ("max_rows_per_site", max_rows_per_site, 0),
            ("max_remote_rows", max_remote_rows, 0),
            ("stale_after_rounds", stale_after_rounds, 0),
            ("max_rows", max_rows, 1),
        ):
            if value < least:
                raise ValueError(f"relay option {name} must be at least {least}, got {value}")
        if not norm_tolerance >= 0.0:
            raise ValueError(f"relay option norm_tolerance must be >= 0, got {norm_tolerance}")
        self.strategy = strategy
        self.enabled = enabled
        self.proj_dim = proj_dim
        self.num_partitions = num_partitions
        self.max_rows_per_site = max_rows_per_site
        self.max_remote_rows = max_remote_rows
        self.float16 = float16
        self.stale_after_rounds = stale_after_rounds
        self.max_rows = max_rows
        self.norm_tolerance = norm_tolerance
        self.seed = seed
        self.identify_timeout = identify_timeout
        self.fit_failures = 0
        """Failures (exceptions or non-OK results) seen by ``aggregate_fit`` in total."""
        self.rejected_banks = 0
        """Banks rejected by validation in total."""
        self._banks: dict[str, _Bank] = {}
        self._cid_to_site: dict[str, str] = {}
        self._pending: _RoundRecord | None = None
        self._last_report: RoundReport | None = None

    @classmethod
    def from_config(cls, strategy: Strategy, cfg: Any) -> FeatureExchange:
        """Build from the project config: ``cfg.relay``, ``cfg.model.proj_dim``,
        ``cfg.data.num_partitions`` and ``cfg.seed``; enabled only where ``relays_banks(cfg)``."""
        relay = cfg.relay
        return cls(
            strategy,
            enabled=relays_banks(cfg),
            proj_dim=int(cfg.model.proj_dim),
            num_partitions=int(cfg.data.num_partitions),
            max_rows_per_site=int(relay.max_rows_per_site),
            float16=bool(relay.float16),
            stale_after_rounds=int(relay.stale_after_rounds),
            max_rows=int(relay.max_rows),
            norm_tolerance=float(relay.norm_tolerance),
            seed=int(cfg.seed),
            identify_timeout=cfg.federation.round_timeout,
            max_remote_rows=int(relay.get("max_remote_rows", 0)),
        )

    def __repr__(self) -> str:
        return f"FeatureExchange({self.strategy!r}, enabled={self.enabled})"

    # ------------------------------------------------------------------ delegation
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The wrapped strategy's initial parameters."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """The wrapped strategy's evaluation instructions, unchanged."""
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """The wrapped strategy's evaluation aggregation over the sites that evaluated something.

        A site with no held-out data answers with 0 examples; flwr's example-weighted
        averages divide by the total, so such results are left out (all of them: no loss).
        So is a result whose example count is not a positive int or whose loss is not a
        finite number, which would fail or spoil the average.
        """
        evaluated = [(proxy, res) for proxy, res in results if _usable_evaluation(res)]
        if not evaluated:
            return None, {}
        return self.strategy.aggregate_evaluate(server_round, evaluated, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """The wrapped strategy's server-side evaluation, unchanged."""
        return self.strategy.evaluate(server_round, parameters)

    # ------------------------------------------------------------------ relay
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The wrapped strategy's instructions, each with its site's remote bank added.

        Drops stale banks first. The remote bank of a proxy mapped to site ``s`` is the
        concatenation, in site-name order, of the (subsampled) banks of every stored site
        other than ``s``: ``remote.features`` (M, d) float16/float32, ``remote.partitions``
        (M,) int64. Proxies with no other stored site, or not mapped to a site yet, get
        the wrapped config unchanged (no ``remote.*`` keys).
        """
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        record = _RoundRecord(server_round, dropped_stale=self._drop_stale(server_round),
                              reference=[a.shape for a in parameters_to_ndarrays(parameters)])
        if not instructions:  # Flower skips aggregate_fit: the round's report is final now
            self._pending = None
            self._last_report = self._report(record, {}, [], 0)
            return instructions
        self._pending = record
        if not self.enabled:
            for proxy, ins in instructions:
                record.down[proxy.cid] = self._down_entry(ins.parameters, {})
            return instructions
        relayed = {site: self._relayed_rows(site, server_round) for site in sorted(self._banks)}
        if relayed:
            self._identify([(p, ins) for p, ins in instructions if p.cid not in self._cid_to_site], server_round)
        out: list[tuple[ClientProxy, FitIns]] = []
        for proxy, ins in instructions:
            own = self._cid_to_site.get(proxy.cid)
            others = [site for site in relayed if site != own]
            remote: dict[str, bytes | int] = {}
            if own is None and relayed:
                log(INFO, "relay: node %s has no known site yet; no remote bank this round",
                    proxy.cid)
            elif others:
                rows = [self._capped(site, relayed[site], count, server_round)
                        for site, count in zip(others, self._shares(others, server_round), strict=True)]
                remote = wire.remote_bank_to_config(
                    np.concatenate([features for features, _ in rows]),
                    np.concatenate([partitions for _, partitions in rows]),
                    n_sites=len(others),
                )
            record.down[proxy.cid] = self._down_entry(ins.parameters, remote)
            out.append((proxy, FitIns(ins.parameters, {**ins.config, **remote})))
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Store the valid banks, then aggregate with the wrapped strategy.

        Results whose weights do not fit the model sent this round (``screen_updates``) are
        left out, bank included, and listed in the round report's ``rejected_updates``. The
        wrapped strategy gets the other results with the ``bank.*`` metrics removed (``site``
        and all other metrics stay).
        """
        record = self._pending
        if record is None or record.server_round != server_round:
            record = _RoundRecord(server_round)
        self._pending = None
        kept, rejected_updates = screen_updates(results, record.reference) if record.reference else (results, [])
        kept_ids = {id(res) for _, res in kept}
        self.fit_failures += len(failures) + len(rejected_updates)
        names = [self._reported_site(proxy, res) for proxy, res in results]
        name_counts = Counter(name for name in names if name is not None)
        up: dict[str, dict[str, Any]] = {}
        rejected: list[dict[str, str]] = []
        stripped: list[tuple[ClientProxy, FitRes]] = []
        for (proxy, res), site in zip(results, names, strict=True):
            entry: dict[str, Any] = {
                "up_weights_bytes": _parameters_nbytes(res.parameters),
                "up_bank_bytes": sum(
                    len(value) for key, value in res.metrics.items()
                    if key in wire.BANK_KEYS and isinstance(value, (bytes, bytearray))
                ),
                "bank": "absent",
                "bank_rows": 0,
            }
            up[proxy.cid] = entry
            if site is not None:
                self._learn_site(proxy.cid, site)
            if id(res) not in kept_ids:  # weights that cannot be averaged: the bank is not used either
                entry["bank"] = "ignored"
                continue
            stripped.append((proxy, FitRes(
                status=res.status,
                parameters=res.parameters,
                num_examples=res.num_examples,
                metrics={k: v for k, v in res.metrics.items() if k not in wire.BANK_KEYS},
            )))
            if not self.enabled:
                if any(key in res.metrics for key in wire.BANK_KEYS):
                    entry["bank"] = "ignored"
                continue
            try:
                decoded = wire.bank_from_metrics(res.metrics)
                if decoded is None:
                    continue
                if site is None:
                    raise ValueError(
                        f"metrics[{wire.SITE!r}] must be a non-empty str, got "
                        f"{res.metrics.get(wire.SITE)!r}"
                    )
                if name_counts[site] > 1:
                    raise ValueError(f"{name_counts[site]} clients report this site name")
                bank = self._validated_bank(*decoded, server_round)
            except ValueError as exc:
                label = site if site is not None else f"node:{proxy.cid}"
                log(WARNING, "relay: round %s: bank of site %s (node %s) rejected: %s",
                    server_round, label, proxy.cid, exc)
                rejected.append({"site": label, "cid": proxy.cid, "reason": str(exc)})
                entry["bank"] = "rejected"
                continue
            self._banks[site] = bank
            entry["bank"] = "stored"
            entry["bank_rows"] = int(len(bank.partitions))
        self.rejected_banks += len(rejected)
        # Results arrive in completion order; a fixed order makes the floating-point sum
        # of the aggregation, and so a resumed run, reproducible.
        stripped.sort(key=lambda item: (str(item[1].metrics.get(wire.SITE, "")), item[0].cid))
        parameters, metrics = self.strategy.aggregate_fit(server_round, stripped, [*failures, *rejected_updates])
        self._last_report = self._report(record, up, rejected, len(failures) + len(rejected_updates))
        self._last_report["rejected_updates"] = [str(exc) for exc in rejected_updates]
        return parameters, metrics

    # ------------------------------------------------------------------ accounting
    def last_round_report(self) -> RoundReport | None:
        """Accounting of the last round (JSON-serialisable), final after its ``aggregate_fit``.

        Keys: ``round``; ``relay_enabled``; ``sites``: site name (``node:<cid>`` while
        unknown) -> ``cid``, ``down_weights_bytes``, ``down_bank_bytes`` (npy bytes of
        the remote bank), ``remote_rows``, ``remote_sites``, ``returned`` (a result came
        back), ``up_weights_bytes``, ``up_bank_bytes``, ``bank`` (``stored`` |
        ``rejected`` | ``absent`` | ``ignored`` | ``None`` when no result), ``bank_rows``
        (rows stored); ``rejected``: list of ``{site, cid, reason}``; ``dropped_stale``:
        sites whose bank was dropped at the start of the round; ``stored``: site ->
        ``{rows, round}`` of every bank held after the round; ``failures``: number of
        failures, refused updates included; ``rejected_updates``: one ``[site=<name>] update
        rejected: <problem>`` per result left out of the aggregation; ``totals``: the byte and
        row fields summed over sites.
        ``None`` before the first round. A round in which no client was sampled (Flower
        then skips ``aggregate_fit``) gets a report with empty ``sites``.
        """
        return self._last_report

    def _down_entry(self, parameters: Parameters, remote: dict[str, bytes | int]) -> dict[str, int]:
        return {
            "down_weights_bytes": _parameters_nbytes(parameters),
            "down_bank_bytes": sum(
                len(remote[key]) for key in (wire.REMOTE_FEATURES, wire.REMOTE_PARTITIONS)
                if key in remote
            ),
            "remote_rows": int(remote.get(wire.REMOTE_ROWS, 0)),
            "remote_sites": int(remote.get(wire.REMOTE_SITES, 0)),
        }

    def _report(
        self,
        record: _RoundRecord,
        up: dict[str, dict[str, Any]],
        rejected: list[dict[str, str]],
        n_failures: int,
    ) -> RoundReport:
        no_down = {"down_weights_bytes": 0, "down_bank_bytes": 0, "remote_rows": 0,
                   "remote_sites": 0}
        no_up = {"up_weights_bytes": 0, "up_bank_bytes": 0, "bank": None, "bank_rows": 0}
        sites: dict[str, dict[str, Any]] = {}
        for cid in list(record.down) + [cid for cid in up if cid not in record.down]:
            label = self._cid_to_site.get(cid, f"node:{cid}")
            sites[label] = {
                "cid": cid,
                **record.down.get(cid, no_down),
                "returned": cid in up,
                **up.get(cid, no_up),
            }
        totals = {
            key: sum(int(entry[key]) for entry in sites.values())
            for key in ("down_weights_bytes", "down_bank_bytes", "up_weights_bytes",
                        "up_bank_bytes", "remote_rows")
        }
        return {
            "round": record.server_round,
            "relay_enabled": self.enabled,
            "sites": sites,
            "rejected": rejected,
            "dropped_stale": record.dropped_stale,
            "stored": {
                site: {"rows": int(len(bank.partitions)), "round": bank.server_round}
                for site, bank in sorted(self._banks.items())
            },
            "failures": n_failures,
            "totals": totals,
        }

    # ------------------------------------------------------------------ internals
    def _reported_site(self, proxy: ClientProxy, res: FitRes) -> str | None:
        """The site name of a result: ``metrics["site"]``, or the cid if absent.

        ``None`` when ``metrics["site"]`` is present but not a non-empty str.
        """
        value = res.metrics.get(wire.SITE)
        if value is None:
            return proxy.cid
        return value if isinstance(value, str) and value else None

    def _identify(self, unknown: list[tuple[ClientProxy, FitIns]], server_round: int) -> None:
        """Ask nodes with no known site for their site name (``get_properties``), in parallel."""
        if not unknown:
            return

        def ask(proxy: ClientProxy, ins: FitIns) -> tuple[str, Any]:
            res = proxy.get_properties(GetPropertiesIns(config=dict(ins.config)), self.identify_timeout, server_round)
            return proxy.cid, res.properties.get(wire.SITE)

        with ThreadPoolExecutor(max_workers=len(unknown)) as pool:
            futures = [pool.submit(ask, proxy, ins) for proxy, ins in unknown]
        answers = [f.result() for f in futures if f.exception() is None]
        names = Counter(site for _, site in answers if isinstance(site, str) and site)
        for cid, site in answers:
            if isinstance(site, str) and site and names[site] == 1:
                self._learn_site(cid, site)
        log(INFO, "relay: round %s: %d of %d unknown nodes identified their site",
            server_round, sum(1 for p, _ in unknown if p.cid in self._cid_to_site), len(unknown))

    def _learn_site(self, cid: str, site: str) -> None:
        """Map ``cid`` to ``site``, forgetting any older cid of that site."""
        for old in [c for c, s in self._cid_to_site.items() if s == site and c != cid]:
            del self._cid_to_site[old]
        self._cid_to_site[cid] = site

    def _validated_bank(
        self, features: np.ndarray, partitions: np.ndarray, server_round: int
    ) -> _Bank:
        """Check a decoded bank; raise ``ValueError`` with the reason if it is invalid."""
        if features.dtype not in (np.float16, np.float32):
            raise ValueError(f"features dtype {features.dtype}, expected float16 or float32")
        if partitions.dtype.kind not in "iu":
            raise ValueError(f"partitions dtype {partitions.dtype}, expected an integer dtype")
        if features.ndim != 2 or features.shape[1] != self.proj_dim:
            raise ValueError(f"features shape {features.shape}, expected (N, {self.proj_dim})")
        n = len(features)
        if partitions.shape != (n,):
            raise ValueError(f"partitions shape {partitions.shape}, expected ({n},)")
        if n == 0:
            raise ValueError("empty bank (0 rows)")
        if n > self.max_rows:
            raise ValueError(f"{n} rows, more than max_rows = {self.max_rows}")
        if partitions.min() < 0 or partitions.max() >= self.num_partitions:
            raise ValueError(
                f"partition ids in [{partitions.min()}, {partitions.max()}], expected "
                f"[0, {self.num_partitions})"
            )
        features = features.astype(np.float32)
        if not np.isfinite(features).all():
            raise ValueError("non-finite feature values")
        deviation = float(np.abs(np.linalg.norm(features, axis=1) - 1.0).max())
        if deviation > self.norm_tolerance:
            raise ValueError(
                f"row norms differ from 1 by up to {deviation:.3g} > norm_tolerance "
                f"{self.norm_tolerance}"
            )
        return _Bank(features, partitions.astype(np.int64), server_round)

    def _drop_stale(self, server_round: int) -> list[str]:
        """Drop banks not renewed in the last ``stale_after_rounds`` rounds; their sites."""
        if self.stale_after_rounds == 0:
            return []
        stale = sorted(
            site for site, bank in self._banks.items()
            if server_round - 1 - bank.server_round >= self.stale_after_rounds
        )
        for site in stale:
            log(INFO, "relay: round %s: dropping the bank of site %s (from round %s)",
                server_round, site, self._banks[site].server_round)
            del self._banks[site]
        return stale

    def _relayed_rows(self, site: str, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``site``'s bank relayed this round: (K, d) features, (K,) partitions."""
        bank = self._banks[site]
        features, partitions = bank.features, bank.partitions
        if 0 < self.max_rows_per_site < len(partitions):
            rng = np.random.default_rng(
                [self.seed % 2**32, server_round, zlib.crc32(site.encode())]
            )
            rows = np.sort(rng.choice(len(partitions), self.max_rows_per_site, replace=False))
            features, partitions = features[rows], partitions[rows]
        return features.astype(np.float16 if self.float16 else np.float32), partitions

    def _shares(self, others: list[str], server_round: int) -> list[int | None]:
        """Rows each of ``others`` may contribute under ``max_remote_rows`` (None: no cap)."""
        if self.max_remote_rows == 0:
            return [None] * len(others)
        base, extra = divmod(self.max_remote_rows, len(others))
        # the `extra` sites that get one row more: a per-round order, the same for every receiver
        order = sorted(others, key=lambda site: zlib.crc32(f"{self.seed}:{server_round}:{site}".encode()))
        lucky = set(order[:extra])
        return [base + (site in lucky) for site in others]

    def _capped(
        self, site: str, rows: tuple[np.ndarray, np.ndarray], count: int | None, server_round: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first ``count`` rows of a (seed, round, site)-seeded permutation of ``rows``, in order."""
        features, partitions = rows
        if count is None or count >= len(partitions):
            return features, partitions
        rng = np.random.default_rng([self.seed % 2**32, server_round, zlib.crc32(site.encode()), 1])
        keep = np.sort(rng.permutation(len(partitions))[:count])
        return features[keep], partitions[keep]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """The relay's state as plain arrays (``np.savez`` with ``allow_pickle=False`` works).

        Keys: ``sites`` (S,) str, ``bank_rounds`` (S,) int64, ``bank_rows`` (S,) int64,
        ``features`` (sum rows, d) float32 and ``partitions`` (sum rows,) int64 (the banks
        concatenated in ``sites`` order), ``cids`` (C,) str and ``cid_sites`` (C,) str.
        """
        sites = sorted(self._banks)
        banks = [self._banks[site] for site in sites]
        return {
            "sites": np.array(sites, dtype=np.str_),
            "bank_rounds": np.array([b.server_round for b in banks], dtype=np.int64),
            "bank_rows": np.array([len(b.partitions) for b in banks], dtype=np.int64),
            "features": np.concatenate(
                [b.features for b in banks] or [np.zeros((0, self.proj_dim), np.float32)]
            ),
            "partitions": np.concatenate(
                [b.partitions for b in banks] or [np.zeros(0, np.int64)]
            ),
            "cids": np.array(list(self._cid_to_site), dtype=np.str_),
            "cid_sites": np.array(list(self._cid_to_site.values()), dtype=np.str_),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned; raise ``ValueError`` if inconsistent."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"relay state is missing {missing}")
        sites = [str(s) for s in state["sites"]]
        rows = np.asarray(state["bank_rows"], dtype=np.int64)
        features = np.asarray(state["features"], dtype=np.float32)
        partitions = np.asarray(state["partitions"], dtype=np.int64)
        rounds = np.asarray(state["bank_rounds"], dtype=np.int64)
        cids, cid_sites = list(state["cids"]), list(state["cid_sites"])
        if (
            len(rows) != len(sites) or len(rounds) != len(sites)
            or features.ndim != 2 or features.shape[1] != self.proj_dim
            or partitions.shape != (len(features),) or int(rows.sum()) != len(features)
            or len(cids) != len(cid_sites)
        ):
            raise ValueError(
                f"relay state is inconsistent: {len(sites)} sites, rows {rows.tolist()}, "
                f"features {features.shape} (d = {self.proj_dim}), partitions "
                f"{partitions.shape}, {len(cids)} cids for {len(cid_sites)} sites"
            )
        starts = np.concatenate([[0], np.cumsum(rows)])
        self._banks = {
            site: _Bank(features[a:b].copy(), partitions[a:b].copy(), int(r))
            for site, a, b, r in zip(sites, starts[:-1], starts[1:], rounds, strict=True)
        }
        self._cid_to_site = {str(c): str(s) for c, s in zip(cids, cid_sites, strict=True)}
        self._pending = None
