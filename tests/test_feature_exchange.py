"""FeatureExchange: relays the other sites' banks around any strategy, validates, accounts."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fcl_flower import wire
from fcl_flower.config import load_config
from strategies.feature_exchange import FeatureExchange
from strategies.registry import STRATEGIES, build_strategy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "simulations"))
from benchmark import stub_proxy_class  # noqa: E402

D = 8  # proj_dim
S = 4  # num_partitions
WEIGHTS = [np.zeros((3, 2), np.float32), np.zeros(5, np.float32)]


# A real ClientProxy addressed by cid only (the strategy never calls it); the benchmark drives
# the relay with the same class.
StubProxy = stub_proxy_class()


def manager(cids: list[str]) -> tuple[SimpleClientManager, dict[str, StubProxy]]:
    cm = SimpleClientManager()
    proxies = {cid: StubProxy(cid) for cid in cids}
    for proxy in proxies.values():
        cm.register(proxy)
    return cm, proxies


def unit_bank(n: int, seed: int, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) unit rows and (n,) partition ids in [0, S)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, D))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(dtype), rng.integers(0, S, size=n)


def fit_res(
    site: str | None,
    bank: tuple[np.ndarray, np.ndarray] | None = None,
    weights: list[np.ndarray] | None = None,
    num_examples: int = 10,
    extra: dict | None = None,
) -> FitRes:
    m: dict = {"loss": 1.0, **(extra or {})}
    if site is not None:
        m[wire.SITE] = site
    if bank is not None:
        m.update(wire.bank_to_metrics(*bank))
    return FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(weights or WEIGHTS), num_examples, m
    )


def relay(strategy: FedAvg | None = None, **overrides: object) -> FeatureExchange:
    options: dict = dict(
        enabled=True, proj_dim=D, num_partitions=S, max_rows_per_site=0, float16=False,
        stale_after_rounds=0, max_rows=1000, norm_tolerance=0.01, seed=0,
    )
    options.update(overrides)
    return FeatureExchange(strategy or FedAvg(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1),
                           **options)


def remote_by_cid(
    instructions: list[tuple[ClientProxy, FitIns]],
) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    return {p.cid: wire.remote_bank_from_config(ins.config) for p, ins in instructions}


BANKS = {"A": unit_bank(5, 1), "B": unit_bank(6, 2), "C": unit_bank(7, 3)}
CIDS = {"A": "101", "B": "102", "C": "103"}


def run_round(
    fx: FeatureExchange,
    server_round: int,
    cm: ClientManager,
    proxies: dict[str, StubProxy],
    results: dict[str, FitRes],
) -> list[tuple[ClientProxy, FitIns]]:
    """configure_fit, then aggregate_fit with ``results`` (site -> FitRes from CIDS[site])."""
    instructions = fx.configure_fit(server_round, ndarrays_to_parameters(WEIGHTS), cm)
    params, _ = fx.aggregate_fit(
        server_round, [(proxies[CIDS[site]], res) for site, res in results.items()], []
    )
    assert params is not None
    return instructions


def round_one(fx: FeatureExchange) -> tuple[SimpleClientManager, dict[str, StubProxy]]:
    cm, proxies = manager(list(CIDS.values()))
    run_round(fx, 1, cm, proxies, {s: fit_res(s, BANKS[s]) for s in BANKS})
    return cm, proxies


def test_first_round_sends_no_bank_and_keeps_wrapped_config() -> None:
    fx = relay(FedAvg(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1,
                      on_fit_config_fn=lambda r: {"round": r}))
    cm, _ = manager(list(CIDS.values()))
    instructions = fx.configure_fit(1, ndarrays_to_parameters(WEIGHTS), cm)
    assert len(instructions) == 3
    for _, ins in instructions:
        assert ins.config == {"round": 1}


def test_relays_exactly_the_other_sites_banks() -> None:
    fx = relay()
    cm, _ = round_one(fx)
    instructions = fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm)
    remote = remote_by_cid(instructions)
    for site, cid in CIDS.items():
        others = [s for s in sorted(BANKS) if s != site]
        got = remote[cid]
        assert got is not None
        np.testing.assert_array_equal(got[0], np.concatenate([BANKS[s][0] for s in others]))
        np.testing.assert_array_equal(got[1], np.concatenate([BANKS[s][1] for s in others]))
        own_rows = {r.tobytes() for r in BANKS[site][0]}
        assert not own_rows & {r.tobytes() for r in got[0]}
    for proxy, ins in instructions:
        assert ins.config[wire.REMOTE_SITES] == 2
        assert ins.config[wire.REMOTE_ROWS] == 18 - len(BANKS[fx._cid_to_site[proxy.cid]][1])
    assert len({id(ins) for _, ins in instructions}) == 3  # a fresh FitIns per proxy


def test_subsampling_is_bounded_deterministic_and_from_the_source() -> None:
    big = {s: unit_bank(20, i) for i, s in enumerate(CIDS)}

    def relayed(server_round: int) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
        fx = relay(max_rows_per_site=4, seed=7)
        cm, proxies = manager(list(CIDS.values()))
        run_round(fx, server_round - 1, cm, proxies, {s: fit_res(s, big[s]) for s in big})
        return remote_by_cid(fx.configure_fit(server_round, ndarrays_to_parameters(WEIGHTS), cm))

    first, again, later = relayed(2), relayed(2), relayed(3)
    for cid in CIDS.values():
        f, p = first[cid]  # type: ignore[misc]
        assert f.shape == (8, D) and p.shape == (8,)
        np.testing.assert_array_equal(f, again[cid][0])  # type: ignore[index]
    # A's receivers (B and C) get the same 4 rows of A, all taken from A's bank.
    rows_of_a = {r.tobytes() for r in big["A"][0]}
    from_a_at_b = first[CIDS["B"]][0][:4]  # type: ignore[index]
    from_a_at_c = first[CIDS["C"]][0][:4]  # type: ignore[index]
    np.testing.assert_array_equal(from_a_at_b, from_a_at_c)
    assert {r.tobytes() for r in from_a_at_b} <= rows_of_a
    assert len({r.tobytes() for r in from_a_at_b}) == 4  # without replacement
    assert not np.array_equal(first[CIDS["B"]][0], later[CIDS["B"]][0])  # reseeded per round


def test_total_cap_bounds_the_remote_bank_whatever_the_number_of_sites() -> None:
    sites = {f"s{i:02d}": str(200 + i) for i in range(7)}
    banks = {s: unit_bank(20, i) for i, s in enumerate(sites)}

    def remote(cap: int, server_round: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        fx = relay(max_rows_per_site=8, max_remote_rows=cap, seed=3)
        cm, proxies = manager(list(sites.values()))
        instructions = fx.configure_fit(server_round - 1, ndarrays_to_parameters(WEIGHTS), cm)
        fx.aggregate_fit(server_round - 1, [(proxies[sites[s]], fit_res(s, banks[s])) for s in banks], [])
        instructions = fx.configure_fit(server_round, ndarrays_to_parameters(WEIGHTS), cm)
        report = fx.last_round_report()
        got = remote_by_cid(instructions)
        for proxy, ins in instructions:
            assert ins.config[wire.REMOTE_ROWS] == len(got[proxy.cid][0])  # type: ignore[index]
        assert report is not None
        return {s: got[cid] for s, cid in sites.items()}  # type: ignore[misc]

    uncapped = remote(0)
    assert all(len(r[0]) == 6 * 8 for r in uncapped.values())
    capped = remote(20)  # 6 other sites share 20 rows: 3 or 4 rows each
    all_rows = {r.tobytes() for b in banks.values() for r in b[0]}
    for site, (features, parts) in capped.items():
        assert len(features) == len(parts) == 20
        own = {r.tobytes() for r in banks[site][0]}
        assert {r.tobytes() for r in features} <= all_rows - own
        assert len({r.tobytes() for r in features}) == 20  # without replacement
    # a cap above what the sites hold changes nothing
    for site in sites:
        np.testing.assert_array_equal(remote(1000)[site][0], uncapped[site][0])
    # reproducible, and reseeded per round
    again, later = remote(20), remote(20, server_round=3)
    assert all(np.array_equal(capped[s][0], again[s][0]) for s in sites)
    assert not all(np.array_equal(capped[s][0], later[s][0]) for s in sites)


def test_total_cap_gives_every_receiver_the_same_rows_of_a_source() -> None:
    fx = relay(max_remote_rows=4, seed=1)
    big = {s: unit_bank(10, i) for i, s in enumerate(CIDS)}
    cm, proxies = manager(list(CIDS.values()))
    run_round(fx, 1, cm, proxies, {s: fit_res(s, big[s]) for s in big})
    got = remote_by_cid(fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm))
    # B and C both receive 2 rows of A (4 rows shared by 2 other sites): the same 2 rows.
    rows_of_a = {r.tobytes() for r in big["A"][0]}
    at_b = [r.tobytes() for r in got[CIDS["B"]][0] if r.tobytes() in rows_of_a]  # type: ignore[index]
    at_c = [r.tobytes() for r in got[CIDS["C"]][0] if r.tobytes() in rows_of_a]  # type: ignore[index]
    assert len(at_b) == 2 and at_b == at_c


def test_float16_relay() -> None:
    fx = relay(float16=True)
    cm, _ = round_one(fx)
    instructions = fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm)
    for proxy, ins in instructions:
        assert wire.decode_array(ins.config[wire.REMOTE_FEATURES]).dtype == np.float16
    got = remote_by_cid(instructions)[CIDS["A"]]
    assert got is not None and got[0].dtype == np.float32
    expected = np.concatenate([BANKS["B"][0], BANKS["C"][0]])
    np.testing.assert_allclose(got[0], expected, atol=1e-3)


def _bad_metrics() -> dict[str, dict]:
    good_f, good_p = unit_bank(7, 3)
    enc = wire.encode_array
    nan_f = good_f.copy()
    nan_f[2, 1] = np.nan
    cases = {
        "undecodable": {wire.BANK_FEATURES: b"garbage", wire.BANK_PARTITIONS: enc(good_p)},
        "incomplete": {wire.BANK_FEATURES: enc(good_f)},
        "float64 features": wire.bank_to_metrics(good_f.astype(np.float64), good_p),
        "float partitions": {wire.BANK_FEATURES: enc(good_f),
                             wire.BANK_PARTITIONS: enc(good_p.astype(np.float32))},
        "wrong d": wire.bank_to_metrics(unit_bank(7, 3)[0][:, :6], good_p),
        "1-d features": {wire.BANK_FEATURES: enc(good_f[0]), wire.BANK_PARTITIONS: enc(good_p)},
        "row mismatch": {wire.BANK_FEATURES: enc(good_f), wire.BANK_PARTITIONS: enc(good_p[:5])},
        "partition too large": wire.bank_to_metrics(good_f, np.full(7, S)),
        "negative partition": wire.bank_to_metrics(good_f, np.full(7, -1)),
        "nan": wire.bank_to_metrics(nan_f, good_p),
        "not unit norm": wire.bank_to_metrics(good_f * 1.1, good_p),
        "too many rows": wire.bank_to_metrics(*unit_bank(30, 4)),
        "empty": wire.bank_to_metrics(np.zeros((0, D), np.float32), np.zeros(0)),
    }
    return cases


@pytest.mark.parametrize("kind", list(_bad_metrics()))
def test_each_invalid_bank_is_rejected_and_never_relayed(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    fx = relay(max_rows=20)
    cm, proxies = manager(list(CIDS.values()))
    results = {s: fit_res(s, BANKS[s]) for s in ("A", "B")}
    results["C"] = fit_res("C", extra=_bad_metrics()[kind])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_round(fx, 1, cm, proxies, results)  # the round goes on
    report = fx.last_round_report()
    assert report is not None
    assert [r["site"] for r in report["rejected"]] == ["C"] and report["rejected"][0]["reason"]
    assert report["sites"]["C"]["bank"] == "rejected"
    assert sorted(report["stored"]) == ["A", "B"]
    assert any("site C" in rec.getMessage() for rec in caplog.records)
    remote = remote_by_cid(fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm))
    np.testing.assert_array_equal(remote[CIDS["A"]][0], BANKS["B"][0])  # type: ignore[index]
    np.testing.assert_array_equal(remote[CIDS["B"]][0], BANKS["A"][0])  # type: ignore[index]
    assert remote[CIDS["C"]][1].shape == (11,)  # type: ignore[index]
    assert fx.rejected_banks == 1


def test_invalid_site_names_are_rejected() -> None:
    fx = relay()
    cm, proxies = manager(list(CIDS.values()))
    results = {
        "A": fit_res("A", BANKS["A"]),
        "B": fit_res(None, BANKS["B"], extra={wire.SITE: 3}),  # not a str
        "C": fit_res("A", BANKS["C"]),  # a second client claims to be A
    }
    instructions = fx.configure_fit(1, ndarrays_to_parameters(WEIGHTS), cm)
    assert instructions
    fx.aggregate_fit(1, [(proxies[CIDS[s]], r) for s, r in results.items()], [])
    report = fx.last_round_report()
    assert report is not None
    reasons = {r["cid"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {CIDS["A"], CIDS["B"], CIDS["C"]}
    assert "site" in reasons[CIDS["B"]] and "2 clients" in reasons[CIDS["A"]]
    assert report["stored"] == {}


def test_rejected_bank_keeps_the_previous_one() -> None:
    fx = relay()
    cm, proxies = round_one(fx)
    bad = fit_res("C", extra=wire.bank_to_metrics(BANKS["C"][0] * 2, BANKS["C"][1]))  # norms
    run_round(fx, 2, cm, proxies, {"A": fit_res("A", BANKS["A"]), "C": bad})
    remote = remote_by_cid(fx.configure_fit(3, ndarrays_to_parameters(WEIGHTS), cm))
    a = remote[CIDS["A"]]
    assert a is not None
    np.testing.assert_array_equal(a[0], np.concatenate([BANKS["B"][0], BANKS["C"][0]]))
    report = fx.last_round_report()
    assert report is not None and report["stored"]["C"]["round"] == 1


def test_stale_banks_are_dropped() -> None:
    fx = relay(stale_after_rounds=2)
    cm, proxies = round_one(fx)
    ab = {s: fit_res(s, BANKS[s]) for s in ("A", "B")}
    received = {}
    for server_round in (2, 3, 4):
        instructions = run_round(fx, server_round, cm, proxies, ab)
        received[server_round] = remote_by_cid(instructions)[CIDS["A"]][1].shape[0]  # type: ignore[index]
        report = fx.last_round_report()
        assert report is not None
        assert report["dropped_stale"] == (["C"] if server_round == 4 else [])
    assert received == {2: 6 + 7, 3: 6 + 7, 4: 6}
    assert sorted(report["stored"]) == ["A", "B"]


def test_relay_off_is_a_pass_through() -> None:
    fx = relay(enabled=False)
    cm, proxies = round_one(fx)
    report = fx.last_round_report()
    assert report is not None
    assert report["stored"] == {} and report["sites"]["A"]["bank"] == "ignored"
    instructions = fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm)
    for _, ins in instructions:
        assert not set(ins.config) & set(wire.REMOTE_KEYS)
    assert fx.state_dict()["features"].shape == (0, D)


def test_fedprox_mu_reaches_the_sites_beside_the_remote_bank() -> None:
    cfg = load_config(["strategy.name=fedprox", "strategy.options={proximal_mu: 0.5}", f"model.proj_dim={D}",
                       f"data.num_partitions={S}", "federation.min_fit_sites=1", "federation.min_available_sites=1"])
    fx = relay(build_strategy(cfg, ndarrays_to_parameters(WEIGHTS), on_fit_config_fn=lambda r: {"round": r}))
    cm, proxies = round_one(fx)
    instructions = fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm)
    for _, ins in instructions:
        assert ins.config["proximal_mu"] == 0.5 and ins.config["round"] == 2
        assert ins.config[wire.REMOTE_ROWS] > 0


def test_updates_that_cannot_be_averaged_are_left_out_and_named() -> None:
    fx = relay()
    cm, proxies = manager(list(CIDS.values()))
    good = [np.full((3, 2), 2.0, np.float32), np.full(5, 2.0, np.float32)]
    broken = {
        "B": fit_res("B", BANKS["B"], weights=[np.zeros((2, 3), np.float32), np.zeros(5, np.float32)]),
        "C": fit_res("C", BANKS["C"], weights=[np.full((3, 2), np.nan, np.float32), np.zeros(5, np.float32)]),
    }
    instructions = fx.configure_fit(1, ndarrays_to_parameters(WEIGHTS), cm)
    assert len(instructions) == 3
    params, _ = fx.aggregate_fit(1, [(proxies[CIDS["A"]], fit_res("A", BANKS["A"], weights=good)),
                                     *((proxies[CIDS[s]], res) for s, res in broken.items())], [])
    assert params is not None
    for array, expected in zip(parameters_to_ndarrays(params), good):  # A's weights alone
        np.testing.assert_array_equal(array, expected)
    report = fx.last_round_report()
    assert report["rejected_updates"] == [
        "[site=B] update rejected: weight array 0 has shape (2, 3), expected (3, 2)",
        "[site=C] update rejected: weight array 0 holds NaN or Inf",
    ]
    assert report["failures"] == 2 and sorted(report["stored"]) == ["A"]  # no bank from a refused update
    assert report["sites"]["B"]["returned"] and report["sites"]["B"]["bank"] == "ignored"


def test_update_problem_names_each_defect() -> None:
    ref = [(3, 2), (5,)]
    ok = [np.zeros((3, 2), np.float32), np.zeros(5, np.int64)]
    assert wire.update_problem(ok, 4, ref) is None
    assert wire.update_problem(ok, 0, ref) == "num_examples is 0, not an int of at least 1"
    assert wire.update_problem(ok, float("nan"), ref) == "num_examples is nan, not an int of at least 1"
    assert wire.update_problem(ok[:1], 4, ref) == "1 weight arrays, expected 2"
    assert wire.update_problem([ok[0], np.full(5, np.inf)], 4, ref) == "weight array 1 holds NaN or Inf"


def test_site_mapping_follows_a_restarted_supernode() -> None:
    fx = relay()
    cm, proxies = round_one(fx)
    # A's SuperNode restarts with node id 999; a client with no site name is named by cid.
    cm.unregister(proxies[CIDS["A"]])
    new = StubProxy("999")
    cm.register(new)
    fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm)
    fx.aggregate_fit(2, [(new, fit_res("A", BANKS["A"])),
                         (proxies[CIDS["B"]], fit_res(None, unit_bank(3, 9)))], [])
    remote = remote_by_cid(fx.configure_fit(3, ndarrays_to_parameters(WEIGHTS), cm))
    assert set(remote) == {"999", CIDS["B"], CIDS["C"]}
    a = remote["999"]
    assert a is not None and a[1].shape == (6 + 7 + 3,)  # B, C and "102" (B's cid name)
    assert CIDS["A"] not in fx._cid_to_site


def test_unknown_node_gets_no_bank() -> None:
    fx = relay()
    cm, _ = round_one(fx)
    cm.register(StubProxy("555"))
    remote = remote_by_cid(fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm))
    assert remote["555"] is None and remote[CIDS["A"]] is not None


class NamedProxy(StubProxy):
    """A proxy whose client answers ``get_properties`` with its site name, as FCLClient does."""

    def __init__(self, cid: str, site: str) -> None:
        super().__init__(cid)
        self.site = site
        self.asked_with: dict | None = None

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        from flwr.common import GetPropertiesRes

        self.asked_with = dict(ins.config)
        return GetPropertiesRes(Status(Code.OK, ""), {wire.SITE: self.site})


def test_a_resumed_relay_identifies_new_node_ids_and_relays_as_before() -> None:
    fx = relay()
    cm, _ = round_one(fx)
    before = remote_by_cid(fx.configure_fit(2, ndarrays_to_parameters(WEIGHTS), cm))
    resumed = relay()
    resumed.load_state_dict(fx.state_dict())
    resumed._cid_to_site.clear()  # a restarted federation: every node has a new id
    new_cm = SimpleClientManager()
    named = {site: NamedProxy(f"9{cid}", site) for site, cid in CIDS.items()}
    for proxy in named.values():
        new_cm.register(proxy)
    after = remote_by_cid(resumed.configure_fit(2, ndarrays_to_parameters(WEIGHTS), new_cm))
    for site, cid in CIDS.items():
        np.testing.assert_array_equal(after[f"9{cid}"][0], before[cid][0])
        np.testing.assert_array_equal(after[f"9{cid}"][1], before[cid][1])
        assert named[site].asked_with is not None  # asked with the round's fit config


class _Spy:
    """fit_metrics_aggregation_fn that records the metric keys and value types it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, type]] = []

    def __call__(self, metrics: list[tuple[int, dict]]) -> dict:
        self.seen.extend({k: type(v) for k, v in m.items()} for _, m in metrics)
        return {"n": len(metrics)}


