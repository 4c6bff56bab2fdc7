"""``fcl-flower deploy-local``: a real Flower deployment (TLS + SuperNode authentication) on one box.

The same processes a hospital federation runs, all on loopback: one ``flower-superlink``
(TLS, ``--enable-supernode-auth``, a state database), one ``flower-supernode`` per site,
each with its own ``FLWR_HOME``, runtime port, private key and ``--node-config``, and
the ``flwr`` CLI to register keys, submit the app and follow the run. ``LocalDeployment``
is the reusable part (the integration tests drive faults through it); ``deploy_local``
is the command.

Layout under the run's ``output_dir`` (the ServerApp writes its own files next to it)::

    deploy/certs/                 CA, SuperLink certificate, supernodes/<site>[.pub]
    deploy/superlink/             the SuperLink's FLWR_HOME and state.db
    deploy/cli/                   the flwr CLI's FLWR_HOME (connection "deploy")
    deploy/sites/<site>/          what a hospital's machine holds: flwr-home/, state/
    logs/superlink.log, logs/supernode-<site>.log, logs/run.log

Every process is started in its own session and stopped by PID together with all its
descendants (the SuperLink's SuperExec and ServerApp run in sessions of their own, so
stopping the SuperLink's process group alone would leave the ServerApp running).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from omegaconf import DictConfig

from fcl_flower.certs import CertPaths, ensure_certs
from fcl_flower.config import config_to_yaml, with_overrides
from fcl_flower.data.datasets import is_single_dataset, site_subfolders
from fcl_flower.processes import (
    BIN_DIR, FlowerProcessError, ManagedProcess, flower_env, flwr_cli, follow_run, free_port,
    is_alive, report_outcome, run_status, stop_tree, submit_run, wait_for_port, write_connection,
)

CONNECTION = "deploy"
ACTIVATED = "SuperNode ID:"
REFUSED = "Failed to activate SuperNode"
ACTIVE_STATES = ("pending", "starting", "running")


# -- process trees --------------------------------------------------------------------
def site_data_dirs(cfg: DictConfig, sites: int) -> dict[str, Path]:
    """The first ``sites`` site folders of ``cfg.data.root`` (manifest order, else sorted)."""
    root = Path(cfg.data.root)
    manifest = root / "manifest.json"
    if manifest.is_file():
        names = list(json.loads(manifest.read_text()).get("sites", []))
    else:
        if is_single_dataset(root, cfg.data.format):
            raise FlowerProcessError(
                f"data.root={root} is one dataset, not one folder per site: deploy-local gives each SuperNode "
                "one site folder, so split it into site folders first (simulate can split one dataset by data.split)"
            )
        names = [folder.name for folder in site_subfolders(root)]
    if len(names) < sites:
        raise FlowerProcessError(
            f"deploy-local needs {sites} site folders under data.root={root}, found {len(names)}: {names}"
        )
    return {name: (root / name).resolve() for name in names[:sites]}


class LocalDeployment:
    """A SuperLink and SuperNodes on this machine, started and stopped by PID.

    Args:
        cfg: the run's config with ``output_dir`` absolute (``prepare_run`` applied).
        data_dirs: site name -> the folder its SuperNode reads (``--node-config data-dir``).
        app: the Flower app folder to submit (default: this checkout). It is copied once,
            as the FAB would hold it, into ``deploy/app`` at the first ``submit``, so a run
            and its resumption run the same code even if the checkout changes meanwhile.
        certs_dir: where certificates and keys live (created if missing; default
            ``<output_dir>/deploy/certs``).
        echo: where progress lines go.
    """

    def __init__(
        self, cfg: DictConfig, data_dirs: Mapping[str, Path], app: Path | None = None,
        certs_dir: Path | None = None, echo: Callable[[str], None] | None = print,
    ) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.root = self.out / "deploy"
        self.logs = self.out / "logs"
        self.data_dirs = {name: Path(path) for name, path in data_dirs.items()}
        self.sites = list(self.data_dirs)
        self.app = app
        self.app_snapshot: Path | None = None
        self.echo = echo or (lambda line: None)
        self.host = str(cfg.deploy.host)
        self.dial_host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        self.port = int(cfg.deploy.port) or free_port(self.dial_host)
        self.startup_timeout = float(cfg.deploy.startup_timeout)
        self.certs: CertPaths = ensure_certs(certs_dir or self.root / "certs", self.sites)
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self.signalled: set[int] = set()  # every PID stopped so far (tests check none survives)
        self.cli_env = flower_env(self.root / "cli")
        write_connection(self.root / "cli", CONNECTION, self.address, self.certs.ca_cert)

    @property
    def address(self) -> str:
        return f"{self.dial_host}:{self.port}"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    # -- SuperLink ---------------------------------------------------------------------
    def superlink_args(self) -> list[str]:
        c = self.certs
        return [
            str(BIN_DIR / "flower-superlink"),
            "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.superlink_cert),
            "--ssl-keyfile", str(c.superlink_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(self.root / "superlink" / "state.db"),
            "--host", self.host, "--port", str(self.port),
        ]

    def start_superlink(self) -> None:
        """Start the SuperLink (TLS, node auth, state database) and wait until it serves."""
        if self.superlink is not None and self.superlink.alive():
            raise FlowerProcessError("the SuperLink is already running")
        home = self.root / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        self.superlink = ManagedProcess(
            "superlink", self.superlink_args(), flower_env(home), self.logs / "superlink.log", cwd=home
        ).start()
        wait_for_port(self.dial_host, self.port, self.startup_timeout, process=self.superlink.popen)
        deadline = time.monotonic() + self.startup_timeout
        while True:  # the port opens a moment before the HTTP API answers
            try:
                self.cli(["list", CONNECTION, "--format", "json"], timeout=60)
                break
            except FlowerProcessError:
                if time.monotonic() > deadline or not self.superlink.alive():
                    raise
                time.sleep(1.0)
        self.echo(f"[deploy] SuperLink (TLS, SuperNode auth) on {self.address}, pid {self.superlink.pid}")

    def stop_superlink(self, grace: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Stop the SuperLink and everything it started (SuperExec, ServerApp), by PID."""
        if self.superlink is not None:
            self.signalled.update(stop_tree(self.superlink, grace=grace, sig=sig))
            self.superlink = None

    def cli(self, args: Sequence[str], timeout: float = 120) -> str:
        """``flwr ARGS`` against this deployment's SuperLink (connection ``deploy``)."""
        return flwr_cli(args, self.cli_env, timeout=timeout)

    # -- SuperNodes ----------------------------------------------------------------------
    def register(self, site: str) -> None:
        """``flwr supernode register`` the site's public key (a key already known is fine)."""
        try:
            self.cli(["supernode", "register", str(self.certs.supernode_pub(site)), CONNECTION, "--format", "json"])
        except FlowerProcessError as exc:
            if "already in use" not in str(exc):
                raise

    def register_all(self) -> None:
        for site in self.sites:
            self.register(site)

    def supernode_args(self, site: str, key: Path | None = None, root_certificates: Path | None = None) -> list[str]:
        data_dir = self.data_dirs[site]
        state_dir = self.site_dir(site) / "state"
        node_config = " ".join(
            f"{k}={json.dumps(str(v))}" for k, v in
            (("data-dir", data_dir), ("site-name", site), ("state-dir", state_dir))
        )
        return [
            str(BIN_DIR / "flower-supernode"),
            "--superlink", self.address,
            "--root-certificates", str(root_certificates or self.certs.ca_cert),
            "--auth-supernode-private-key", str(key or self.certs.supernode_key(site)),
            "--port", str(free_port(self.dial_host)),
            "--node-config", node_config,
        ]

    def start_supernode(self, site: str, retry_for: float = 0.0) -> ManagedProcess:
        """Start the site's SuperNode and wait until the SuperLink has activated it.

        A SuperNode that restarts right after being killed is refused until the SuperLink
        has marked its previous session offline (two missed 30 s heartbeats at most);
        ``retry_for`` seconds of retries cover that.
        """
        if site in self.supernodes and self.supernodes[site].alive():
            raise FlowerProcessError(f"the SuperNode of {site} is already running")
        deadline = time.monotonic() + max(retry_for, 0.0)
        home = self.site_dir(site) / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (self.site_dir(site) / "state").mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"supernode-{site}.log"
        while True:
            proc = ManagedProcess(
                f"supernode-{site}", self.supernode_args(site), flower_env(home), log_path, cwd=self.site_dir(site)
            )
            offset = log_path.stat().st_size if log_path.exists() else 0
            proc.start()
            self.supernodes[site] = proc
            outcome = wait_for_log(log_path, offset, (ACTIVATED,), proc, self.startup_timeout)
            if outcome == ACTIVATED:
                self.echo(f"[deploy] SuperNode {site} connected, pid {proc.pid}, data {self.data_dirs[site]}")
                return proc
            self.signalled.update(stop_tree(proc, grace=5))
            if time.monotonic() >= deadline:
                tail = _tail(log_path, offset)
                raise FlowerProcessError(f"SuperNode {site} was not accepted by the SuperLink: {tail}")
            time.sleep(5.0)

    def start_supernodes(self) -> None:
        for site in self.sites:
            self.start_supernode(site)

    def kill_supernode(self, site: str) -> None:
        """SIGKILL the site's SuperNode and its ClientApps (a crash, no goodbye to the SuperLink)."""
        proc = self.supernodes.get(site)
        if proc is not None:
            self.signalled.update(stop_tree(proc, grace=5, sig=signal.SIGKILL))

    def stop_supernode(self, site: str, grace: float = 10.0) -> None:
        proc = self.supernodes.pop(site, None)
        if proc is not None:
            self.signalled.update(stop_tree(proc, grace=grace))

    # -- runs --------------------------------------------------------------------------
    def write_config(self, overrides: Iterable[str] = ()) -> Path:
        """``output_dir/config.yaml``: the config the ServerApp composes (``overrides`` applied)."""
        cfg = with_overrides(self.cfg, list(overrides)) if overrides else self.cfg
        path = self.out / "config.yaml"
        path.write_text(config_to_yaml(cfg))
        return path

    def submit(self, overrides: Iterable[str] = ()) -> int:
        """``flwr run`` the app with ``config.yaml`` (``overrides`` applied, e.g. ``resume=true``)."""
        from fcl_flower.runner import app_dir

        config_file = self.write_config(overrides)
        (self.out / "summary.json").unlink(missing_ok=True)
        if self.app_snapshot is None:
            self.app_snapshot = snapshot_app(self.app or app_dir(), self.root / "app")
        run_id = submit_run(self.app_snapshot, CONNECTION, self.cli_env, {"config-file": str(config_file), "overrides": ""})
        self.echo(f"[deploy] submitted run {run_id}")
        return run_id

    def status(self, run_id: int) -> str:
        return run_status(run_id, CONNECTION, self.cli_env)

    def follow(self, run_id: int, timeout: float | None = None, echo: Callable[[str], None] | None = None) -> str:
        """Stream the run's log to ``logs/run.log`` until it finishes; return its status."""
        from fcl_flower.runner import progress_filter, run_time_budget

        budget = timeout or float(self.cfg.deploy.run_timeout) or run_time_budget(self.cfg)
        return follow_run(run_id, CONNECTION, self.cli_env, self.logs / "run.log", budget, echo=echo or progress_filter, poll=5.0)

    def stop_stale_runs(self) -> list[int]:
        """``flwr stop`` runs that a stopped SuperLink left 'running' in its database."""
        out = self.cli(["list", CONNECTION, "--format", "json"], timeout=60)
        stopped = []
        for run in json.loads(out[out.index("{"):]).get("runs", []):
            if str(run.get("status", "")).split(":")[0] in ACTIVE_STATES:
                self.cli(["stop", str(run["run-id"]), CONNECTION, "--format", "json"], timeout=60)
                stopped.append(int(run["run-id"]))
        for run_id in stopped:
            self.echo(f"[deploy] stopped stale run {run_id} left by a previous SuperLink")
        return stopped

    def records(self) -> list[dict]:
        """The ServerApp's ``rounds.jsonl`` records so far."""
        path = self.out / "rounds.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_for_round(self, server_round: int, timeout: float) -> list[dict]:
        """Block until ``rounds.jsonl`` holds ``server_round``; return the records."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            if any(r.get("round") == server_round for r in records):
                return records
            if self.superlink is None or not self.superlink.alive():
                raise FlowerProcessError(f"the SuperLink died before round {server_round} was recorded")
            time.sleep(1.0)
        raise FlowerProcessError(f"round {server_round} was not recorded within {timeout:.0f} s")

    def completed(self) -> bool:
        """True if the ServerApp wrote ``summary.json`` with ``completed: true``."""
        summary = self.out / "summary.json"
        try:
            return json.loads(summary.read_text()).get("completed") is True
        except (OSError, ValueError):
            return False

    def stop_all(self) -> None:
        """Stop every SuperNode and the SuperLink this object started (by PID)."""
        for site in list(self.supernodes):
            self.stop_supernode(site, grace=5)
        self.stop_superlink(grace=10)

    def survivors(self) -> list[int]:
        """PIDs this deployment stopped that are still alive (should be none)."""
        def flower_process(pid: int) -> bool:  # guards against a PID reused by someone else
            try:
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:
                return True
            return b"flwr" in cmdline or b"flower" in cmdline

        return sorted(p for p in self.signalled if is_alive(p) and flower_process(p))

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def snapshot_app(src: Path, dest: Path) -> Path:
    """Copy the files of the Flower app in ``src`` that its FAB would hold into ``dest``."""
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk  # the same selection `flwr run` makes

    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(Path(src))))
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in fab.namelist():
        if not name.startswith(".info/") and ".." not in Path(name).parts:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fab.read(name))
    return dest


def wait_for_log(
    path: Path, offset: int, markers: Sequence[str], process: ManagedProcess, timeout: float
) -> str | None:
    """Wait until a marker appears in ``path`` after ``offset``; None if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _tail(path, offset, limit=None)
        for marker in markers:
            if marker in text:
                return marker
        if not process.alive():
            return None
        time.sleep(0.3)
    return None


