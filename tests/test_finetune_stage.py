"""The fine-tuning stage through Flower's types, without Flower processes.

``FinetuneClient`` is called directly on generated NIfTI data; ``run_finetune_stage`` is
driven with in-process client proxies that hand each ``FitIns``/``EvaluateIns`` to the
real client, so the server logic (cells, FedAvg, results files, resume) is exercised
end to end in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Status
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fcl_flower.client_app import SiteFailure, StageClient
from fcl_flower.config import config_to_yaml
from fcl_flower.environment import compute_environment, environment_id
from fcl_flower.finetune import initial_unet_weights, metric_keys
from fcl_flower.finetune_stage import (
    RESULTS_CSV, RESULTS_JSON, parse_local_results, run_finetune_stage, screen_results,
)
from fcl_flower.models import build_encoder, save_encoder

torch.set_num_threads(1)
MODEL = ["model.channels=[8,16,32]", "model.proj_hidden=16", "model.proj_dim=8"]
FT = [
    "finetune.folds=2", "finetune.n_labeled=[1]", "finetune.local_steps=2", "finetune.fed_local_steps=1",
    "finetune.rounds=2", "finetune.batch_size=4", "finetune.overlay_slices=2",
]


@pytest.fixture
def cfg_factory(small_cfg, tiny_synthetic, tmp_path):
    def make(*overrides: str):
        return small_cfg(
            f"data.root={tiny_synthetic}", "sites=2", "stages=[finetune]", f"output_dir={tmp_path / 'run'}",
            *MODEL, *FT, *overrides,
        )

    return make


def _message(cfg, **extra: Any) -> dict[str, Any]:
    return {"config": config_to_yaml(cfg), "stage": "finetune", "round": 0, **extra}


def test_finetune_client_fit_and_evaluate(cfg_factory, tmp_path: Path) -> None:
    cfg = cfg_factory()
    client = StageClient({"partition-id": 0})
    init = initial_unet_weights(cfg, None)
    weights, n, metrics = client.fit(init, _message(cfg, task="federated", n_labeled=1, fold=0, round=1))
    assert len(weights) == len(init) and n > 0 and metrics["site"] == "site_00"
    assert np.isfinite(metrics["loss"])
    assert any(not np.array_equal(a, b) for a, b in zip(weights, init))  # it trained
    loss, volumes, metrics = client.evaluate(weights, _message(cfg, task="federated", n_labeled=1, fold=0))
    assert volumes == 2  # one held-out patient: ED + ES
    assert set(metric_keys(4)) <= set(metrics) and 0.0 <= metrics["dice"] <= 1.0
    assert loss == pytest.approx(1.0 - metrics["dice"])
    overlays = tmp_path / "run" / "sites" / "site_00" / "finetune" / "overlays"
    assert (overlays / "federated_n1.png").is_file() and (overlays / "federated_n1.npz").is_file()

    weights, n, metrics = client.fit(init, _message(cfg, task="local", n_labeled="1"))
    assert weights == [] and metrics["site"] == "site_00"
    cell = json.loads(str(metrics["results"]))["1"]
    assert [f["fold"] for f in cell["folds"]] == [0, 1]
    assert all(len(f["labeled"]) == 1 and not set(f["labeled"]) & set(f["test"]) for f in cell["folds"])
    assert np.isfinite(cell["dice"]) and np.isfinite(cell["hd95"])
    assert (overlays / "local_n1.png").is_file()


def test_federated_rounds_count_the_decoder_warm_up_across_rounds(cfg_factory) -> None:
    """frozen_encoder_steps = 2 with 2 local steps per round: round 1 keeps the encoder, round 2 trains it."""
    cfg = cfg_factory("finetune.frozen_encoder_steps=2", "finetune.fed_local_steps=2")
    client = StageClient({"partition-id": 0})
    init = initial_unet_weights(cfg, None)
    encoder_arrays = len(build_encoder(cfg).state_dict())  # the U-Net's state_dict starts with the encoder

    def encoder_moved(round_: int) -> bool:
        weights, _, _ = client.fit(init, _message(cfg, task="federated", n_labeled=1, fold=0, round=round_))
        return any(not np.array_equal(a, b) for a, b in zip(weights[:encoder_arrays], init[:encoder_arrays]))

    assert not encoder_moved(1)
    assert encoder_moved(2)


def test_finetune_client_failure_names_the_site(cfg_factory) -> None:
    cfg = cfg_factory()
    client = StageClient({"partition-id": 1})
    with pytest.raises(SiteFailure, match=r"\[site=site_01\] ValueError: unknown fine-tuning task"):
        client.fit(initial_unet_weights(cfg, None), _message(cfg, task="nope"))
    with pytest.raises(SiteFailure, match=r"\[site=site_01\]"):
        client.fit(initial_unet_weights(cfg, None)[:-1], _message(cfg, task="federated", n_labeled=1, fold=0, round=1))


# ---------------------------------------------------------------- the server side, in process


class InProcessProxy(ClientProxy):
    """A client proxy that runs the real ``StageClient`` of one simulated site in this process."""

    def __init__(self, partition: int, calls: list[tuple[str, str]], fail: bool = False) -> None:
        super().__init__(cid=str(1000 + partition))
        self.client = StageClient({"partition-id": partition}).to_client()
        self.calls = calls
        self.fail = fail

    def fit(self, ins: FitIns, timeout, group_id) -> FitRes:
        self.calls.append(("fit", str(ins.config["task"])))
        if self.fail:
            raise RuntimeError(f"[site=site_0{int(self.cid) - 1000}] RuntimeError: disk on fire")
        return self.client.fit(ins)

    def evaluate(self, ins: EvaluateIns, timeout, group_id) -> EvaluateRes:
        self.calls.append(("evaluate", str(ins.config["task"])))
        return self.client.evaluate(ins)

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError


class StubServer:
    """What ``run_finetune_stage`` uses of ``FCLServer``."""

    def __init__(self, cfg, fail_site: int | None = None) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.max_workers = None
        self.calls: list[tuple[str, str]] = []
        self.lines: list[str] = []
        self.recorder = type("Recorder", (), {"echo": staticmethod(self.lines.append)})()
        self.environment = compute_environment()
        self._manager = SimpleClientManager()
        for p in range(cfg.sites):
            self._manager.register(InProcessProxy(p, self.calls, fail=p == fail_site))

    @property
    def encoder_path(self) -> Path:
        return self.output_dir / "encoder.pt"

    def client_manager(self) -> SimpleClientManager:
        return self._manager


def test_stage_cells_results_files_and_resume(cfg_factory) -> None:
    cfg = cfg_factory()
    server = StubServer(cfg)
    assert run_finetune_stage(server, None) == 0
    results = json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())
    assert sorted(results["cells"]) == ["federated/1", "local/1"]
    for cell in results["cells"].values():
        assert cell["complete"] and sorted(cell["sites"]) == ["site_00", "site_01"]
        assert np.isfinite(cell["dice_mean"]) and np.isfinite(cell["dice_std"])
        assert cell["dice_mean"] == pytest.approx(np.mean([s["dice"] for s in cell["sites"].values()]))
    # each cell names where it was computed: the server and every site, here all this process
    here = environment_id(compute_environment())
    for cell in results["cells"].values():
        assert cell["environment"]["server"] == here and cell["environment"]["sites"] == {"site_00": here, "site_01": here}
        assert cell["environment"]["described"] == {here: compute_environment()}
    csv_text = (server.output_dir / "finetune" / RESULTS_CSV).read_text().splitlines()
    assert csv_text[0].startswith("method,finetune,n_labeled,site,dice,dice_rv,dice_myo,dice_lv,hd95")
    assert len(csv_text) == 1 + 2 * (2 + 2)  # 2 cells x (2 sites + mean + std)
    assert any(line.startswith("[fcl] finetune local N=1") for line in server.lines)
    assert any(line.startswith("[fcl] finetune federated N=1 fold 1 round 2/2") for line in server.lines)
    # 1 local message per site; per fold: 2 rounds x 2 sites fits + 2 evaluations
    assert server.calls.count(("fit", "local")) == 2
    assert server.calls.count(("fit", "federated")) == 2 * 2 * 2
    assert server.calls.count(("evaluate", "federated")) == 2 * 2
    rounds = (server.output_dir / "finetune" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 2 * 2

    # resume: finished cells are not recomputed
    idle = StubServer(cfg_factory("resume=true"))
    assert run_finetune_stage(idle, None) == 0
    assert idle.calls == []
    assert any("2 cells already in" in line for line in idle.lines)
    assert json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())["cells"] == results["cells"]
    # cells carry the config key they were computed under; a resumed run stamps it on cells stored without one
    path = server.output_dir / "finetune" / RESULTS_JSON
    assert {c["config_key"] for c in results["cells"].values()} == {results["config_key"]}
    legacy = json.loads(path.read_text())
    for c in legacy["cells"].values():
        del c["config_key"]
    path.write_text(json.dumps(legacy))
    stamped = StubServer(cfg_factory("resume=true"))
    assert run_finetune_stage(stamped, None) == 0 and stamped.calls == []
    assert json.loads(path.read_text())["cells"] == results["cells"]
    # without resume everything is computed again
    fresh = StubServer(cfg_factory("finetune.tasks=[local]"))
    run_finetune_stage(fresh, None)
    assert fresh.calls == [("fit", "local"), ("fit", "local")]
    assert sorted(json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())["cells"]) == ["local/1"]
    # resume with another task asked for: only its cells are computed
    more = StubServer(cfg_factory("resume=true"))
    run_finetune_stage(more, None)
    assert ("fit", "local") not in more.calls and ("fit", "federated") in more.calls
    # a changed setting changes the fingerprint: the cell is computed again
    changed = StubServer(cfg_factory("finetune.tasks=[local]", "finetune.local_steps=3", "resume=true"))
    run_finetune_stage(changed, None)
    assert changed.calls == [("fit", "local"), ("fit", "local")]
    # the kept federated cell still names the config it came from, not the file's current one
    stored = json.loads(path.read_text())
    assert stored["cells"]["local/1"]["config_key"] == stored["config_key"] != stored["cells"]["federated/1"]["config_key"]


def test_stage_is_reproducible_and_uses_the_pretrained_encoder(cfg_factory, tmp_path: Path) -> None:
    encoder = build_encoder(cfg_factory())
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(3.0)
    save_encoder(encoder, tmp_path / "enc.pt")
    out = []
    for name in ("a", "b"):
        cfg = cfg_factory("finetune.tasks=[federated]", f"finetune.encoder={tmp_path / 'enc.pt'}",
                          f"output_dir={tmp_path / name}", "finetune.run_folds=1")
        server = StubServer(cfg)
        run_finetune_stage(server, None)
        out.append(json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text()))
    assert out[0]["cells"]["federated/1"]["sites"] == out[1]["cells"]["federated/1"]["sites"]
    assert "encoder:" in out[0]["init"] or out[0]["init"] == "auto"
    random_cfg = cfg_factory("finetune.tasks=[federated]", f"output_dir={tmp_path / 'r'}", "finetune.run_folds=1")
    server = StubServer(random_cfg)
    run_finetune_stage(server, None)
    rnd = json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())
    assert rnd["fingerprint"] != out[0]["fingerprint"]


def test_stage_reports_a_failing_site_and_leaves_the_cell_incomplete(cfg_factory) -> None:
    cfg = cfg_factory("finetune.tasks=[local]")
    server = StubServer(cfg, fail_site=1)
    assert run_finetune_stage(server, None) == 1
    cell = json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())["cells"]["local/1"]
    assert not cell["complete"] and cell["failures"] == [{"site": "site_01", "reason": "RuntimeError: disk on fire"}]
    assert sorted(cell["sites"]) == ["site_00"]
    assert any("site site_01 failed: RuntimeError: disk on fire" in line for line in server.lines)
    # resume recomputes the incomplete cell
    healed = StubServer(cfg_factory("finetune.tasks=[local]", "resume=true"))
    assert run_finetune_stage(healed, None) == 0
    assert healed.calls.count(("fit", "local")) == 2


def test_a_site_whose_federated_update_cannot_be_averaged_is_left_out(cfg_factory, monkeypatch) -> None:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    cfg = cfg_factory("finetune.tasks=[federated]", "finetune.run_folds=1", "finetune.rounds=1")
    fit = InProcessProxy.fit

    def site_01_diverges(self, ins, timeout, group_id):
        res = fit(self, ins, timeout, group_id)
        if self.cid == "1001":
            res.parameters = ndarrays_to_parameters([np.full_like(a, np.nan) for a in parameters_to_ndarrays(res.parameters)])
        return res

    monkeypatch.setattr(InProcessProxy, "fit", site_01_diverges)
    server = StubServer(cfg)
    assert run_finetune_stage(server, None) == 1
    cell = json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())["cells"]["federated/1"]
    assert not cell["complete"]
    assert cell["failures"] == [{"site": "site_01", "reason": "update rejected: weight array 0 holds NaN or Inf"}]
    # the model averaged from site_00 alone is scored on both sites, with finite Dice
    assert sorted(cell["sites"]) == ["site_00", "site_01"]
    assert all(np.isfinite(site["dice"]) for site in cell["sites"].values())


def _res(metrics: dict[str, Any]) -> FitRes:
    return FitRes(Status(Code.OK, ""), None, 1, metrics)  # type: ignore[arg-type]


def test_results_without_a_site_of_their_own_or_a_number_are_named_failures() -> None:
    results = [(InProcessProxy.__new__(InProcessProxy), _res(m)) for m in (
        {"site": "a", "loss": 0.5}, {"loss": 0.5}, {"site": "a", "loss": 0.1}, {"site": "b", "loss": "diverged"},
        {"site": "c", "loss": float("nan")})]
    for i, (proxy, _) in enumerate(results):
        ClientProxy.__init__(proxy, cid=str(i))
    kept, rejected = screen_results(results, ["loss"])
    assert [res.metrics["site"] for _, res in kept] == ["a", "c"]  # NaN is a number: a diverged loss is reported
    assert [str(e) for e in rejected] == [
        "[site=node:1] result rejected: no site name (the site metric is NoneType, not a non-empty str)",
        "[site=a] result rejected: another result of this message already reported site a",
        "[site=b] result rejected: the loss metric is str, not a number",
    ]


def test_parse_local_results_checks_every_budget_and_metric() -> None:
    keys = metric_keys(4)
    good = {"1": {"dice": 0.5}, "2": {"dice": 0.25, "hd95": float("nan")}}  # NaN: a structure never predicted
    assert parse_local_results(_res({"results": json.dumps(good)}), [1, 2], keys)["1"] == good["1"]
    for results, problem in (("{", "not JSON"), (json.dumps([1]), "no cell for N = 1"),
                             (json.dumps({"1": {"dice": 0.5}}), "no cell for N = 2"),
                             (json.dumps({"1": {"dice": "high"}, "2": {}}), "N = 1 has non-numbers in dice")):
        with pytest.raises(ValueError, match=problem):
            parse_local_results(_res({"results": results}), [1, 2], keys)


def test_one_sites_unreadable_local_results_do_not_lose_the_others(cfg_factory, monkeypatch) -> None:
    cfg = cfg_factory("finetune.tasks=[local]")
    fit = InProcessProxy.fit

    def site_01_garbles(self, ins, timeout, group_id):
        res = fit(self, ins, timeout, group_id)
        if self.cid == "1001":
            res.metrics["results"] = "{not json"
        return res

    monkeypatch.setattr(InProcessProxy, "fit", site_01_garbles)
    server = StubServer(cfg)
    assert run_finetune_stage(server, None) == 1
    cell = json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())["cells"]["local/1"]
    assert not cell["complete"] and sorted(cell["sites"]) == ["site_00"] and np.isfinite(cell["dice_mean"])
    assert [f["site"] for f in cell["failures"]] == ["site_01"]
    assert cell["failures"][0]["reason"].startswith("result rejected: the results metric is not JSON (Expecting")


def test_local_pretrain_init(cfg_factory, monkeypatch) -> None:
    cfg = cfg_factory("method=local_cl", "finetune.init=local_pretrain", "rounds=1", "pretrain.batch_volumes=2",
                      "pretrain.max_steps_per_round=1", "finetune.run_folds=1", "finetune.rounds=1")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    fit = InProcessProxy.fit

    def pretrain_elsewhere(self, ins, timeout, group_id):
        """The sites' local pre-training reports another environment (oneDNN limited to AVX2), the rest this one."""
        if ins.config["task"] == "local_pretrain":
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        try:
            return fit(self, ins, timeout, group_id)
        finally:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    monkeypatch.setattr(InProcessProxy, "fit", pretrain_elsewhere)
    server = StubServer(cfg)
    server.max_workers = 1  # one site at a time: the variable is process-wide
    assert run_finetune_stage(server, None) == 0
    assert server.calls.count(("fit", "local_pretrain")) == 2
    assert any("local pre-training" in line for line in server.lines)
    cached = server.output_dir / "sites" / "site_00" / "finetune" / "local_pretrained.npz"
    assert cached.is_file()
    results = json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())
    assert all(np.isfinite(c["dice_mean"]) for c in results["cells"].values())
    # both cells depend on the sites' own encoders, so they name where those were pre-trained too
    here = compute_environment()
    there = {**here, "kernel_limits": "ONEDNN_MAX_CPU_ISA=AVX2"}
    both = "+".join(sorted([environment_id(here), environment_id(there)]))
    for cell in results["cells"].values():
        assert cell["environment"]["sites"] == {"site_00": both, "site_01": both}
        assert cell["environment"]["server"] == environment_id(here) and len(cell["environment"]["described"]) == 2


