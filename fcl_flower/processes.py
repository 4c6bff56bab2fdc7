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
import re
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
ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception): \S")  # a traceback's last line


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

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> list[int]:
        """Stop the process and every descendant (``stop_tree``); returns the PIDs signalled."""
        return stop_tree(self, grace=grace, sig=sig)


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_tree(process: ManagedProcess, grace: float = 10.0, sig: int = signal.SIGTERM) -> list[int]:
    """Stop ``process``, its process group and every descendant's process group, by PID.

    The tree is collected before signalling (orphans are re-parented to init once their
    parent dies); whatever is still alive after ``grace`` seconds gets SIGKILL. Returns
    the PIDs it signalled.
    """
    if process.popen is None:
        return []
    pids = [process.pid, *descendants(process.pid)]
    own_group = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(own_group)

    def signal_all(s: int) -> None:
        for group in groups:
            try:
                os.killpg(group, s)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, s)
            except (ProcessLookupError, PermissionError):
                pass

    signal_all(sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.popen.poll()
        if not any(is_alive(p) for p in pids):
            break
        time.sleep(0.2)
    if any(is_alive(p) for p in pids):
        signal_all(signal.SIGKILL)
    try:
        process.popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    return pids


# -- the deployment -------------------------------------------------------------------


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
    echo: Callable[[str], None] | None = None, poll: float = 5.0,
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


def last_error(log: Path) -> str | None:
    """The last Python exception line (``SomeError: message``) of a run's log, or None."""
    if not log.is_file():
        return None
    errors = [line.strip() for line in log.read_text(errors="replace").splitlines() if ERROR_LINE.match(line.strip())]
    return errors[-1] if errors else None


def report_outcome(status: str, completed: bool, logs: Path) -> int:
    """0 if the run finished completed *and* wrote its summary; else say why on stderr, 1.

    The reason includes the last exception the run's log (``logs/run.log``) shows, if any.
    """
    if status == "finished:completed" and completed:
        return 0
    error = last_error(logs / "run.log")
    print(
        f"fcl-flower: run did not complete (status {status}, summary {'complete' if completed else 'missing'})"
        + (f"; last error: {error}" if error else "") + f"; see {logs}", file=sys.stderr,
    )
    return 1