def _tail(path: Path, offset: int, limit: int | None = 600) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text if limit is None else " ".join(text[-limit:].split())


# -- the command -----------------------------------------------------------------------
def prepare_local(cfg: DictConfig, sites: int | None = None) -> tuple[DictConfig, dict[str, Path]]:
    """The run's config (absolute ``output_dir``, data generated) and each site's data folder."""
    from fcl_flower.server_app import prepare_run
    from fcl_flower.site import resolve_data_root

    if sites is not None:
        cfg = with_overrides(cfg, [f"sites={sites}"])
    cfg = resolve_data_root(prepare_run(cfg))  # the demo's site folders, generated on first use
    return cfg, site_data_dirs(cfg, cfg.sites)


def deploy_local(cfg: DictConfig, sites: int | None = None) -> int:
    """Run ``cfg`` on a local TLS + node-auth deployment; 0 if it completed with outputs."""
    cfg, data_dirs = prepare_local(cfg, sites)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[fcl] {cfg.method} on {cfg.sites} SuperNodes (TLS + SuperNode auth), {cfg.rounds} rounds; outputs in {out}", flush=True)
    status = "not started"
    deployment = LocalDeployment(cfg, data_dirs)
    try:
        deployment.start_superlink()
        if cfg.resume:
            deployment.stop_stale_runs()
        deployment.register_all()
        deployment.start_supernodes()
        run_id = deployment.submit()
        status = deployment.follow(run_id)
    except FlowerProcessError as exc:
        print(f"fcl-flower: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("fcl-flower: interrupted; resume with the same output_dir and resume=true", file=sys.stderr)
        status = "interrupted"
    finally:
        deployment.stop_all()
    if report_outcome(status, deployment.completed(), out / "logs"):
        return 1
    print(f"[fcl] run complete; metrics in {out / 'rounds.jsonl'}, summary in {out / 'summary.json'}", flush=True)
    return 0


__all__ = ["LocalDeployment", "deploy_local", "prepare_local", "snapshot_app", "site_data_dirs"]