def test_cli_finetune_runs_only_the_finetune_stage_from_the_encoder(tmp_path: Path, monkeypatch) -> None:
    from fcl_flower import cli, runner

    cfg = None

    def fake_simulate(c) -> int:
        nonlocal cfg
        cfg = c
        return 0

    monkeypatch.setattr(runner, "simulate", fake_simulate)
    save_encoder(build_encoder(cfg_factory_free()), tmp_path / "enc.pt")
    assert cli.main(["finetune", "--encoder", str(tmp_path / "enc.pt"), "sites=3", "finetune.tasks=[local]"]) == 0
    assert cfg.stages == ["finetune"] and cfg.finetune.init == "auto" and cfg.sites == 3
    assert cfg.finetune.encoder == str((tmp_path / "enc.pt").resolve()) and cfg.finetune.tasks == ["local"]
    assert cli.main(["finetune", "--encoder", str(tmp_path / "missing.pt")]) == 2


def cfg_factory_free():
    from fcl_flower.config import load_config

    return load_config()


def test_run_time_budget_counts_the_stages_that_run() -> None:
    from fcl_flower.config import load_config
    from fcl_flower.finetune_stage import stage_time_budget
    from fcl_flower.runner import run_time_budget

    both = load_config(["rounds=4", "federation.round_timeout=10", "stages=[pretrain,finetune]"])
    assert run_time_budget(load_config(["rounds=4", "federation.round_timeout=10"])) == 600 + 4 * 10
    assert run_time_budget(both) == 600 + 4 * 10 + stage_time_budget(both)
    assert run_time_budget(load_config(["rounds=4", "federation.round_timeout=10", "stages=[finetune]"])) == (
        600 + stage_time_budget(both))


