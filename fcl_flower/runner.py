"""``fcl-flower simulate``: one command for a whole run on Flower's Ray simulation engine.

It resolves the run (absolute ``output_dir``, synthetic data generated on first use),
starts a private SuperLink with runtime dependency installation off, submits the app
with ``flwr run``, streams the run's own one-line-per-round progress, stops everything
it started, and exits non-zero unless the run completed *and* wrote its summary
(Flower's exit codes do not say whether a run failed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

from fcl_flower.config import config_to_yaml
from fcl_flower.site import resolve_data_root
from fcl_flower.processes import (
    BIN_DIR, FlowerProcessError, ManagedProcess, flower_env, follow_run, free_port, report_outcome, submit_run,
    wait_for_port, write_connection,
)

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "local-simulation"


def progress_filter(line: str) -> None:
    """Echo the run's own round lines, and Flower's warnings and errors, to the console."""
    if "[fcl]" in line:
        print(line[line.index("[fcl]"):], flush=True)
    elif "ERROR" in line or "WARNING" in line:
        print(line, flush=True)


def app_dir() -> Path:
    """The Flower app to submit: the checkout this package is installed from."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise FlowerProcessError(f"{APP_DIR} has no pyproject.toml: install fcl-flower from its checkout (pip install -e .)")
    return APP_DIR


# What a completed run may have written, in the order the closing line names them (curves.png: every
# run; finetune/: the fine-tuning stage; the rest: pre-training).
RUN_OUTPUTS = ("rounds.jsonl", "rounds.csv", "curves.png", "checkpoints/", "encoder.pt", "finetune/")


def run_time_budget(cfg: DictConfig) -> float:
    """Seconds a run may take before its runner gives up (a watchdog bound, not an estimate).

    600 s to start, each pre-training round at ``federation.round_timeout`` (1 h when none), and
    the fine-tuning stage's ``stage_time_budget``.
    """
    from fcl_flower.finetune_stage import stage_time_budget

    budget = 600.0
    if "pretrain" in cfg.stages:
        budget += cfg.rounds * float(cfg.federation.round_timeout or 3600)
    if "finetune" in cfg.stages:
        budget += stage_time_budget(cfg)
    return budget


def simulate(cfg: DictConfig) -> int:
    """Run ``cfg`` on the Ray simulation engine; 0 if it completed and wrote its outputs."""
    from fcl_flower.server_app import prepare_run

    cfg = resolve_data_root(prepare_run(cfg))  # generate the built-in data before Flower starts
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.yaml"
    config_file.write_text(config_to_yaml(cfg))
    summary = out / "summary.json"
    summary.unlink(missing_ok=True)

    flwr_home = out / ".flwr"
    env = flower_env(flwr_home)
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}")
    superlink = ManagedProcess(
        "superlink",
        [str(BIN_DIR / "flower-superlink"), "--simulation", "--insecure",
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
        env, out / "logs" / "superlink.log", cwd=out,
    )
    print(f"[fcl] {cfg.method} on {cfg.sites} simulated sites, {cfg.rounds} rounds; data {cfg.data.root}", flush=True)
    status = "not started"
    try:
        superlink.start()
        wait_for_port("127.0.0.1", port, timeout=120, process=superlink.popen)
        run_id = submit_run(
            app_dir(), CONNECTION, env, {"config-file": str(config_file), "overrides": ""},
            {
                "num-supernodes": cfg.sites,
                "client-resources-num-cpus": cfg.federation.client_cpus,
                "client-resources-num-gpus": cfg.federation.client_gpus,
            },
        )
        status = follow_run(run_id, CONNECTION, env, out / "logs" / "run.log", run_time_budget(cfg), echo=progress_filter)
    except FlowerProcessError as exc:
        print(f"fcl-flower: {exc}", file=sys.stderr)
    finally:
        superlink.stop()
    completed = summary.is_file() and json.loads(summary.read_text()).get("completed") is True
    if report_outcome(status, completed, out / "logs"):
        return 1
    written = [name for name in RUN_OUTPUTS if (out / name.rstrip("/")).exists()]
    print(f"[fcl] outputs in {out}: {', '.join(written)}", flush=True)
    return 0
