"""The paper-experiment driver: resume-skip logic, and the quick profile end to end."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "simulations"))

import paper_experiment as pe  # noqa: E402

from fcl_flower.finetune import config_fingerprint  # noqa: E402
from fcl_flower.server_app import prepare_run  # noqa: E402


@pytest.fixture
def isolated(tmp_path):
    """Overrides that keep data and caches inside the test's folder."""
    return [f"synthetic.cache_root={tmp_path / 'synthetic'}", f"data.cache_dir={tmp_path / 'cache'}"]


def _fake_results(cfg, complete: bool = True, key: str | None = None, stale: tuple[str, ...] = ()) -> None:
    """A ``results.json`` with the cells ``cfg`` asks for; cells named in ``stale`` carry another config's key."""
    key = key or config_fingerprint(cfg)
    cells = {
        f"{t}/{n}": {"method": cfg.method, "finetune": t, "n_labeled": n, "complete": complete,
                     "config_key": "another-config" if f"{t}/{n}" in stale else key,
                     "dice_mean": 0.5, "dice_std": 0.1, "sites": {}}
        for t in cfg.finetune.tasks for n in cfg.finetune.n_labeled
    }
    path = Path(cfg.output_dir) / "finetune" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config_key": key, "cells": cells}))


def _stored(out: Path, method: str, cells: dict[str, dict | None], dice: dict[str, float] | None = None) -> None:
    """``<out>/<method>/finetune/results.json`` with one fold per site and cell; a cell's value is its
    environment record (None: a cell stored before environments were recorded); ``dice``: {site: Dice}
    of every cell (default one site at 0.5)."""
    dice = dice or {"site_00": 0.5}
    stored = {}
    for key, record in cells.items():
        task, n = key.split("/")
        sites = {s: {"dice": d, "folds": [{"fold": 0, "dice": d, "hd95": 3.0}]} for s, d in dice.items()}
        cell = {"method": method, "finetune": task, "n_labeled": int(n), "complete": True,
                "dice_mean": sum(dice.values()) / len(dice), "dice_std": 0.0, "sites": sites}
        stored[key] = cell if record is None else {**cell, "environment": record}
    path = out / method / "finetune" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"cells": stored}))


def test_paired_tables_pair_methods_site_by_site(tmp_path) -> None:
    """Hand-computed: FCL - random = (+0.10, +0.05, 0.00) over three sites; FedSimCLR has two sites and no
    federated cell, so it is paired over those two and left out of the federated tables."""
    both = {"local/1": None, "federated/1": None}
    _stored(tmp_path, "random", both, {"site_00": 0.30, "site_01": 0.40, "site_02": 0.50})
    _stored(tmp_path, "fcl", both, {"site_00": 0.40, "site_01": 0.45, "site_02": 0.50})
    _stored(tmp_path, "fedsimclr", {"local/1": None}, {"site_00": 0.35, "site_01": 0.45})
    assert pe.paired_difference({"a": 0.4}, {"b": 0.3}) == "—"
    assert pe.paired_difference({"a": 0.4, "b": 0.3}, {"a": 0.4, "b": 0.3}) == "+0.000 ± 0.000 (0/2, 0.0 SE)"
    text = pe.paired_gains(tmp_path, ["random", "fcl", "fedsimclr"])
    local, federated = text.split("**Federated fine-tuning: gain over random init")
    # mean 0.05, std sqrt(0.005 / 3) = 0.0408, mean / (std / sqrt(3)) = 2.1; ahead on 2 of 3 sites
    assert "| FCL | +0.050 ± 0.041 (2/3, 2.1 SE) |" in local
    assert "| FedSimCLR | +0.050 ± 0.000 (2/2, ∞ SE) |" in local
    assert "**Local fine-tuning: FCL minus each method, paired by site**" in local
    assert "| FedSimCLR | +0.025 ± 0.025 (1/2, 1.4 SE) |" in local.split("FCL minus each method")[1]
    assert "| FCL | +0.050 ± 0.041 (2/3, 2.1 SE) |" in federated
    assert "FedSimCLR" not in federated and "FCL minus each method" not in federated
    # without FCL among the methods there is no FCL table
    assert "FCL minus" not in pe.paired_gains(tmp_path, ["random", "fedsimclr"])