def test_stage_time_budget_bounds_every_message() -> None:
    from fcl_flower.config import load_config
    from fcl_flower.finetune_stage import stage_time_budget

    cfg = load_config(["finetune.local_timeout=100", "federation.round_timeout=10", "finetune.n_labeled=[1,2]",
                       "finetune.folds=5", "finetune.run_folds=2", "finetune.rounds=3"])
    assert stage_time_budget(cfg) == 100 + 2 * 2 * (3 + 1) * 10
    assert stage_time_budget(load_config(["finetune.tasks=[federated]", "federation.round_timeout=10",
                                          "finetune.n_labeled=[1]", "finetune.rounds=1"])) == 5 * 2 * 10
    assert stage_time_budget(load_config(["finetune.tasks=[local]", "finetune.init=local_pretrain"])) == 2 * 43_200


# ---------------------------------------------------------------- FedBN (finetune.federated_norm = local)

def _norm_positions(cfg) -> list[int]:
    from fcl_flower.fedbn import norm_state_keys
    from fcl_flower.models import build_unet

    model = build_unet(cfg)
    keys = set(norm_state_keys(model))
    return [i for i, k in enumerate(model.state_dict()) if k in keys]


def test_fedbn_site_keeps_its_own_batchnorm_across_rounds_and_at_evaluation(cfg_factory) -> None:
    from fcl_flower.fedbn import SiteNormStore

    common = ("model.norm=batch", "finetune.fed_local_steps=3")
    own, shared = cfg_factory(*common, "finetune.federated_norm=local"), cfg_factory(*common)
    client = StageClient({"partition-id": 0})
    init = initial_unet_weights(own, None)
    norm = _norm_positions(own)
    assert norm and len(norm) < len(init)
    seq = {"task": "federated", "n_labeled": 1, "fold": 0, "run": "run-a"}

    trained, _, _ = client.fit(init, _message(own, round=1, **seq))
    store = SiteNormStore(Path(own.output_dir) / "sites" / "site_00" / "finetune" / "norm", "run-a", 1, 0)
    saved = torch.load(store.path, weights_only=True)
    assert saved["round"] == 1 and saved["run"] == "run-a"
    assert len(saved["layers"]) == len(norm)
    assert all(np.array_equal(v.numpy(), trained[i]) for v, i in zip(saved["layers"].values(), norm))

    # the server's average arrives with other normalisation layers (here: the untrained ones)
    averaged = [init[i] if i in norm else a for i, a in enumerate(trained)]
    assert any(not np.array_equal(averaged[i], trained[i]) for i in norm)
    _, _, with_own = client.evaluate(averaged, _message(own, round=1, **seq))
    _, _, as_trained = client.evaluate(trained, _message(shared, round=1, **seq))
    _, _, with_average = client.evaluate(averaged, _message(shared, round=1, **seq))
    assert with_own == as_trained and with_average != as_trained
    # another run's layers, or layers of the same round, are not used
    _, _, other_run = client.evaluate(averaged, _message(own, round=1, **{**seq, "run": "run-b"}))
    assert other_run == with_average
    assert not store.restore(torch.nn.Module(), before_round=1)

    # round 2 starts from the site's own layers: the same as a shared-norm round from its trained U-Net
    next_shared, _, _ = client.fit(trained, _message(shared, round=2, **seq))
    next_own, _, _ = client.fit(averaged, _message(own, round=2, **seq))
    assert all(np.array_equal(a, b) for a, b in zip(next_own, next_shared))
    assert torch.load(store.path, weights_only=True)["round"] == 2