def _aggregation_results(server_round: int) -> list[tuple[ClientProxy, FitRes]]:
    out = []
    for i, site in enumerate(BANKS):
        rng = np.random.default_rng(100 * server_round + i)
        weights = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
        out.append((StubProxy(CIDS[site]), fit_res(site, BANKS[site], weights, 10 + 5 * i)))
    return out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_wrapped_aggregation_is_bit_identical(name: str) -> None:
    overrides = [f"strategy.name={name}"]
    if name == "fedprox":
        overrides.append("strategy.options.proximal_mu=0.1")
    if name == "fedavgm":
        overrides.append("strategy.options.server_momentum=0.9")
    cfg = load_config(overrides + ["sites=3", f"model.proj_dim={D}", f"data.num_partitions={S}"])
    init = ndarrays_to_parameters([np.ones((3, 2), np.float32), np.ones(5, np.float32)])
    spy_bare, spy_wrapped = _Spy(), _Spy()
    bare = build_strategy(cfg, init, fit_metrics_aggregation_fn=spy_bare)
    fx = FeatureExchange.from_config(
        build_strategy(cfg, init, fit_metrics_aggregation_fn=spy_wrapped), cfg
    )
    assert fx.initialize_parameters(SimpleClientManager()) == bare.initialize_parameters(
        SimpleClientManager()
    )
    for server_round in (1, 2):
        p_bare, m_bare = bare.aggregate_fit(server_round, _aggregation_results(server_round), [])
        p_fx, m_fx = fx.aggregate_fit(server_round, _aggregation_results(server_round), [])
        assert isinstance(p_bare, Parameters) and isinstance(p_fx, Parameters)
        assert p_fx.tensors == p_bare.tensors and p_fx.tensor_type == p_bare.tensor_type
        assert m_fx == m_bare
    assert all(wire.BANK_FEATURES in keys for keys in spy_bare.seen)
    assert spy_wrapped.seen and all(
        not set(keys) & set(wire.BANK_KEYS) and bytes not in keys.values()
        and keys[wire.SITE] is str
        for keys in spy_wrapped.seen
    )


