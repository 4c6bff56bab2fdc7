"""Benchmark suite: trainer overhead, round time, relay bytes, simulation scale, deployment start-up.

One command measures everything on this machine, in one run, and writes
``docs/BENCHMARKS.md`` (machine, versions, the command, tables) and
``docs/benchmarks.json`` (the figures). Timings on a shared machine are noisy, so every
target is a ratio of two things measured back to back in the same run.

    fcl-flower bench                        # full: tens of minutes on 2 shared cores
    fcl-flower bench --quick                # CI size, a few minutes; its numbers mean nothing
    python simulations/benchmark.py --quick --out-dir /tmp/bench --work-dir /tmp/bench-work
    fcl-flower bench --sections bytes,deploy   # some sections only (the others are left out)
    fcl-flower bench --sections deploy --update   # re-measure one section, keep the others' results

Sections (``--sections``):

1. ``trainer``: ``pretrain_round`` against a minimal plain-PyTorch MoCo loop
   (``simulations/bench_trainer.py``), slices/s in CPU and wall time.
2. ``round``: wall time per federated round of FCL against federated MoCo (the same
   contrastive model, ``relay.enabled=false pretrain.use_feature_exchange=false``), both
   ``fcl-flower simulate`` with the defaults but ``rounds``; round 1 (Ray start-up) is left out.
3. ``bytes``: bytes per site and round, weights and banks, up and down, with the real
   ``FeatureExchange`` strategy in process on real-size banks (``pretrain.queue_size`` x
   ``model.proj_dim``) and the default model's weights, for the paper's all-to-all relay
   (``relay.max_rows_per_site=0 relay.float16=false``, no total cap) and the
   defaults; cross-checked byte for byte against the FCL simulation of section 2.
4. ``scale``: ``fcl-flower simulate sites=N`` for N = 10, 50, 100 with few patients per
   site: time per round and the peak memory of every process of the run together
   (``fcl-flower simulate``, SuperLink, ServerApp, Ray, ClientApp actors), sampled from
   ``/proc`` every 0.5 s.
5. ``deploy``: a real TLS + node-auth deployment (``LocalDeployment``): per fit message,
   the time from the ClientApp process start to the first training step
   (``startup_seconds``) against the training time of the round (``seconds``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("trainer", "round", "bytes", "scale", "deploy")
REQUIRED_KEYS = (
    "trainer_overhead_ratio", "round_time_ratio_fcl_vs_fedmoco", "bank_download_bytes_per_site",
    "weight_download_bytes_per_site", "peak_rss_gb_100_sites", "deploy_startup_fraction",
)
TARGETS = {
    "trainer_overhead_ratio": ("<", 1.10, "plain-loop slices/s over trainer slices/s (CPU time)"),
    "round_time_ratio_fcl_vs_fedmoco": ("<=", 1.15, "FCL over federated MoCo, seconds per round (rounds >= 2)"),
    "bank_to_weight_download_ratio": ("<", 0.10, "relayed bank download over weight download per site and round, defaults"),
    "peak_rss_gb_100_sites": ("<", 8.0, "sum of RSS of all processes of the run, GB"),
    "deploy_startup_fraction": ("<", 0.20, "ClientApp start-up over the round's training time, median of fit messages"),
}
FEDMOCO = ["relay.enabled=false", "pretrain.use_feature_exchange=false"]


def all_to_all() -> list[str]:
    """Overrides of the paper's relay: every row of every other site's bank, float32."""
    from fcl_flower.config import load_config

    extra = ["relay.max_remote_rows=0"] if "max_remote_rows" in load_config().relay else []
    return ["relay.max_rows_per_site=0", *extra, "relay.float16=false"]


GB = 1024**3


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark mode."""

    name: str
    base: tuple[str, ...] = ()  # overrides applied to every config of the suite
    trainer: dict[str, int] = field(default_factory=dict)  # bench_trainer.measure keywords
    round_sites: int = 10
    round_rounds: int = 4
    round_repeats: int = 2  # runs of each method, in ABBA order
    bytes_sites: tuple[int, ...] = (10, 50)
    scale_sites: tuple[int, ...] = (10, 50, 100)
    scale_rounds: int = 3
    scale_patients: int = 3  # 2 would leave no held-out patient (holdout_fraction 0.2), and evaluation crashes
    deploy_sites: int = 3
    deploy_rounds: int = 3
    deploy_extra: tuple[str, ...] = ()
    anatomy_repeats: int = 3


FULL = Profile("full", trainer={"volumes": 20, "depth": 10, "repeats": 3})
QUICK = Profile(
    "quick",
    base=(
        "synthetic.image_size=48", "data.image_size=[32,32]", "data.target_spacing=[3.0,3.0]",
        "model.channels=[8,16,32]", "model.proj_hidden=32", "model.proj_dim=16", "pretrain.queue_size=64",
        "pretrain.bank_sample_size=64", "federation.round_timeout=300", "synthetic.patients_per_site=3",
    ),
    trainer={"volumes": 4, "depth": 4, "repeats": 1, "remote_rows": 64},
    round_sites=2, round_rounds=2, round_repeats=1, bytes_sites=(10, 50), scale_sites=(), scale_rounds=2, scale_patients=2,
    deploy_sites=2, deploy_rounds=1, deploy_extra=("federation.fraction_evaluate=0.0",), anatomy_repeats=1,
)


# ------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return float("nan")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, load average and library versions."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(_mem_total_gb(), 1),
        "load_average_start": load_average(),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(),
                     **{name: _version(name) for name in ("torch", "flwr", "monai", "ray", "numpy")}},
    }


# ------------------------------------------------------------------------------ memory
PAGE = os.sysconf("SC_PAGE_SIZE")