def test_fedbn_stage_keeps_per_site_layers_and_scores_with_them(cfg_factory) -> None:
    cfg = cfg_factory("model.norm=batch", "finetune.federated_norm=local", "finetune.tasks=[federated]",
                      "finetune.fed_local_steps=2")
    server = StubServer(cfg)
    assert run_finetune_stage(server, None) == 0
    results = json.loads((server.output_dir / "finetune" / RESULTS_JSON).read_text())
    cell = results["cells"]["federated/1"]
    assert cell["complete"] and np.isfinite(cell["dice_mean"])
    layers = {}
    for site in ("site_00", "site_01"):
        for fold in (0, 1):
            saved = torch.load(server.output_dir / "sites" / site / "finetune" / "norm" / f"norm_n1_fold{fold}.pt",
                               weights_only=True)
            assert saved["round"] == cfg.finetune.rounds and saved["run"] == cell["fingerprint"]
            layers[site, fold] = saved["layers"]
    means = [k for k in layers["site_00", 0] if k.endswith("running_mean")]
    assert means and any(not torch.equal(layers["site_00", 0][k], layers["site_01", 0][k]) for k in means)
    shared = StubServer(cfg_factory("model.norm=batch", "finetune.tasks=[federated]", "finetune.fed_local_steps=2",
                                    "resume=true"))
    assert run_finetune_stage(shared, None) == 0  # a different setting: computed again, not resumed
    again = json.loads((shared.output_dir / "finetune" / RESULTS_JSON).read_text())["cells"]["federated/1"]
    assert again["fingerprint"] != cell["fingerprint"] and again["dice_mean"] != cell["dice_mean"]