def test_state_dict_round_trip_gives_identical_relays() -> None:
    def relays(fx: FeatureExchange, server_round: int, cm: ClientManager) -> dict:
        instructions = fx.configure_fit(server_round, ndarrays_to_parameters(WEIGHTS), cm)
        return {p.cid: ins.config for p, ins in instructions}

    options = dict(max_rows_per_site=3, float16=True, stale_after_rounds=2, seed=5)
    original = relay(**options)
    cm, proxies = round_one(original)
    run_round(original, 2, cm, proxies, {s: fit_res(s, unit_bank(6, 20 + i))
                                         for i, s in enumerate(("A", "B"))})
    buffer = io.BytesIO()
    np.savez(buffer, **original.state_dict())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as saved:
        state = {k: saved[k] for k in saved.files}
    resumed = relay(**options)
    resumed.load_state_dict(state)
    for server_round in (3, 4, 5):
        assert relays(resumed, server_round, cm) == relays(original, server_round, cm)
        results = [(proxies[CIDS["A"]], fit_res("A", unit_bank(9, server_round)))]
        resumed.aggregate_fit(server_round, results, [])
        original.aggregate_fit(server_round, results, [])
    for key, value in original.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value)


def test_load_state_dict_rejects_inconsistent_state() -> None:
    fx = relay()
    round_one(fx)
    state = fx.state_dict()
    with pytest.raises(ValueError, match="missing"):
        relay().load_state_dict({k: v for k, v in state.items() if k != "features"})
    with pytest.raises(ValueError, match="inconsistent"):
        relay(proj_dim=D + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="inconsistent"):
        relay().load_state_dict({**state, "bank_rows": state["bank_rows"] + 1})