def test_the_docs_name_the_compute_environments_the_cells_came_from(tmp_path) -> None:
    from fcl_flower.environment import ENVIRONMENT, compute_environment, environment_id, environment_record

    here = compute_environment()
    there = {**here, "cpu_capability": "AVX2", "kernel_limits": "ONEDNN_MAX_CPU_ISA=AVX2"}
    at_home = environment_record(here, {"site_00": {ENVIRONMENT: json.dumps(here)}})
    elsewhere = environment_record(here, {"site_00": {ENVIRONMENT: json.dumps(there)}})
    one, two = tmp_path / "one", tmp_path / "two"
    _stored(one, "random", {"local/1": at_home, "federated/1": at_home})
    summary = pe.environments_summary(one, ["random"])
    assert summary.startswith(f"Compute environment of every cell (server and sites): `{environment_id(here)}`")
    assert "compute environments" not in summary and "without a record" not in summary

    _stored(two, "random", {"local/1": at_home})
    _stored(two, "fcl", {"local/1": elsewhere, "federated/1": None})
    summary = pe.environments_summary(two, ["random", "fcl"])
    assert "**These cells come from 2 compute environments**" in summary
    assert f"- `{environment_id(here)}`, " in summary and "2 cells (random local N=1, fcl local N=1)" in summary
    assert f"- `{environment_id(there)}`, " in summary and "ONEDNN_MAX_CPU_ISA=AVX2: 1 cell (fcl local N=1)" in summary
    assert "1 cell without a record of the compute environment" in summary and "fcl federated N=1." in summary
    folds = pe.load_fold_rows(two, ["random", "fcl"])
    assert [(r["method"], r["finetune"], r["environment"]) for r in folds] == [
        ("random", "local", environment_id(here)), ("fcl", "local", environment_id(there)), ("fcl", "federated", "")]


def test_methods_cover_the_tables() -> None:
    assert pe.METHOD_NAMES == ("random", "local_cl", "fedrotation", "fedsimclr", "fcl", "fcl_no_gsm", "fcl_no_fe")
    assert sorted(pe.RUN_ORDER) == sorted(pe.METHOD_NAMES)
    for m in pe.METHODS:
        cfg = pe.method_config(m, "quick", Path("/tmp/x"), [])
        assert cfg.resume and "finetune" in cfg.stages
    by = {m.name: pe.method_config(m, "quick", Path("/tmp/x"), []) for m in pe.METHODS}
    assert by["random"].stages == ["finetune"] and by["random"].finetune.init == "random"
    assert by["local_cl"].finetune.init == "local_pretrain" and by["local_cl"].method == "local_cl"
    assert not by["fcl_no_gsm"].pretrain.use_remote_positives and by["fcl_no_gsm"].relay.enabled
    assert not by["fcl_no_fe"].pretrain.use_feature_exchange and not by["fcl_no_fe"].relay.enabled
    assert not by["fedsimclr"].relay.enabled and by["fedsimclr"].method == "simclr"


def resolved(cfg):
    """The config the driver runs a method with."""
    from fcl_flower.site import resolve_data_root

    return resolve_data_root(prepare_run(cfg))