def test_fingerprints_leave_out_added_keys_at_their_original_value() -> None:
    from omegaconf import OmegaConf

    from fcl_flower.config import load_config, with_overrides
    from fcl_flower.finetune import config_fingerprint, local_pretrain_fingerprint

    cfg = load_config()
    before_the_key = OmegaConf.to_container(cfg)
    del before_the_key["finetune"]["federated_norm"]
    del before_the_key["synthetic"]["anatomy_variation"]
    del before_the_key["pretrain"]["precision"]
    assert config_fingerprint(cfg) == config_fingerprint(OmegaConf.create(before_the_key))
    assert config_fingerprint(with_overrides(cfg, ["pretrain.precision=bfloat16"])) != config_fingerprint(cfg)
    batch = with_overrides(cfg, ["model.norm=batch"])  # FedBN needs BatchNorm
    assert config_fingerprint(with_overrides(batch, ["finetune.federated_norm=local"])) != config_fingerprint(batch)
    assert config_fingerprint(with_overrides(cfg, ["synthetic.anatomy_variation=2"])) != config_fingerprint(cfg)
    # a site's own pre-trained encoder does not depend on fine-tuning settings
    assert local_pretrain_fingerprint(with_overrides(cfg, ["finetune.lr=0.01"])) == local_pretrain_fingerprint(cfg)
    assert local_pretrain_fingerprint(with_overrides(cfg, ["pretrain.lr=0.01"])) != local_pretrain_fingerprint(cfg)