HZ = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, int, int, str, float]]:
    """pid -> (ppid, process group, session, comm, CPU seconds incl. reaped children) of every live process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        cpu = sum(int(x) for x in fields[11:15]) / HZ  # utime, stime, cutime, cstime
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[3]), comm, cpu)
    return table


def _rss_pss(pid: int) -> tuple[int, int]:
    """Resident and proportional set size of ``pid`` in bytes (0, 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0, 0
    pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pss = rss
    return rss, pss


class TreeMemory(threading.Thread):
    """Samples the memory of a process tree every ``interval`` s until stopped.

    The tree is ``root`` and its descendants, plus every process sharing a session or a
    process group with one of them (Flower and Ray start children in sessions of their
    own; a child whose parent exits is re-parented but keeps its session). Records the
    peak of the summed RSS (what ``ps`` shows; shared pages count once per process) and of
    the summed PSS (shared pages split among the processes mapping them), and which
    processes made up the RSS peak.
    """

    def __init__(self, root: int, interval: float = 0.5, rounds_file: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.rounds_file = rounds_file
        self.cpu_at_round: dict[int, float] = {}  # records in rounds_file -> CPU seconds of the tree then
        self.interval = interval
        self.stop_event = threading.Event()
        self.groups: set[int] = set()
        self.sessions: set[int] = set()
        self.own = (os.getpgrp(), os.getsid(0))
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes: list[tuple[str, int]] = []
        self.max_processes = 0
        self.samples = 0
        self.cpu = 0.0

    def members(self) -> dict[int, str]:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_) in table.items():
            children.setdefault(ppid, []).append(pid)
        tree = {self.root} if self.root in table else set()
        todo = list(tree)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in tree:
                    tree.add(child)
                    todo.append(child)
        for pid in tree:
            _, pgrp, sid, *_ = table[pid]
            if pgrp != self.own[0]:
                self.groups.add(pgrp)
            if sid != self.own[1]:
                self.sessions.add(sid)
        members = {
            pid: (comm, cpu) for pid, (_, pgrp, sid, comm, cpu) in table.items()
            if pid in tree or pgrp in self.groups or sid in self.sessions
        }
        # CPU of the federation itself: not the driver nor its `flwr list/log/run` polling.
        self.cpu = sum(cpu for pid, (comm, cpu) in members.items() if pid != self.root and comm != "flwr")
        return {pid: comm for pid, (comm, _) in members.items()}

    def _rounds_done(self) -> int:
        try:
            with open(self.rounds_file, "rb") as fh:  # type: ignore[arg-type]
                return fh.read().count(b"\n")
        except (OSError, TypeError):
            return 0

    def sample(self) -> None:
        done = self._rounds_done()  # before the CPU reading: a round's CPU is never read too early
        members = self.members()
        if done and done not in self.cpu_at_round:
            self.cpu_at_round[done] = self.cpu
        sizes = {pid: _rss_pss(pid) for pid in members}
        rss = sum(r for r, _ in sizes.values())
        pss = sum(p for _, p in sizes.values())
        self.samples += 1
        self.max_processes = max(self.max_processes, len(members))
        self.peak_pss = max(self.peak_pss, pss)
        if rss > self.peak_rss:
            self.peak_rss = rss
            by_name: dict[str, int] = {}
            for pid, (r, _) in sizes.items():
                by_name[members[pid]] = by_name.get(members[pid], 0) + r
            self.peak_processes = sorted(by_name.items(), key=lambda kv: -kv[1])

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.sample()
            except Exception:  # a process vanishing mid-read must not end the sampling
                pass
            self.stop_event.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join(timeout=10)
        marks = sorted(self.cpu_at_round.items())
        return {
            "round_cpu_seconds": [b - a for (_, a), (_, b) in zip(marks, marks[1:])],  # rounds 2, 3, ...
            "peak_rss_gb": self.peak_rss / GB,
            "peak_pss_gb": self.peak_pss / GB,
            "max_processes": self.max_processes,
            "samples": self.samples,
            "peak_rss_by_process_gb": {name: round(size / GB, 3) for name, size in self.peak_processes[:8]},
        }


# ------------------------------------------------------------------------------ helpers
def _overrides(profile: Profile, work: Path, *extra: str) -> list[str]:
    return [*profile.base, *extra]


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def simulate(overrides: Sequence[str], out: Path, log: Path, echo: Callable[[str], None], timeout: float) -> dict[str, Any]:
    """``fcl-flower simulate OVERRIDES output_dir=OUT`` as a child process, memory sampled.

    Returns the command, exit code, wall time, the per-round records, round times (all,
    and rounds >= 2) and the memory peaks of the whole process tree.
    """
    import shutil

    if out.exists():
        shutil.rmtree(out)
    cmd = [str(Path(sys.executable).parent / "fcl-flower"), "simulate", *overrides, f"output_dir={out}"]
    echo(f"  $ {' '.join(shlex.quote(c) for c in cmd[1:])}")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO)
        memory = TreeMemory(proc.pid, rounds_file=out / "rounds.jsonl")
        memory.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            code = proc.wait(timeout=60)
        finally:
            mem = memory.stop()
    wall = time.perf_counter() - t0
    records = [r for r in _records(out) if r.get("stage") == "pretrain"]
    seconds = [float(r["seconds"]) for r in records]
    later = [float(r["seconds"]) for r in records if r["round"] >= 2]
    result = {
        "command": "fcl-flower simulate " + " ".join(shlex.quote(o) for o in overrides),
        "output_dir": str(out), "exit_code": code, "wall_seconds": wall, "records": records,
        "round_seconds": seconds, "mean_round_seconds_after_first": _mean(later),
        "median_round_seconds_after_first": _median(later), "memory": mem,
    }
    if code != 0:
        echo(f"  ! exit code {code}; see {log}")
    return result


def _site_values(records: list[dict[str, Any]], key: str, min_round: int = 1) -> list[float]:
    return [float(s[key]) for r in records if r["round"] >= min_round for s in r["sites"].values() if key in s]


# ------------------------------------------------------------------------------ 1. trainer
def bench_trainer_section(profile: Profile, echo: Callable[[str], None]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "simulations"))
    import bench_trainer

    report = bench_trainer.measure(list(profile.base), echo=lambda line: echo(f"  {line}"), **profile.trainer)
    sps = report["slices_per_s"]
    return {
        **report,
        "ratio_cpu": sps["plain_cpu"] / sps["trainer_cpu"],
        "ratio_wall": sps["plain"] / sps["trainer"],
    }


