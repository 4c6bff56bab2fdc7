"""A real deployment on loopback: SuperLink with TLS + SuperNode auth, one SuperNode per site.

Two federations are started (each process once), both with tiny model/data sizes, one
after the other (the crash test comes first, so the module fixture's processes do not
idle alongside it):

* ``federation`` (module fixture): 3 healthy sites + 1 site whose data has a corrupt file,
  2 rounds of FCL; afterwards the same SuperLink is used to check that an unregistered
  SuperNode and clients without the CA are refused.
* ``test_supernode_crash_and_superlink_restart_resume``: 3 sites, 4 rounds; one SuperNode
  is SIGKILLed during round 2 and restarted, then the SuperLink (and its ServerApp) is
  stopped during round 4, started again, and the run resumed with ``resume=true``.

Every process is stopped by PID in ``finally`` and checked to be gone.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from fcl_flower.certs import CertPaths, generate_certs, site_names
from fcl_flower.config import load_config
from fcl_flower.deploy import CONNECTION, LocalDeployment, prepare_local
from fcl_flower.processes import stop_tree
from fcl_flower.processes import FlowerProcessError, ManagedProcess, flower_env, flwr_cli, write_connection

pytestmark = pytest.mark.slow

CLIENTAPP_STARTED = "Start `flwr-clientapp` process"


def tiny(caches: Path, *extra: str) -> list[str]:
    return [
        "data.image_size=[32,32]", "model.channels=[8,16,32]", "synthetic.image_size=64",
        "synthetic.patients_per_site=3", "pretrain.queue_size=64", "pretrain.bank_sample_size=64",
        "relay.max_rows_per_site=32", "federation.fraction_evaluate=0.0",
        f"synthetic.cache_root={caches / 'synthetic'}", f"data.cache_dir={caches / 'preprocessed'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertPaths:
    """One CA, SuperLink certificate and SuperNode keys for every deployment of this module."""
    return generate_certs(tmp_path_factory.mktemp("certs"), [*site_names(sites=4), "intruder"])


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches")


def count_in(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.is_file() else 0


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_exit(proc: ManagedProcess, timeout: float) -> int:
    assert proc.popen is not None
    deadline = time.monotonic() + timeout
    while proc.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return proc.popen.poll()


# -- crashes and restarts ----------------------------------------------------------------
def test_supernode_crash_and_superlink_restart_resume(certs, caches, tmp_path):
    """Kill a SuperNode in round 2, restart it; stop the SuperLink in round 3; resume."""
    out = tmp_path / "run"
    cfg = load_config(tiny(
        caches, "sites=3", "rounds=3", f"output_dir={out}", "federation.round_timeout=150",
        "federation.min_available_sites=2", "federation.min_fit_sites=2",
    ))
    cfg, data_dirs = prepare_local(cfg)
    d = LocalDeployment(cfg, data_dirs, certs_dir=certs.root, echo=None)
    try:
        d.start_superlink()
        d.register_all()
        d.start_supernodes()
        first_run = d.submit()
        d.wait_for_round(1, 400)

        # SIGKILL site_01's SuperNode (and its ClientApp) while it trains round 2
        killed_log = d.logs / "supernode-site_01.log"
        wait_until(lambda: count_in(killed_log, CLIENTAPP_STARTED) >= 2, 200, "site_01 to start round 2")
        d.kill_supernode("site_01")
        records = d.wait_for_round(2, 400)
        assert set(records[1]["sites"]) == {"site_00", "site_02"}  # the round ended with the others
        # Flower reports the lost node without naming it; the server names it after the site that did not answer
        assert [f["site"] for f in records[1]["failures"]] == ["site_01"], records[1]
        before = records[:2]

        # restart it: accepted as soon as the SuperLink has marked the killed session offline
        d.start_supernode("site_01", retry_for=150)
        # the run went on: round 3 is under way at the other sites
        other_log = d.logs / "supernode-site_00.log"
        wait_until(lambda: count_in(other_log, CLIENTAPP_STARTED) >= 3, 200, "round 3 to start")

        # stop the SuperLink and its ServerApp during round 3, start again, resume
        d.stop_superlink()
        assert not d.completed() and [r["round"] for r in d.records()] == [1, 2]
        d.start_superlink()
        assert first_run in d.stop_stale_runs()
        second_run = d.submit(["resume=true", "federation.min_available_sites=3"])
        status = d.follow(second_run, timeout=600, echo=lambda line: None)
        assert status == "finished:completed", (d.logs / "run.log").read_text()[-3000:]
        assert d.completed()

        records = d.records()
        assert [r["round"] for r in records] == [1, 2, 3]  # nothing lost, nothing twice
        assert records[:2] == before  # completed rounds are kept as they were
        assert "resumed from" in (d.logs / "run.log").read_text()
        assert (out / "checkpoints" / "round-00003.npz").is_file()
        r3 = records[2]["sites"]
        assert set(r3) == {"site_00", "site_01", "site_02"}  # site_01 rejoined ...
        # ... with its state from disk: its queue holds the rows of round 1 and round 3
        assert r3["site_01"]["queue_rows"] == records[0]["sites"]["site_01"]["samples"] + r3["site_01"]["samples"]
    finally:
        d.stop_all()
        assert d.survivors() == []


# -- a healthy federation with one broken site ------------------------------------------
@pytest.fixture(scope="module")
def federation(certs, caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("federation") / "run"
    cfg = load_config(tiny(
        caches, "sites=4", "rounds=2", f"output_dir={out}", "federation.min_available_sites=4",
        "federation.round_timeout=240",
    ))
    cfg, data_dirs = prepare_local(cfg)
    broken = out.parent / "site_03_broken"  # a copy: the shared synthetic data stays intact
    shutil.copytree(data_dirs["site_03"], broken)
    victims = sorted(broken.rglob("*.nii.gz"))
    for victim in victims:  # every volume: whichever patients the site trains on
        victim.write_bytes(b"this is not a NIfTI file")
    data_dirs["site_03"] = broken
    deployment = LocalDeployment(cfg, data_dirs, certs_dir=certs.root, echo=None)
    try:
        t0 = time.monotonic()
        deployment.start_superlink()
        deployment.register_all()
        deployment.start_supernodes()
        run_id = deployment.submit()
        status = deployment.follow(run_id, timeout=600, echo=lambda line: None)
        yield {"deployment": deployment, "status": status, "seconds": time.monotonic() - t0}
    finally:
        deployment.stop_all()
        assert deployment.survivors() == []


def test_tls_auth_federation_completes_with_metrics(federation):
    d: LocalDeployment = federation["deployment"]
    assert federation["status"] == "finished:completed", (d.out / "logs").as_posix()
    assert d.completed()
    records = d.records()
    assert [r["round"] for r in records] == [1, 2]
    healthy = {"site_00", "site_01", "site_02"}
    for record in records:
        assert set(record["sites"]) == healthy
        for site, metrics in record["sites"].items():
            assert math.isfinite(metrics["loss"]), (record["round"], site, metrics)
            assert metrics["samples"] > 0
    assert all(records[1]["sites"][s]["remote_rows"] > 0 for s in healthy)
    assert (d.out / "checkpoints" / "round-00002.npz").is_file()
    # the federation really ran over TLS with authenticated, registered SuperNodes
    assert "https://" in (d.logs / "superlink.log").read_text()
    nodes = json.loads(_json(d.cli(["supernode", "list", CONNECTION, "--format", "json"])))["nodes"]
    assert len(nodes) == 4
    for site in healthy:  # each site's trainer state lives in its own folder
        assert any((d.site_dir(site) / "state" / d.out.name / "pretrain").glob("round-00002"))


def _json(text: str) -> str:
    return text[text.index("{"):]


def test_broken_site_is_reported_by_name_and_others_continue(federation):
    d: LocalDeployment = federation["deployment"]
    for record in d.records():
        named = [f for f in record["failures"] if f["site"] == "site_03"]
        assert named, record["failures"]
        assert len(record["sites"]) == 3  # the other sites went on


def test_unregistered_supernode_is_refused(federation, certs):
    d: LocalDeployment = federation["deployment"]
    d.data_dirs.setdefault("intruder", d.data_dirs["site_00"])
    log = d.logs / "intruder.log"
    proc = ManagedProcess("intruder", d.supernode_args("intruder"), flower_env(d.root / "intruder"), log)
    try:
        proc.start()
        rc = wait_exit(proc, 90)
        assert rc not in (None, 0)
        assert "Failed to activate SuperNode" in log.read_text()
    finally:
        stop_tree(proc, grace=5)
    nodes = json.loads(_json(d.cli(["supernode", "list", CONNECTION, "--format", "json"])))["nodes"]
    assert len(nodes) == 4  # the intruder did not become a node


def test_connections_without_the_ca_are_refused(federation, tmp_path):
    d: LocalDeployment = federation["deployment"]
    # a SuperNode that does not trust our CA (system trust store, or another CA)
    other_ca = generate_certs(tmp_path / "other", []).ca_cert
    for name, drop, replace in (("no-ca", True, None), ("other-ca", False, other_ca)):
        args = d.supernode_args("site_00", root_certificates=replace)
        if drop:
            i = args.index("--root-certificates")
            del args[i:i + 2]
        args += ["--max-retries", "1", "--max-wait-time", "10"]
        log = d.logs / f"supernode-{name}.log"
        proc = ManagedProcess(name, args, flower_env(tmp_path / name), log)
        try:
            proc.start()
            assert wait_exit(proc, 90) not in (None, 0), name
            assert "CERTIFICATE_VERIFY_FAILED" in log.read_text(), name
        finally:
            stop_tree(proc, grace=5)
    # the flwr CLI without the CA (system trust store) or without TLS at all
    for name, root in (("cli-no-ca", None), ("cli-insecure", None)):
        home = tmp_path / name
        write_connection(home, "x", d.address, root)
        if name == "cli-no-ca":
            (home / "config.toml").write_text((home / "config.toml").read_text().replace("insecure = true\n", ""))
        with pytest.raises(FlowerProcessError, match="unavailable"):
            flwr_cli(["list", "x"], flower_env(home), timeout=60)


# -- plumbing (no Flower processes) --------------------------------------------------------
def test_stop_tree_reaches_descendants_in_other_sessions(tmp_path):
    """Like the SuperLink's SuperExec and ServerApp: a grandchild in a session of its own."""
    import os
    import sys

    from fcl_flower.processes import descendants, is_alive

    pid_file = tmp_path / "grandchild.pid"
    spawn = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)"
    )
    proc = ManagedProcess("parent", [sys.executable, "-c", spawn], dict(os.environ), tmp_path / "log").start()
    try:
        wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip(), 30, "the grandchild")
        grandchild = int(pid_file.read_text())
        assert grandchild in descendants(proc.pid)
        assert os.getpgid(grandchild) != os.getpgid(proc.pid)
        signalled = stop_tree(proc, grace=5)
        assert grandchild in signalled
        wait_until(lambda: not is_alive(grandchild), 10, "the grandchild to die")
        assert not proc.alive()
    finally:
        stop_tree(proc, grace=1, sig=9)


def test_site_data_dirs_follow_the_manifest(tmp_path):
    from fcl_flower.deploy import site_data_dirs

    for name in ("site_00", "site_01", "site_02"):
        (tmp_path / name).mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"sites": ["site_01", "site_00", "site_02"]}))
    cfg = load_config([f"data.root={tmp_path}"])
    assert list(site_data_dirs(cfg, 2)) == ["site_01", "site_00"]
    with pytest.raises(FlowerProcessError, match="needs 4 site folders"):
        site_data_dirs(cfg, 4)
    # one ACDC dataset (patient folders) or one MSD task is not a folder per site
    acdc = tmp_path / "acdc"
    for name in ("patient001", "patient002"):
        (acdc / name).mkdir(parents=True)
    msd = tmp_path / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "dataset.json").write_text("{}")
    for root, fmt in ((acdc, "acdc"), (msd, "msd")):
        with pytest.raises(FlowerProcessError, match="one dataset, not one folder per site"):
            site_data_dirs(load_config([f"data.root={root}", f"data.format={fmt}"]), 2)
