"""Site resolution, per-round site state, and the NumPyClients called directly on NIfTI data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fcl_flower.client_app import FCLClient, SiteFailure, StageClient
from fcl_flower.config import config_to_yaml
from fcl_flower.data.datasets import VolumeRecord
from fcl_flower.server_app import describe_failure
from fcl_flower.site import RoundStateStore, resolve_site, split_holdout
from fcl_flower.wire import BANK_KEYS, bank_from_metrics, remote_bank_to_config

TINY = ["model.channels=[8,16,32]", "model.proj_hidden=32", "model.proj_dim=16", "pretrain.queue_size=32",
        "pretrain.bank_sample_size=32", "data.holdout_fraction=0.5"]


def test_round_state_store_starts_each_round_from_the_previous_commit(tmp_path: Path):
    store = RoundStateStore(tmp_path / "state", keep=2)
    work = store.checkout(1)
    assert list(work.iterdir()) == []
    (work / "queue.txt").write_text("after round 1")
    store.commit(1, work)
    work = store.checkout(2)
    assert (work / "queue.txt").read_text() == "after round 1"
    (work / "queue.txt").write_text("after round 2")
    store.commit(2, work)
    # Round 2 run again (server resumed): it starts from round 1's state, not its own.
    again = store.checkout(2)
    assert (again / "queue.txt").read_text() == "after round 1"
    store.commit(2, again)
    work = store.checkout(3)
    store.commit(3, work)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["round-00002", "round-00003"]
    # A site that missed rounds continues from its last commit.
    assert store.latest_before(9).name == "round-00003"


def test_split_holdout_is_by_patient_deterministic_and_keeps_training_data():
    records = [VolumeRecord("s", f"p{i}", Path(f"p{i}_{f}.nii.gz"), None, f) for i in range(5) for f in (1, 9)]
    train, held = split_holdout(records, 0.4, seed=0, site="s")
    assert len(held) == 4 and len(train) == 6
    assert {r.patient for r in train}.isdisjoint({r.patient for r in held})
    assert split_holdout(records, 0.4, seed=0, site="s") == (train, held)
    train1, held1 = split_holdout(records[:2], 0.9, seed=0, site="s")
    assert len({r.patient for r in train1}) == 1


def test_resolve_site_for_simulation_and_deployment(tiny_synthetic: Path, small_cfg, tmp_path: Path):
    cfg = small_cfg("sites=2", f"data.root={tiny_synthetic}", f"output_dir={tmp_path / 'run7'}")
    site = resolve_site(cfg, {"partition-id": 1, "num-partitions": 2})
    assert site.name == "site_01" and site.state_dir == tmp_path / "run7" / "sites" / "site_01"
    assert site.records and all(r.site == "site_01" for r in site.records)
    deployed = resolve_site(cfg, {"data-dir": str(tiny_synthetic / "site_00"), "site-name": "hospital-a",
                                  "state-dir": str(tmp_path / "state")})
    assert deployed.name == "hospital-a" and deployed.state_dir == tmp_path / "state" / "run7"
    with pytest.raises(ValueError, match="partition-id"):
        resolve_site(cfg, {})


def test_pretrain_client_fit_and_evaluate_on_generated_nifti(tiny_synthetic: Path, small_cfg, tmp_path: Path):
    from fcl_flower.pretrain import initial_weights

    cfg = small_cfg("sites=2", f"data.root={tiny_synthetic}", f"output_dir={tmp_path / 'run'}", *TINY)
    client = StageClient({"partition-id": 0})
    message = {"config": config_to_yaml(cfg), "stage": "pretrain", "round": 1}
    assert client.get_properties(message) == {"site": "site_00"}
    start = initial_weights(cfg)
    weights, n, metrics = client.fit(start, message)
    assert len(weights) == len(start) and n > 0 and metrics["site"] == "site_00"
    assert any(not np.array_equal(a, b) for a, b in zip(weights, start))
    features, parts = bank_from_metrics(metrics)
    assert features.shape[1] == 16 and len(parts) == len(features) > 0
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-4)
    assert "proximal_term" not in metrics
    # Round 2 with a remote bank from "another site", and FedProx's mu as its strategy sends it.
    remote = remote_bank_to_config(features[::-1].copy(), parts[::-1].copy(), n_sites=1)
    weights2, _, metrics2 = client.fit(weights, {**message, "round": 2, **remote, "proximal_mu": 0.1})
    assert metrics2["remote_rows"] == len(features) and metrics2["proximal_term"] > 0
    loss, n_eval, eval_metrics = client.evaluate(weights2, {**message, "round": 2})
    assert n_eval > 0 and math.isfinite(loss) and eval_metrics["site"] == "site_00"
    assert sorted(p.name for p in (tmp_path / "run" / "sites" / "site_00" / "pretrain").iterdir()) == [
        "round-00001", "round-00002"]


@pytest.mark.parametrize("setting", ["relay.enabled=false", "method=simclr", "pretrain.use_feature_exchange=false"])
def test_without_a_feature_exchange_no_feature_leaves_the_site(tiny_synthetic: Path, small_cfg, tmp_path: Path,
                                                                setting: str):
    from fcl_flower.pretrain import initial_weights

    cfg = small_cfg("sites=2", f"data.root={tiny_synthetic}", f"output_dir={tmp_path / 'run'}", setting, *TINY)
    client = StageClient({"partition-id": 0})
    message = {"config": config_to_yaml(cfg), "stage": "pretrain", "round": 1}
    weights, _, metrics = client.fit(initial_weights(cfg), message)
    assert metrics["site"] == "site_00" and not set(BANK_KEYS) & set(metrics)
    # A remote bank that arrives anyway (a misconfigured coordinator) is not used.
    remote = remote_bank_to_config(np.eye(16, dtype=np.float32), np.zeros(16, dtype=np.int64), n_sites=1)
    _, _, metrics2 = client.fit(weights, {**message, "round": 2, **remote})
    assert metrics2["remote_rows"] == 0 and not set(BANK_KEYS) & set(metrics2)


def test_a_site_error_is_reraised_naming_the_site(small_cfg, tmp_path: Path):
    from fcl_flower.pretrain import initial_weights

    cfg = small_cfg(f"output_dir={tmp_path / 'run'}", *TINY)
    client = FCLClient({"data-dir": str(tmp_path / "no-such-folder"), "site-name": "hospital-b"})
    with pytest.raises(SiteFailure) as err:
        client.fit(initial_weights(cfg), {"config": config_to_yaml(cfg), "stage": "pretrain", "round": 1})
    assert str(err.value).startswith("[site=hospital-b] DataError:") and "no-such-folder" in str(err.value)
    # The server finds the site's name in Flower's wrapping of the client's exception.
    wrapped = ValueError(f"Message contains an Error (reason: <'... Message: {err.value}'>)")
    assert describe_failure(wrapped)["site"] == "hospital-b"
    assert "DataError" in describe_failure(wrapped)["reason"]


def test_a_failure_without_a_node_is_named_after_the_site_that_returned_nothing(small_cfg, tmp_path: Path):
    from flwr.server.strategy import FedAvg

    from fcl_flower.server_app import FCLServer
    from strategies.feature_exchange import FeatureExchange

    cfg = small_cfg(f"output_dir={tmp_path / 'run'}", "sites=3")
    server = FCLServer(cfg, FeatureExchange.from_config(FedAvg(), cfg))
    server.relay.last_round_report = lambda: {"sites": {
        "site_00": {"returned": True}, "site_01": {"returned": False}, "site_02": {"returned": False}},
        "rejected_updates": ["[site=site_00] update rejected: weight array 0 holds NaN or Inf"]}
    killed = ValueError("Message contains an Error (reason: node went away)")  # what Flower reports
    named = ValueError("... Message: [site=site_02] DataError: /x: truncated'>")
    record = server._round_record(1, "pretrain", [], [killed, named], None, 1.0)
    assert sorted(f["site"] for f in record["failures"]) == ["site_00", "site_01", "site_02"]
    assert {"site": "site_00", "reason": "update rejected: weight array 0 holds NaN or Inf"} in record["failures"]


def test_resuming_with_another_model_is_refused_naming_the_keys(small_cfg, tmp_path: Path):
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    from fcl_flower.config import ConfigError
    from fcl_flower.pretrain import initial_weights
    from fcl_flower.server_app import FCLServer
    from strategies.feature_exchange import FeatureExchange

    def server(*overrides: str) -> FCLServer:
        cfg = small_cfg(f"output_dir={tmp_path / 'run'}", *TINY, *overrides)
        return FCLServer(cfg, FeatureExchange.from_config(FedAvg(), cfg))

    first = server()
    first.parameters = ndarrays_to_parameters(initial_weights(first.cfg))
    first._save(2, "pretrain")
    assert server("resume=true", "rounds=5", "pretrain.lr=0.01")._restore() == 2  # a changed setting only warns
    with pytest.raises(ConfigError, match=r"checkpoint holds another model.*model\.channels"):
        server("resume=true", "model.channels=[8,16,32,64]")._restore()
    with pytest.raises(ConfigError, match=r"model\.proj_dim"):
        server("resume=true", "model.proj_dim=8")._restore()


def test_metric_averaging_skips_a_sites_malformed_values():
    from fcl_flower.server_app import weighted_metrics

    merged = weighted_metrics([(1, {"loss": 1.0, "site": "a", "seconds": 2.0}),
                               (3, {"loss": "oops", "site": "b", "seconds": 4.0}),
                               (1, {"loss": float("nan"), "site": "c", "seconds": 6.0, "bank": b"\x00"})])
    assert merged == {"loss": 1.0, "seconds": (2.0 + 12.0 + 6.0) / 5}