# ------------------------------------------------------------------------------ 2. round
def bench_round_section(profile: Profile, work: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    """FCL and federated MoCo runs in ABBA order (a drifting background load hits both alike)."""
    common = _overrides(profile, work, f"sites={profile.round_sites}", f"rounds={profile.round_rounds}")
    order = ["fcl", "fedmoco", "fedmoco", "fcl"] * ((profile.round_repeats + 1) // 2)
    order = order[: 2 * profile.round_repeats]
    runs: dict[str, list[dict[str, Any]]] = {"fcl": [], "fedmoco": []}
    for name in order:
        i = len(runs[name])
        echo(f"round time: {name} #{i + 1}, {profile.round_sites} sites, {profile.round_rounds} rounds")
        run = simulate([*common, *({"fcl": [], "fedmoco": FEDMOCO}[name])], work / f"round-{name}-{i}",
                       work / "logs" / f"round-{name}-{i}.log", echo, timeout=3600 + 600 * profile.round_rounds)
        runs[name].append(run)
        echo(f"  rounds {[round(x, 1) for x in run['round_seconds']]} s, CPU per round >= 2 "
             f"{[round(x, 1) for x in run['memory']['round_cpu_seconds']]} s; peak RSS {run['memory']['peak_rss_gb']:.2f} GB")
    pooled = {
        name: {
            "seconds_after_first": [x for run in rs for x in run["round_seconds"][1:]],
            "cpu_seconds_after_first": [x for run in rs for x in run["memory"]["round_cpu_seconds"]],
            "train_seconds_per_site": _mean([x for run in rs for x in _site_values(run["records"], "seconds", 2)]),
        }
        for name, rs in runs.items()
    }
    for entry in pooled.values():
        entry["mean"] = _mean(entry["seconds_after_first"])
        entry["median"] = _median(entry["seconds_after_first"])
        entry["cpu_mean"] = _mean(entry["cpu_seconds_after_first"])
    fcl, moco = pooled["fcl"], pooled["fedmoco"]
    return {
        "sites": profile.round_sites, "rounds": profile.round_rounds, "order": order, "runs": runs, "pooled": pooled,
        "ratio_mean": fcl["mean"] / moco["mean"],
        "ratio_median": fcl["median"] / moco["median"],
        "ratio_cpu": fcl["cpu_mean"] / moco["cpu_mean"] if moco["cpu_mean"] else float("nan"),
    }


# ------------------------------------------------------------------------------ 3. bytes
def _relay_round_bytes(cfg, n_sites: int, bank_rows: Sequence[int] | int, site_names: Sequence[str] | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """One relay round in process: round 1 stores a bank per site, round 2 relays; round 2's report.

    ``FeatureExchange.from_config`` around the configured strategy (as the ServerApp builds
    it), real ``ClientProxy`` subclasses in a ``SimpleClientManager``, ``FitRes`` carrying
    the initial weights and banks of ``bank_rows`` unit rows (float32, as clients send).
    """
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.client_manager import SimpleClientManager

    from fcl_flower import wire
    from fcl_flower.pretrain import initial_weights
    from strategies.feature_exchange import FeatureExchange
    from strategies.registry import build_strategy

    names = list(site_names or [f"site_{i:02d}" for i in range(n_sites)])
    rows = [bank_rows] * n_sites if isinstance(bank_rows, int) else list(bank_rows)
    weights = initial_weights(cfg)
    params = ndarrays_to_parameters(weights)
    fx = FeatureExchange.from_config(build_strategy(cfg, params, fit_metrics_aggregation_fn=lambda _: {}), cfg)
    manager = SimpleClientManager()
    proxies = [stub_proxy_class()(str(1000 + i)) for i in range(n_sites)]
    for proxy in proxies:
        manager.register(proxy)
    rng = np.random.default_rng(seed)
    d, s = int(cfg.model.proj_dim), int(cfg.data.num_partitions)

    def result(i: int):
        feats = rng.standard_normal((rows[i], d)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        metrics = {"site": names[i], "loss": 1.0, **wire.bank_to_metrics(feats, rng.integers(0, s, rows[i]))}
        return FitRes(Status(Code.OK, ""), params, 10, metrics)

    for server_round in (1, 2):
        instructions = fx.configure_fit(server_round, params, manager)
        assert len(instructions) == n_sites, f"the strategy sampled {len(instructions)} of {n_sites} sites"
        del instructions  # the relayed payloads (all-to-all at 50 sites: over a GB)
        fx.aggregate_fit(server_round, [(proxies[i], result(i)) for i in range(n_sites)], [])
    report = fx.last_round_report()
    assert report is not None
    return report


@functools.lru_cache(maxsize=1)
def stub_proxy_class() -> type:
    """A ``ClientProxy`` class addressed by cid only, to drive a strategy in process (flwr imported lazily)."""
    from flwr.server.client_proxy import ClientProxy

    class StubProxy(ClientProxy):
        """A real ClientProxy addressed by cid only; the relay never calls it once sites are known."""

        def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    return StubProxy


def _per_site(report: dict[str, Any]) -> dict[str, float]:
    sites = report["sites"].values()
    keys = ("down_weights_bytes", "down_bank_bytes", "up_weights_bytes", "up_bank_bytes", "remote_rows")
    return {key: _mean([float(s[key]) for s in sites]) for key in keys}


def bench_bytes_section(profile: Profile, echo: Callable[[str], None], sim: dict[str, Any] | None) -> dict[str, Any]:
    from fcl_flower.config import load_config

    out: dict[str, Any] = {"variants": {}}
    for variant, extra in (("all_to_all", all_to_all()), ("defaults", [])):
        cfg = load_config([*profile.base, *extra])
        rows = int(cfg.pretrain.queue_size)
        out["bank_rows"], out["proj_dim"] = rows, int(cfg.model.proj_dim)
        out["variants"][variant] = {"overrides": extra, "by_sites": {}}
        for n in profile.bytes_sites:
            echo(f"bytes: {variant}, {n} sites, banks of {rows} x {cfg.model.proj_dim}")
            per_site = _per_site(_relay_round_bytes(cfg, n, rows))
            out["variants"][variant]["by_sites"][str(n)] = per_site
            echo(f"  per site and round: weights down {per_site['down_weights_bytes'] / 1e6:.3f} MB, "
                 f"bank down {per_site['down_bank_bytes'] / 1e6:.3f} MB ({per_site['remote_rows']:.0f} rows), "
                 f"weights up {per_site['up_weights_bytes'] / 1e6:.3f} MB, bank up {per_site['up_bank_bytes'] / 1e6:.3f} MB")
    if sim is not None:
        out["cross_check"] = cross_check(sim, echo)
    return out


def cross_check(sim: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """Replay each round >= 2 of a simulation's relay in process with the same bank sizes; compare bytes."""
    from fcl_flower.config import load_config

    records = sim["records"]
    run_dir = Path(sim["output_dir"])
    cfg = load_config([], run_dir / "config.yaml")
    checked, mismatches = 0, []
    by_round = {r["round"]: r for r in records}
    for rnd, rec in sorted(by_round.items()):
        prev = by_round.get(rnd - 1)
        if prev is None or rnd < 2:
            continue
        names = sorted(prev["sites"])
        rows = [int(prev["sites"][n]["bank_rows"]) for n in names]
        replay = _relay_round_bytes(cfg, len(names), rows, names)
        for name in names:
            if name not in rec["sites"]:
                continue
            got, want = rec["sites"][name], replay["sites"][name]
            for key in ("down_bank_bytes", "remote_rows", "down_weights_bytes", "up_weights_bytes"):
                checked += 1
                if int(got[key]) != int(want[key]):
                    mismatches.append({"round": rnd, "site": name, "key": key, "simulation": got[key], "in_process": want[key]})
    echo(f"cross-check against the simulation: {checked} values, {len(mismatches)} mismatches")
    sim_last = by_round[max(by_round)]["sites"] if by_round else {}
    return {"values_compared": checked, "mismatches": mismatches[:20],
            "simulation_last_round_per_site": _per_site({"sites": sim_last}) if sim_last else {}}


# ------------------------------------------------------------------------------ 4. scale
def bench_scale_section(profile: Profile, work: Path, echo: Callable[[str], None],
                        reuse: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": profile.scale_rounds, "patients_per_site": profile.scale_patients, "by_sites": {}}
    if not profile.scale_sites and reuse is not None:  # quick: the round-time FCL run stands in
        out["by_sites"][str(profile.round_sites)] = _scale_entry(reuse)
        out["note"] = "quick mode: measured on the round-time FCL run"
        return out
    for n in profile.scale_sites:
        echo(f"scale: {n} sites x {profile.scale_patients} patients, {profile.scale_rounds} rounds")
        run = simulate(
            _overrides(profile, work, f"sites={n}", f"rounds={profile.scale_rounds}",
                       f"synthetic.patients_per_site={profile.scale_patients}"),
            work / f"scale-{n}", work / "logs" / f"scale-{n}.log", echo, timeout=3600 + 1200 * profile.scale_rounds,
        )
        out["by_sites"][str(n)] = _scale_entry(run)
        echo(f"  rounds {[round(s, 1) for s in run['round_seconds']]} s; peak RSS {run['memory']['peak_rss_gb']:.2f} GB, "
             f"PSS {run['memory']['peak_pss_gb']:.2f} GB, {run['memory']['max_processes']} processes")
    return out


def _scale_entry(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": run["command"], "exit_code": run["exit_code"], "wall_seconds": run["wall_seconds"],
        "round_seconds": run["round_seconds"], "mean_round_seconds_after_first": run["mean_round_seconds_after_first"],
        "failures": sum(len(r.get("failures", [])) for r in run["records"]),
        "sites_reporting_last_round": len(run["records"][-1]["sites"]) if run["records"] else 0,
        **run["memory"],
    }


# ------------------------------------------------------------------------------ 5. deploy
def bench_deploy_section(profile: Profile, work: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    import shutil

    from fcl_flower.config import load_config
    from fcl_flower.data.preprocess import load_site_volumes
    from fcl_flower.deploy import LocalDeployment, prepare_local
    from fcl_flower.site import resolve_data_root, resolve_site

    out_dir = work / "deploy"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    # The first sites of the dataset the simulations use, with its preprocessed-volume cache warm.
    data = resolve_data_root(load_config([*profile.base, f"sites={max(profile.deploy_sites, profile.round_sites)}"]))
    overrides = _overrides(profile, work, f"rounds={profile.deploy_rounds}", f"output_dir={out_dir}",
                           f"data.root={data.data.root}", f"federation.min_available_sites={profile.deploy_sites}",
                           *profile.deploy_extra)
    echo(f"deploy: {profile.deploy_sites} SuperNodes (TLS + auth), {profile.deploy_rounds} rounds")
    cfg, data_dirs = prepare_local(load_config(overrides), sites=profile.deploy_sites)
    for name, folder in data_dirs.items():
        load_site_volumes(resolve_site(cfg, {"data-dir": str(folder), "site-name": name}).records, cfg)
    deployment = LocalDeployment(cfg, data_dirs, echo=None)
    t0 = time.perf_counter()
    status = "not started"
    try:
        deployment.start_superlink()
        deployment.register_all()
        deployment.start_supernodes()
        ready = time.perf_counter() - t0
        run_id = deployment.submit()
        status = deployment.follow(run_id, timeout=1800 + 600 * profile.deploy_rounds, echo=lambda line: None)
    finally:
        deployment.stop_all()
    echo(f"  start-up anatomy: {profile.anatomy_repeats} fresh processes doing a fit as a ClientApp does")
    first = next(iter(data_dirs))
    anatomy = startup_anatomy(overrides, data_dirs[first], first, work, profile.anatomy_repeats)
    records = [r for r in deployment.records() if r.get("stage") == "pretrain"]
    fits = [
        {"round": r["round"], "site": name, "startup_seconds": s["startup_seconds"], "train_seconds": s["seconds"],
         "setup_seconds": s.get("setup_seconds")}
        for r in records for name, s in sorted(r["sites"].items()) if "startup_seconds" in s
    ]
    startup = [f["startup_seconds"] for f in fits]
    train = [f["train_seconds"] for f in fits]
    fractions = [f["startup_seconds"] / f["train_seconds"] for f in fits if f["train_seconds"] > 0]
    echo(f"  status {status}; startup median {_median(startup):.2f} s, training median {_median(train):.2f} s")
    return {
        "command": "LocalDeployment(" + " ".join(overrides) + f", sites={profile.deploy_sites})",
        "status": status, "federation_ready_seconds": ready, "fits": fits,
        "round_seconds": [r["seconds"] for r in records],
        "median_startup_seconds": _median(startup), "median_train_seconds": _median(train),
        "startup_fraction": _median(startup) / _median(train) if train else float("nan"),
        "median_of_fractions": _median(fractions), "anatomy": anatomy,
    }


# What a fresh ClientApp process spends before its first training step, stage by stage: the same
# imports in the same order as `flwr-clientapp` (Flower first, then the app), then the client's fit.
def _anatomy_script() -> str:
    return """
import json, sys, time
t = [time.time()]; c = [time.process_time()]
def mark():
    t.append(time.time()); c.append(time.process_time())
import flwr.supernode.cli.flwr_clientapp; mark() # what the `flwr-clientapp` process imports before the app
from fcl_flower import client_app; mark()        # the ClientApp module
import torch; mark()
import monai.networks.blocks; mark()
import torch._dynamo; mark()                     # first use of torch.optim imports it
started = client_app.message_start_time()
from fcl_flower.config import config_to_yaml, load_config
from fcl_flower.pretrain import initial_weights
args = json.loads(sys.argv[1])
cfg = load_config(args["overrides"])
message = {"config": config_to_yaml(cfg), "stage": "pretrain", "round": 1}
weights = initial_weights(cfg)
node = {"data-dir": args["data_dir"], "site-name": args["site"], "state-dir": args["state_dir"]}
c_fit = time.process_time(); t_fit = time.time()
_, _, m = client_app.StageClient(node, started=started).fit(weights, message)
names = ["interpreter", "flwr_clientapp", "app_module", "torch", "monai", "torch_dynamo"]
wall = [t[0] - started] + [b - a for a, b in zip(t, t[1:])]
cpu = [c[0]] + [b - a for a, b in zip(c, c[1:])]
before = m["startup_seconds"] - (t_fit - started)  # inside fit: config, site, cached data, model, state
print(json.dumps({"wall": dict(zip(names, wall)), "cpu": dict(zip(names, cpu)), "startup_seconds": sum(wall) + before,
                  "fit_before_training": before, "setup_seconds": m["setup_seconds"],
                  "train_seconds": m["seconds"]}))
"""


def startup_anatomy(cfg_overrides: list[str], data_dir: Path, site: str, work: Path, repeats: int) -> dict[str, Any]:
    """Fresh processes doing what a deployed ClientApp does for a fit message; medians per stage."""
    import shutil

    runs = []
    for i in range(repeats):
        state = work / f"anatomy-{i}"
        if state.exists():
            shutil.rmtree(state)
        payload = {"overrides": [*cfg_overrides, f"output_dir={work / 'anatomy-run'}"], "data_dir": str(data_dir),
                   "site": site, "state_dir": str(state)}
        proc = subprocess.run([sys.executable, "-c", _anatomy_script(), json.dumps(payload)], capture_output=True,
                              text=True, timeout=900, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"start-up anatomy failed: {proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {
        kind: {stage: _median([r[kind][stage] for r in runs]) for stage in runs[0][kind]} for kind in ("wall", "cpu")
    }
    for key in ("startup_seconds", "fit_before_training", "setup_seconds", "train_seconds"):
        med[key] = _median([r[key] for r in runs])
    med["repeats"] = repeats
    return med


# ------------------------------------------------------------------------------ report
def summary_keys(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures under the keys of docs/benchmarks.json."""
    out: dict[str, Any] = {}
    if "trainer" in results:
        out["trainer_overhead_ratio"] = results["trainer"]["ratio_cpu"]
        out["trainer_overhead_ratio_wall"] = results["trainer"]["ratio_wall"]
    if "round" in results:
        out["round_time_ratio_fcl_vs_fedmoco"] = results["round"]["ratio_mean"]
        out["round_time_ratio_fcl_vs_fedmoco_median"] = results["round"]["ratio_median"]
        out["round_cpu_ratio_fcl_vs_fedmoco"] = results["round"]["ratio_cpu"]
    if "bytes" in results:
        variants = results["bytes"]["variants"]
        defaults, a2a = variants["defaults"]["by_sites"], variants["all_to_all"]["by_sites"]
        out["bank_download_bytes_per_site"] = {n: int(v["down_bank_bytes"]) for n, v in defaults.items()}
        out["bank_download_bytes_per_site_all_to_all"] = {n: int(v["down_bank_bytes"]) for n, v in a2a.items()}
        first = next(iter(defaults.values()))
        out["weight_download_bytes_per_site"] = int(first["down_weights_bytes"])
        out["bank_upload_bytes_per_site"] = int(first["up_bank_bytes"])
        out["bank_to_weight_download_ratio"] = max(v["down_bank_bytes"] for v in defaults.values()) / first["down_weights_bytes"]
    if "scale" in results and results["scale"]["by_sites"]:
        by = results["scale"]["by_sites"]
        largest = max(by, key=int)
        out["peak_rss_gb_100_sites"] = by[largest]["peak_rss_gb"]
        out["scale_runs_completed"] = all(v["exit_code"] == 0 for v in by.values())
        out["peak_pss_gb_100_sites"] = by[largest]["peak_pss_gb"]
        out["peak_rss_sites_measured"] = int(largest)
        out["round_seconds_by_sites"] = {n: v["mean_round_seconds_after_first"] for n, v in by.items()}
    if "deploy" in results:
        out["deploy_startup_fraction"] = results["deploy"]["startup_fraction"]
        out["deploy_median_startup_seconds"] = results["deploy"]["median_startup_seconds"]
        out["deploy_median_train_seconds"] = results["deploy"]["median_train_seconds"]
    return out


def _verdict(key: str, value: float) -> str:
    op, bound, _ = TARGETS[key]
    ok = value < bound if op == "<" else value <= bound
    return "met" if ok else "**missed**"


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


BEGIN, END = "<!-- benchmark.py: generated from here -->", "<!-- benchmark.py: generated up to here -->"


def _trainer_md(t: dict[str, Any]) -> list[str]:
    """Section 1 of BENCHMARKS.md from the ``trainer`` results."""
    c = t["config"]
    return [
        "## 1. Trainer throughput",
        "",
        f"`pretrain_round` (the whole call: model build, state load and save included) against a minimal "
        f"plain-PyTorch MoCo loop ({c['volumes']} volumes x {c['depth']} slices of {c['image_size'][0]}x"
        f"{c['image_size'][1]}, batches of {c['batch_slices']} slices, {c['optimizer']}, a {c['bank_rows']}-row "
        f"bank, {c['threads']} thread; median of {c['repeats']} alternating repeats; `simulations/bench_trainer.py`).",
        "",
        "| | slices/s (CPU time) | slices/s (wall) |",
        "|---|---|---|",
        f"| `pretrain_round` | {t['slices_per_s']['trainer_cpu']:.1f} | {t['slices_per_s']['trainer']:.1f} |",
        f"| plain loop | {t['slices_per_s']['plain_cpu']:.1f} | {t['slices_per_s']['plain']:.1f} |",
        f"| sampling + augmentation alone | | {t['slices_per_s']['sampler']:.0f} |",
        f"| **plain / trainer** | **{t['ratio_cpu']:.3f}** | {t['ratio_wall']:.3f} |",
        "",
    ]


def _round_md(rr: dict[str, Any]) -> list[str]:
    """Section 2 of BENCHMARKS.md from the ``round`` results."""
    lines = [
        "## 2. Round time: FCL against federated MoCo",
        "",
        f"{rr['sites']} simulated sites, {rr['rounds']} rounds, defaults otherwise; runs in the order "
        f"{', '.join(rr['order'])}. Wall time is the `seconds` of `rounds.jsonl` (configure, fit on every site, "
        "aggregate, evaluate); round 1 (Ray start-up, preprocessing) is left out. CPU time is that of every "
        "process of the federation (SuperLink, ServerApp, Ray, ClientApp actors) over the same rounds, read "
        "from `/proc`; it hardly depends on what else the machine runs.",
        "",
        "| run | command | wall s per round (round 1, 2, ...) | CPU s per round (2, ...) | peak RSS GB |",
        "|---|---|---|---|---|",
    ]
    for name, rs in rr["runs"].items():
        for i, run in enumerate(rs):
            lines.append(
                f"| {name} #{i + 1} | `{run['command']}` | {', '.join(f'{x:.1f}' for x in run['round_seconds'])} | "
                f"{', '.join(f'{x:.1f}' for x in run['memory']['round_cpu_seconds'])} | {run['memory']['peak_rss_gb']:.2f} |"
            )
    lines += [
        "",
        "| | FCL | federated MoCo | FCL / federated MoCo |",
        "|---|---|---|---|",
    ]
    fp, mp = rr["pooled"]["fcl"], rr["pooled"]["fedmoco"]
    lines += [
        f"| wall s per round, mean of rounds >= 2 | {fp['mean']:.1f} | {mp['mean']:.1f} | **{rr['ratio_mean']:.3f}** |",
        f"| wall s per round, median | {fp['median']:.1f} | {mp['median']:.1f} | {rr['ratio_median']:.3f} |",
        f"| CPU s per round, mean | {fp['cpu_mean']:.1f} | {mp['cpu_mean']:.1f} | {rr['ratio_cpu']:.3f} |",
        f"| training s per site (`seconds` metric), mean | {fp['train_seconds_per_site']:.2f} | "
        f"{mp['train_seconds_per_site']:.2f} | {fp['train_seconds_per_site'] / mp['train_seconds_per_site']:.3f} |",
        "",
    ]
    return lines


def _bytes_md(b: dict[str, Any], round_sites: Any) -> list[str]:
    """Section 3 of BENCHMARKS.md from the ``bytes`` results; ``round_sites``: the sites of section 2's runs."""
    lines = [
        "## 3. Bytes per site and round",
        "",
        f"The real `FeatureExchange` strategy in process (`configure_fit` / `aggregate_fit`, real `ClientProxy` "
        f"subclasses), banks of {b['bank_rows']} x {b['proj_dim']} float32 unit rows (a full `pretrain.queue_size` "
        "queue, as clients send it), the default model's weights; round 2's accounting (`last_round_report`). "
        "Sizes are the `.npy` payloads as they sit in the Flower messages (the wire adds a small framing).",
        "",
        "| relay | sites | weights down MB | bank down MB | remote rows | weights up MB | bank up MB | bank down / weights down |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in b["variants"].values():
        label = "all-to-all (`" + " ".join(v["overrides"]) + "`)" if v["overrides"] else "defaults"
        for n, ps in v["by_sites"].items():
            lines.append(
                f"| {label} | {n} | {_mb(ps['down_weights_bytes'])} | {_mb(ps['down_bank_bytes'])} | "
                f"{ps['remote_rows']:.0f} | {_mb(ps['up_weights_bytes'])} | {_mb(ps['up_bank_bytes'])} | "
                f"{ps['down_bank_bytes'] / ps['down_weights_bytes']:.3f} |"
            )
    if "cross_check" in b:
        cc = b["cross_check"]
        lines += [
            "",
            f"Cross-check: every round >= 2 of the first {round_sites}-site FCL simulation of "
            f"section 2 replayed in process with the bank sizes the sites really sent: {cc['values_compared']} "
            f"byte and row counts compared, **{len(cc['mismatches'])} mismatches**. (In a short simulation the "
            "queues are not full yet, so its banks are smaller than the full-size ones above.)",
        ]
    lines.append("")
    return lines


def _scale_md(sc: dict[str, Any]) -> list[str]:
    """Section 4 of BENCHMARKS.md from the ``scale`` results."""
    lines = [
        "## 4. Simulation scale",
        "",
        f"`fcl-flower simulate sites=N synthetic.patients_per_site={sc['patients_per_site']} rounds={sc['rounds']}` "
        "on the built-in data; memory of every process of the run (the command, SuperLink, ServerApp, Ray, "
        "ClientApp actors) summed from `/proc` every 0.5 s. RSS counts shared pages (libraries, Ray's object "
        "store) once per process; PSS splits them.",
        "",
        "| sites | completed | seconds per round (all) | mean of rounds >= 2 | CPU s per round >= 2 | peak RSS GB | peak PSS GB | processes | site failures | largest at the RSS peak (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, e in sc["by_sites"].items():
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(e["peak_rss_by_process_gb"].items())[:5])
        lines.append(
            f"| {n} | {'yes' if e['exit_code'] == 0 else '**no**'} | {', '.join(f'{x:.1f}' for x in e['round_seconds'])} | "
            f"{e['mean_round_seconds_after_first']:.1f} | {', '.join(f'{x:.1f}' for x in e['round_cpu_seconds'])} | "
            f"{e['peak_rss_gb']:.2f} | {e['peak_pss_gb']:.2f} | {e['max_processes']} | {e['failures']} | {top} |"
        )
    if sc.get("note"):
        lines += ["", sc["note"]]
    lines.append("")
    return lines


def _deploy_md(d: dict[str, Any]) -> list[str]:
    """Section 5 of BENCHMARKS.md from the ``deploy`` results."""
    lines = [
        "## 5. Deployment start-up",
        "",
        f"`{d['command']}`: status `{d['status']}`. Per fit message, `startup_seconds` runs from the start of the "
        "ClientApp process (`/proc/self/stat`) to the first training step (imports, config, site and cached data, "
        "model build, state load); `seconds` is the training loop.",
        "",
        "| round | site | start-up s | training s | start-up / training |",
        "|---|---|---|---|---|",
    ]
    for f in d["fits"]:
        lines.append(f"| {f['round']} | {f['site']} | {f['startup_seconds']:.2f} | {f['train_seconds']:.2f} | "
                     f"{f['startup_seconds'] / f['train_seconds']:.2f} |")
    lines += ["", f"Median start-up {d['median_startup_seconds']:.2f} s, median training {d['median_train_seconds']:.2f} s: "
              f"fraction **{d['startup_fraction']:.2f}**.", ""]
    a = d["anatomy"]
    lines += [
        f"Where the start-up goes: {a['repeats']} fresh processes importing what `flwr-clientapp` imports, in its "
        "order, then calling the client's `fit` for round 1 of the first site (medians; CPU time is the stable "
        "measure on a shared machine):",
        "",
        "| stage | wall s | CPU s |",
        "|---|---|---|",
    ]
    for stage in a["wall"]:
        lines.append(f"| {stage.replace('_', ' ')} | {a['wall'][stage]:.2f} | {a['cpu'][stage]:.2f} |")
    lines += [
        f"| in `fit` before training (config, site, cached data, model, state) | {a['fit_before_training']:.2f} | |",
        f"| of which `pretrain_round` set-up (model build, state load) | {a['setup_seconds']:.2f} | |",
        f"| **start-up** (the stages above; the probe's own set-up left out) | **{a['startup_seconds']:.2f}** | |",
        f"| training (`seconds`) | {a['train_seconds']:.2f} | |",
        "",
    ]
    return lines


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    """The generated part of BENCHMARKS.md; text outside the markers (analysis, fixes) is kept."""
    m, s, r = doc["machine"], doc["summary"], doc["results"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{doc['command']}` ({doc['profile']} mode) on {doc['finished']}, in one run "
        f"of {doc['seconds'] / 60:.1f} min. Most targets are ratios of two things measured in the same run on the "
        "same machine; peak memory is an absolute limit. The machine is shared with other engineers' jobs, so "
        "absolute times swing by 2x or more between runs.",
        "",
        "## Machine",
        "",
        "| | |", "|---|---|",
        f"| CPU | {m['cpu']} |",
        f"| cores | {m['cores']} |",
        f"| RAM | {m['ram_gb']} GB |",
        f"| load average (1, 5, 15 min) at start | {', '.join(str(x) for x in m['load_average_start'])} |",
        f"| load average at end | {', '.join(str(x) for x in m.get('load_average_end', []))} |",
        f"| platform | {m['platform']} |",
        "| versions | " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + " |",
        "",
    ]
    runs = {(v["command"], v["started"]) for v in doc.get("measured_by", {}).values()}
    if len(runs) > 1:
        lines += [
            "Sections come from more than one run (`--update` re-measured some); each section's ratios are from "
            "one run:",
            "",
            "| section | measured by | started | load average at start |",
            "|---|---|---|---|",
            *(f"| {name} | `{v['command']}` | {v['started']} | {', '.join(str(x) for x in v['load_average_start'] or [])} |"
              for name, v in ((n, doc["measured_by"][n]) for n in SECTIONS if n in doc["measured_by"])),
            "",
        ]
    lines += [
        "## Targets",
        "",
        "| figure | value | target | |",
        "|---|---|---|---|",
    ]
    for key, (op, bound, what) in TARGETS.items():
        if key in s:
            lines.append(f"| `{key}`: {what} | {s[key]:.3f} | {op} {bound} | {_verdict(key, s[key])} |")
    if "bank_download_bytes_per_site" in s:
        growth = ", ".join(f"{n} sites: {v / 1e3:.1f} kB" for n, v in s["bank_download_bytes_per_site"].items())
        lines.append(f"| `bank_download_bytes_per_site` (defaults) | {growth} | independent of the number of sites | "
                     f"{'met' if len(set(s['bank_download_bytes_per_site'].values())) == 1 else '**missed**'} |")
    lines.append("")
    if "trainer" in r:
        lines += _trainer_md(r["trainer"])
    if "round" in r:
        lines += _round_md(r["round"])
    if "bytes" in r:
        lines += _bytes_md(r["bytes"], r.get("round", {}).get("sites", "?"))
    if "scale" in r and r["scale"]["by_sites"]:
        lines += _scale_md(r["scale"])
    if "deploy" in r:
        lines += _deploy_md(r["deploy"])
    for name, error in doc.get("errors", {}).items():
        lines += [f"## Section `{name}` failed", "", "```", error.strip()[-3000:], "```", ""]
    generated = "\n".join([BEGIN, *lines[1:], END])
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + generated + old[old.index(END) + len(END):]
    else:
        text = lines[0] + "\n\n" + generated + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run(args: argparse.Namespace, echo: Callable[[str], None] = print) -> dict[str, Any]:
    profile = QUICK if args.quick else FULL
    if args.overrides:
        profile = dataclasses.replace(profile, base=(*profile.base, *args.overrides))
    sections = [s for s in args.sections.split(",") if s] if args.sections else list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    work = Path(args.work_dir or REPO / "runs" / f"benchmark-{profile.name}").resolve()
    out_dir = Path(args.out_dir or REPO / "docs").resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = machine_info()
    echo(f"benchmark ({profile.name}): {machine['cpu']}, {machine['cores']} cores, load {machine['load_average_start']}")
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    # which run measured each section (`--update` keeps the other sections of an earlier run)
    measured_by: dict[str, dict[str, Any]] = {}
    if args.update:
        results, measured_by = previous_sections(out_dir / "benchmarks.json", keep=set(SECTIONS) - set(sections))
    command = " ".join(["fcl-flower bench", *(["--quick"] if args.quick else []),
                        *([f"--sections {args.sections}"] if args.sections else []), *(["--update"] if args.update else []),
                        *map(shlex.quote, args.overrides)])

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in sections:
            return
        measured_by[name] = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M %Z"),
                             "load_average_start": load_average()}
        try:
            results[name] = fn()
        except Exception:  # one broken section must not lose the others' results
            import traceback

            errors[name] = traceback.format_exc()
            echo(f"section {name} failed:\n{errors[name]}")

    def first_fcl_run() -> dict[str, Any] | None:
        """Section 2's first FCL simulation, if this run measured it (a kept one has no records)."""
        if "round" not in sections:
            return None
        return (results.get("round", {}).get("runs", {}).get("fcl") or [None])[0]

    section("trainer", lambda: bench_trainer_section(profile, echo))
    section("round", lambda: bench_round_section(profile, work, echo))
    section("bytes", lambda: bench_bytes_section(profile, echo, first_fcl_run()))
    section("scale", lambda: bench_scale_section(profile, work, echo, first_fcl_run()))
    section("deploy", lambda: bench_deploy_section(profile, work, echo))
    machine["load_average_end"] = load_average()
    doc = {
        "profile": profile.name, "command": command, "finished": time.strftime("%Y-%m-%d %H:%M %Z"),
        "seconds": time.perf_counter() - t0, "machine": machine, "summary": summary_keys(results),
        "measured_by": measured_by,
    }
    # records are large and already on disk under the work folder
    for runs_ in results.get("round", {}).get("runs", {}).values():
        for run_ in runs_:
            run_.pop("records", None)
    doc["results"] = results
    doc["errors"] = errors
    json_doc = {**doc["summary"], "profile": doc["profile"], "command": command, "finished": doc["finished"],
                "seconds": doc["seconds"], "machine": machine, "measured_by": measured_by, "errors": errors,
                "details": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(json_doc, indent=2, default=float) + "\n")
    write_markdown(out_dir / "BENCHMARKS.md", doc)
    echo(f"wrote {out_dir / 'BENCHMARKS.md'} and {out_dir / 'benchmarks.json'} in {doc['seconds'] / 60:.1f} min"
         + (f"; sections that failed: {sorted(errors)}" if errors else ""))
    return json_doc


def load_average() -> list[float]:
    """The 1, 5 and 15 min load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def previous_sections(path: Path, keep: set[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The ``keep`` sections of an earlier ``benchmarks.json`` and the run that measured each."""
    if not path.is_file():
        raise SystemExit(f"--update: {path} does not exist; run the whole suite first")
    try:
        old = json.loads(path.read_text())
        details = old["details"]
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"--update: {path} is not a benchmarks.json written by this suite ({exc})") from None
    earlier = {"command": old.get("command"), "started": old.get("finished"),
               "load_average_start": old.get("machine", {}).get("load_average_start")}
    by = old.get("measured_by") or {}
    kept = {name: details[name] for name in SECTIONS if name in keep and name in details}
    return kept, {name: by.get(name, earlier) for name in kept}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcl-flower bench", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotlist overrides applied to every config of the suite")
    parser.add_argument("--quick", action="store_true", help="CI size (a few minutes); the numbers mean nothing")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--update", action="store_true",
                        help="keep the sections not run now from the existing benchmarks.json (re-measure after a fix)")
    parser.add_argument("--out-dir", default=None, help="where BENCHMARKS.md and benchmarks.json go (default: docs/)")
    parser.add_argument("--work-dir", default=None, help="runs and logs (default: runs/benchmark-<mode>/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 1 if a section failed (its error is in benchmarks.json and BENCHMARKS.md)."""
    return 1 if run(build_parser().parse_args(argv))["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