def test_resume_skips_finished_methods_and_only_those(tmp_path, isolated, monkeypatch) -> None:
    out = tmp_path / "runs"
    started: list[str] = []

    def fake_engine(cfg) -> int:
        started.append(Path(cfg.output_dir).name)
        _fake_results(cfg)
        return 0

    monkeypatch.setitem(pe.ENGINES, "inprocess", fake_engine)
    by = {m.name: m for m in pe.METHODS}
    fcl_cfg = resolved(pe.method_config(by["fcl"], "quick", out, isolated))
    _fake_results(fcl_cfg)  # finished, same config: skipped
    sim_cfg = resolved(pe.method_config(by["fedsimclr"], "quick", out, isolated))
    _fake_results(sim_cfg, complete=False)  # a cell not complete: run again
    rot_cfg = resolved(pe.method_config(by["fedrotation"], "quick", out, isolated))
    _fake_results(rot_cfg, key="another-config")  # computed under another config: run again
    lcl_cfg = resolved(pe.method_config(by["fcl_no_gsm"], "quick", out, isolated))
    _fake_results(lcl_cfg, stale=("federated/1",))  # the file's key is current, one cell's is not: run again
    assert pe.finished(fcl_cfg) and not pe.finished(sim_cfg) and not pe.finished(rot_cfg) and not pe.finished(lcl_cfg)

    docs = tmp_path / "docs"
    rc = pe.main(["--profile", "quick", "--engine", "inprocess", "--out", str(out), "--docs", str(docs),
                  "--methods", "fcl,fedsimclr,fedrotation,fcl_no_gsm", *isolated])
    assert rc == 0
    assert sorted(started) == ["fcl_no_gsm", "fedrotation", "fedsimclr"]
    started.clear()
    assert pe.main(["--profile", "quick", "--engine", "inprocess", "--out", str(out), "--docs", str(docs),
                    "--methods", "fcl,fedsimclr,fedrotation,fcl_no_gsm", *isolated]) == 0
    assert started == []  # everything finished: no run is started
    # a changed setting makes the method's cells stale
    assert pe.main(["--profile", "quick", "--engine", "inprocess", "--out", str(out), "--docs", str(docs),
                    "--methods", "fcl", "finetune.local_steps=5", *isolated]) == 0
    assert started == ["fcl"]
    # --collect-only starts nothing, reports the unfinished method, and still writes the docs
    started.clear()
    (docs / "results.csv").unlink()
    assert pe.main(["--profile", "quick", "--engine", "inprocess", "--out", str(out), "--docs", str(docs),
                    "--methods", "fcl,fcl_no_fe", "--collect-only", *isolated]) == 1
    assert started == [] and "fcl," in (docs / "results.csv").read_text()
    assert "--collect-only" in (docs / "RESULTS.md").read_text() and "some cells are missing" in (docs / "RESULTS.md").read_text()


def test_a_run_of_only_the_requested_tasks_is_reported_complete(tmp_path, isolated, monkeypatch) -> None:
    """A local-only run that finished every cell it asked for is complete; a method left unfinished is not."""
    out, docs = tmp_path / "runs", tmp_path / "docs"
    monkeypatch.setitem(pe.ENGINES, "inprocess", lambda cfg: _fake_results(cfg) or 0)
    local_only = ["--profile", "quick", "--engine", "inprocess", "--out", str(out), "--docs", str(docs),
                  "finetune.tasks=[local]", *isolated]
    assert pe.main([*local_only, "--methods", "random,fcl"]) == 0
    assert "federated/" not in (out / "fcl" / "finetune" / "results.json").read_text()
    text = (docs / "RESULTS.md").read_text()
    assert "profile **quick**._" in text and "missing or incomplete" not in text
    assert pe.main([*local_only, "--methods", "random,fcl,fedsimclr", "--collect-only"]) == 1
    assert "some cells are missing or incomplete" in (docs / "RESULTS.md").read_text()


