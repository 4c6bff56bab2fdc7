"""Where a deployed ClientApp process spends its time, from a py-spy profile of a deployment.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message a SuperNode
receives. This script reads a ``py-spy record --subprocesses --format raw`` profile of a
whole ``fcl-flower deploy-local`` run and splits the samples of the main thread of every
ClientApp process that served a ``fit`` into phases: Flower's own start-up, the imports
the app needs (torch, MONAI, OmegaConf), the ``torch._dynamo`` import that a
``torch.optim`` optimiser does when it is built, training, and the rest::

    pip install py-spy                 # not a dependency of fcl-flower
    py-spy record --subprocesses -r 20 -f raw -o runs/prof/deploy.txt -- \\
        fcl-flower deploy-local --sites 3 sites=3 rounds=3 output_dir=runs/prof/deploy
    python simulations/startup_profile.py runs/prof/deploy.txt

Samples count time on the CPU or waiting; background threads (heartbeats, parent
monitor) are left out, so a phase's share is its share of the main thread's life.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):\d+\)$")
PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<cmd>.*)"$')
APP_IMPORTS = ("torch", "monai", "omegaconf", "numpy")
# functions of pretrain_round's training loop (the `seconds` metric); the rest of the call is set-up and saving
TRAINING_LOOP = {"_batch_loss", "backward", "step", "ema_update", "enqueue", "epoch"}

Frames = list[tuple[str, str]]  # (function, file) pairs of one sample, outermost first


def _imports(frames: Frames) -> list[str]:
    """Top-level packages of the modules being imported, outermost first."""
    return [file.split("/")[0] for func, file in frames if func == "<module>" and "/" in file]


def phase_of(frames: Frames) -> str:
    """The phase of one main-thread sample of a ClientApp process."""
    funcs = [func for func, _ in frames]
    imports = _imports(frames)
    in_app = any(file.startswith("fcl_flower/") for _, file in frames)
    if "torch" in imports and any(file.startswith("torch/_dynamo") for _, file in frames) and in_app:
        return "app import: torch._dynamo (by torch.optim)"
    if imports and in_app:
        outside = [pkg for pkg in imports if pkg != "fcl_flower"]
        pkg = outside[0] if outside else "fcl_flower"
        return f"app import: {pkg}" if pkg in APP_IMPORTS or pkg == "fcl_flower" else "app import: other"
    if imports:
        return "Flower start-up: flwr-clientapp imports"
    if any("install_from_fab" in f for f in funcs):
        return "Flower: FAB install"
    if any(f in ("pull_task_input", "push_task_output", "push_message") for f in funcs):
        return "Flower: message pull / push"
    if "pretrain_round" in funcs:
        if any(f.rsplit(".", 1)[-1] in TRAINING_LOOP for f in funcs):  # py-spy names methods Class.method
            return "pretrain_round: training"
        return "pretrain_round: set-up and state save"
    if any("load_site_volumes" in f or "resolve_site" in f or "_config" in f for f in funcs):
        return "fit before pretrain_round (config, site, cached data)"
    return "other"


def parse(path: Path) -> dict[str, list[tuple[Frames, int]]]:
    """Main-thread samples of every ``flwr-clientapp`` process: pid -> [(frames, count)]."""
    procs: dict[str, list[tuple[Frames, int]]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = stack.split(";")
        heads = [PROCESS.match(p) for p in parts if p.startswith("process ")]
        if not heads or not heads[-1] or "flwr-clientapp" not in heads[-1]["cmd"]:
            continue
        frames = [(m["func"], m["file"]) for m in (FRAME.match(p) for p in parts if not p.startswith("process ")) if m]
        if frames and frames[0][1] == "flwr-clientapp":  # the main thread, not a background one
            procs.setdefault(heads[-1]["pid"], []).append((frames, int(count)))
    return procs


def kind_of(samples: list[tuple[Frames, int]]) -> str:
    """``fit``, ``evaluate`` or ``?``: the message a ClientApp process served."""
    funcs = {func for frames, _ in samples for func, _ in frames}
    return "fit" if "maybe_call_fit" in funcs else "evaluate" if "maybe_call_evaluate" in funcs else "?"


def summarize(path: Path, rate_hz: float) -> dict[str, object]:
    """Seconds per fit process in each phase (samples / rate), and each phase's share."""
    kinds = [(kind_of(samples), samples) for samples in parse(path).values()]
    fits = [samples for kind, samples in kinds if kind == "fit"]
    if not fits:
        raise SystemExit(f"{path}: no flwr-clientapp process that served a fit message")
    phases: Counter[str] = Counter()
    for samples in fits:
        for frames, count in samples:
            phases[phase_of(frames)] += count
    total = sum(phases.values())
    return {
        "profile": str(path), "fit_processes": len(fits),
        "other_processes": {kind: sum(1 for k, _ in kinds if k == kind) for kind in ("evaluate", "?")},
        "seconds_per_fit_process": {p: n / rate_hz / len(fits) for p, n in phases.most_common()},
        "share": {p: n / total for p, n in phases.most_common()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy raw output (--subprocesses --format raw)")
    parser.add_argument("--rate", type=float, default=20.0, help="py-spy's sampling rate, Hz (-r)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    if not args.profile.is_file():
        raise SystemExit(f"{args.profile}: no such file")
    result = summarize(args.profile, args.rate)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['fit_processes']} ClientApp processes that served a fit message ({args.profile})\n")
    print("| phase | s per process | share |\n|---|---|---|")
    for phase, seconds in result["seconds_per_fit_process"].items():
        print(f"| {phase} | {seconds:.2f} | {result['share'][phase]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
