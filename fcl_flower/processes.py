"""Start, watch and stop the Flower processes of a run: SuperLink, SuperNodes, the CLI.

Everything here is process plumbing shared by ``fcl-flower simulate`` and
``fcl-flower deploy-local``: processes start in their own session so that the whole
tree (ServerApp, Ray workers, ClientApps) is stopped by PID, each run gets a private
``FLWR_HOME``, and the state of a run is read from ``flwr list`` because Flower's own
exit codes do not say whether a run failed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

BIN_DIR = Path(sys.executable).parent


class FlowerProcessError(RuntimeError):
    """A Flower process did not start, or a run could not be submitted or followed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for every Flower process of a run: private home, offline, no uv sync."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        RAY_DEDUP_LOGS="0",
    )
    return env


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None = None
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, made the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections; fail early if ``process`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise FlowerProcessError(f"process {process.args[0]} exited with {process.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerProcessError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@dataclass
class ManagedProcess:
    """A child process in its own session, logging to a file, stopped with its whole tree."""

    name: str
    args: Sequence[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = None
    popen: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            list(self.args), env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:  # children that outlive the leader still belong to the group
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=grace)


def flwr_cli(args: Sequence[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 120) -> str:
    """Run ``flwr ARGS`` and return its stdout; raise with its output when it fails."""
    proc = subprocess.run(
        [str(BIN_DIR / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise FlowerProcessError(f"flwr {' '.join(args[:2])} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def submit_run(
    app_dir: Path, connection: str, env: dict[str, str], run_config: dict[str, str],
    federation_config: dict[str, int | float] | None = None,
) -> int:
    """``flwr run`` the app in ``app_dir`` and return the run id (the JSON output is checked)."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    if run_config:
        args += ["--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={v}" for k, v in federation_config.items())]
    out = flwr_cli(args, env, cwd=app_dir)
    payload = json.loads(out[out.index("{"):])
    if not payload.get("success") or payload.get("run-id") is None:
        raise FlowerProcessError(f"flwr run did not start a run: {payload}")
    return int(payload["run-id"])


def run_status(run_id: int, connection: str, env: dict[str, str]) -> str:
    """The run's status text from ``flwr list``, e.g. ``running`` or ``finished:completed``."""
    out = flwr_cli(["list", connection, "--run-id", str(run_id), "--format", "json"], env, timeout=60)
    runs = json.loads(out[out.index("{"):]).get("runs", [])
    if not runs:
        raise FlowerProcessError(f"flwr list knows no run {run_id}")
    return str(runs[0]["status"])


def follow_run(
    run_id: int, connection: str, env: dict[str, str], log_path: Path, timeout: float,
    echo: Callable[[str], None] | None = None, poll: float = 2.0,
) -> str:
    """Stream the run's log into ``log_path`` (passing each line to ``echo``) until it ends.

    Returns the final status text; ``timed-out`` if it did not end within ``timeout`` s.
    """
    streamer = ManagedProcess(
        "flwr-log", [str(BIN_DIR / "flwr"), "log", str(run_id), connection, "--stream"], env, log_path
    )
    streamer.log_path.parent.mkdir(parents=True, exist_ok=True)
    streamer.popen = subprocess.Popen(
        list(streamer.args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    pump = threading.Thread(target=_pump, args=(streamer.popen.stdout, log_path, echo), daemon=True)
    pump.start()
    deadline = time.monotonic() + timeout
    status = "timed-out"
    try:
        while time.monotonic() < deadline:
            current = run_status(run_id, connection, env)
            if current.startswith("finished"):
                status = current
                break
            time.sleep(poll)
        time.sleep(1.0)  # let the last lines of the log arrive
    finally:
        streamer.stop(grace=5)
        pump.join(timeout=5)
    return status


def _pump(stream: TextIO, log_path: Path, echo: Callable[[str], None] | None) -> None:
    with open(log_path, "a") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if echo is not None:
                echo(line.rstrip("\n"))