def test_byte_accounting_adds_up() -> None:
    fx = relay(float16=True)
    cm, proxies = round_one(fx)
    results = {s: fit_res(s, BANKS[s]) for s in ("A", "B")}
    instructions = run_round(fx, 2, cm, proxies, results)
    report = fx.last_round_report()
    assert report is not None
    json.dumps(report)  # serialisable as is
    assert report["round"] == 2 and report["failures"] == 0
    weights_bytes = sum(len(t) for t in ndarrays_to_parameters(WEIGHTS).tensors)
    for proxy, ins in instructions:
        entry = report["sites"][fx._cid_to_site[proxy.cid]]
        assert entry["cid"] == proxy.cid
        assert entry["down_weights_bytes"] == weights_bytes
        assert entry["down_bank_bytes"] == len(ins.config[wire.REMOTE_FEATURES]) + len(
            ins.config[wire.REMOTE_PARTITIONS]
        )
        assert entry["remote_rows"] == ins.config[wire.REMOTE_ROWS]
        assert entry["remote_sites"] == 2
    for site, res in results.items():
        entry = report["sites"][site]
        assert entry["returned"] and entry["bank"] == "stored"
        assert entry["up_weights_bytes"] == weights_bytes
        assert entry["up_bank_bytes"] == sum(len(res.metrics[k]) for k in wire.BANK_KEYS)
        assert entry["bank_rows"] == len(BANKS[site][1])
    c = report["sites"]["C"]
    assert not c["returned"] and c["bank"] is None and c["up_weights_bytes"] == 0
    for key in ("down_weights_bytes", "down_bank_bytes", "up_weights_bytes", "up_bank_bytes",
                "remote_rows"):
        assert report["totals"][key] == sum(e[key] for e in report["sites"].values())
    assert report["totals"]["remote_rows"] == (6 + 7) + (5 + 7) + (5 + 6)
    assert report["stored"] == {"A": {"rows": 5, "round": 2}, "B": {"rows": 6, "round": 2},
                                "C": {"rows": 7, "round": 1}}