def _check_outputs(docs: Path, methods: list[str], budgets: list[int]) -> list[dict[str, str]]:
    with open(docs / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == pe.CSV_COLUMNS
        rows = list(reader)
    cells = {(r["method"], r["finetune"], int(r["n_labeled"])) for r in rows}
    assert cells == {(m, t, n) for m in methods for t in ("local", "federated") for n in budgets}
    for r in rows:
        assert math.isfinite(float(r["dice_mean"])) and math.isfinite(float(r["dice_std"]))
        assert 0.0 <= float(r["dice_mean"]) <= 1.0
    assert (docs / "results_dice_vs_n.png").stat().st_size > 10_000
    text = (docs / "RESULTS.md").read_text()
    assert pe.BEGIN in text and pe.END in text and "| FCL |" in text and "profile **quick**" in text
    return rows


@pytest.mark.slow
def test_quick_profile_end_to_end_inprocess(tmp_path, isolated) -> None:
    """Every cell of both tables for all seven methods, through the ServerApp/ClientApp objects."""
    out, docs = tmp_path / "runs", tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text(f"# hand-written head\n\n{pe.BEGIN}\nold\n{pe.END}\n\nhand-written tail\n")
    assert pe.main(["--profile", "quick", "--engine", "inprocess", "--out", str(out), "--docs", str(docs), *isolated]) == 0
    _check_outputs(docs, list(pe.METHOD_NAMES), [1, 2])
    text = (docs / "RESULTS.md").read_text()
    assert text.startswith("# hand-written head") and text.rstrip().endswith("hand-written tail") and "\nold\n" not in text
    assert (docs / "results_overlays.png").is_file()
    assert "gain over random init, paired by site" in text
    # the per-fold CSV: every site and fold of every cell, and each cell's mean is the mean of its sites' fold means
    with open(docs / "results_folds.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == pe.FOLD_COLUMNS
        folds = list(reader)
    with open(docs / "results.csv", newline="") as fh:
        cells = {(r["method"], r["finetune"], int(r["n_labeled"])): float(r["dice_mean"]) for r in csv.DictReader(fh)}
    for (method, task, n), dice_mean in cells.items():
        mine = [r for r in folds if (r["method"], r["finetune"], int(r["n_labeled"])) == (method, task, n)]
        assert sorted({(r["site"], int(r["fold"])) for r in mine}) == [(f"site_{s:02d}", f) for s in range(3) for f in range(2)]
        site_means = [sum(float(r["dice"]) for r in mine if r["site"] == s) / 2 for s in {r["site"] for r in mine}]
        assert sum(site_means) / len(site_means) == pytest.approx(dice_mean, abs=2e-4)
    # every fold row names its site's compute environment: in process, this one, as the generated text says
    from fcl_flower.environment import compute_environment, environment_id

    assert {r["environment"] for r in folds} == {environment_id(compute_environment())}
    assert f"Compute environment of every cell (server and sites): `{environment_id(compute_environment())}`" in text
    # the site state of the local-CL sites holds their own encoders; the FCL run its pre-trained one
    assert list((out / "local_cl" / "sites").glob("*/finetune/local_pretrained.npz"))
    assert (out / "fcl" / "encoder.pt").is_file() and not (out / "random" / "encoder.pt").exists()
    # re-running a finished experiment recomputes nothing and gives the same table
    before = (docs / "results.csv").read_text()
    assert pe.main(["--profile", "quick", "--engine", "inprocess", "--out", str(out), "--docs", str(docs), *isolated]) == 0
    assert (docs / "results.csv").read_text() == before


@pytest.mark.slow
def test_quick_profile_one_method_through_the_flower_simulation_engine(tmp_path, isolated) -> None:
    """The default engine: a real `fcl-flower simulate` run (SuperLink + Ray) yields the method's whole row."""
    out, docs = tmp_path / "runs", tmp_path / "docs"
    assert pe.main(["--profile", "quick", "--out", str(out), "--docs", str(docs), "--methods", "fcl", *isolated]) == 0
    _check_outputs(docs, ["fcl"], [1, 2])
    log = (out / "fcl" / "logs" / "run.log").read_text()
    assert "[fcl] pretrain round 1/1" in log and "[fcl] finetune federated N=2" in log


@pytest.mark.parametrize("tasks, panels", [(("local",), 1), (("local", "federated"), 2), ((), 1)])
def test_dice_plot_has_one_panel_per_finetune_task_and_a_legend(tmp_path, tasks, panels):
    """A local-only run gets one panel, not an empty federated one, and the legend is asked of a panel with lines (no
    matplotlib warning); a run with no finished cell yet (``--collect-only`` early, or every method failed) still gets
    its (empty) plot."""
    import matplotlib.image
    import warnings

    rows = [{"method": m, "finetune": t, "n_labeled": n, "dice_mean": 0.4 + 0.01 * n, "dice_std": 0.05}
            for m in ("random", "fcl") for t in tasks for n in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend is asked of a panel without labelled lines
        png = pe.plot_dice_vs_n(rows, ["random", "fcl"], tmp_path / "dice.png")
    height, width = matplotlib.image.imread(png).shape[:2]
    assert round(width / height * 4.2 / 5.5) == panels