def test_failures_are_counted() -> None:
    fx = relay()
    cm, proxies = manager(list(CIDS.values()))
    fx.configure_fit(1, ndarrays_to_parameters(WEIGHTS), cm)
    failed = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "no"), Parameters([], ""), 0, {})
    fx.aggregate_fit(1, [(proxies[CIDS["A"]], fit_res("A", BANKS["A"]))],
                     [RuntimeError("site B died"), (proxies[CIDS["C"]], failed)])
    report = fx.last_round_report()
    assert report is not None and report["failures"] == 2 and fx.fit_failures == 2
    assert not report["sites"][f"node:{CIDS['C']}"]["returned"]  # C never named itself


def test_a_round_without_clients_gets_an_empty_report() -> None:
    class NoClients(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            return []

    fx = relay(NoClients())
    assert fx.last_round_report() is None
    assert fx.configure_fit(1, ndarrays_to_parameters(WEIGHTS), SimpleClientManager()) == []
    report = fx.last_round_report()
    assert report is not None and report["round"] == 1 and report["sites"] == {}


def test_from_config_reads_relay_model_data_and_seed() -> None:
    cfg = load_config(["relay.max_rows_per_site=7", "seed=3", "model.proj_dim=16"])
    fx = FeatureExchange.from_config(FedAvg(), cfg)
    assert (fx.enabled, fx.proj_dim, fx.num_partitions, fx.max_rows_per_site, fx.seed) == (
        True, 16, cfg.data.num_partitions, 7, 3
    )
    assert fx.float16 == cfg.relay.float16 and fx.max_rows == cfg.relay.max_rows
    assert fx.max_remote_rows == cfg.relay.max_remote_rows
    # banks travel only where the method uses them, whatever relay.enabled says
    for other in (["method=simclr"], ["method=rotation"], ["pretrain.use_feature_exchange=false"], ["relay.enabled=false"]):
        assert not FeatureExchange.from_config(FedAvg(), load_config(other)).enabled, other


@pytest.mark.parametrize(
    "bad", [{"proj_dim": 0}, {"max_rows_per_site": -1}, {"stale_after_rounds": -1},
            {"max_rows": 0}, {"norm_tolerance": -0.1}, {"num_partitions": 0}, {"max_remote_rows": -1}]
)
def test_constructor_rejects_bad_options(bad: dict) -> None:
    with pytest.raises(ValueError):
        relay(**bad)


def test_sites_without_held_out_data_do_not_break_evaluation() -> None:
    from flwr.common import EvaluateRes

    fx = relay()
    empty = EvaluateRes(Status(Code.OK, ""), 0.0, 0, {"site": "A"})
    assert fx.aggregate_evaluate(1, [(StubProxy("1"), empty)], []) == (None, {})
    real = EvaluateRes(Status(Code.OK, ""), 2.0, 4, {"site": "B"})
    loss, _ = fx.aggregate_evaluate(1, [(StubProxy("1"), empty), (StubProxy("2"), real)], [])
    assert loss == 2.0
    # a result with a non-finite loss or a count that is not an int is left out, not averaged
    diverged = EvaluateRes(Status(Code.OK, ""), float("nan"), 4, {"site": "C"})
    odd = EvaluateRes(Status(Code.OK, ""), 1.0, [4], {"site": "D"})  # type: ignore[arg-type]
    loss, _ = fx.aggregate_evaluate(1, [(StubProxy("2"), real), (StubProxy("3"), diverged), (StubProxy("4"), odd)], [])
    assert loss == 2.0
