"""The paper's Tables 1 and 2 on the built-in synthetic multi-site data.

For every pre-training method (random init, local CL, FedRotation, FedSimCLR, FCL and
the two FCL ablations) one Flower run does pre-training (where the method has one) and
then local and federated fine-tuning for every label budget N; this driver collects the
cells into the paper's tables::

    python simulations/paper_experiment.py --profile quick     # CI size, a few minutes
    python simulations/paper_experiment.py --profile full      # the real experiment (resumable)

Profiles are config layers, ``conf/profile/<name>.yaml``, applied over
``conf/default.yaml``; extra ``key=value`` arguments override both. Each method's run
lives in ``<out>/<method>/`` (default ``runs/paper-<profile>/``); running the same
command again resumes: a method whose fine-tuning cells are all in its
``finetune/results.json`` under the same config is not started again, and inside a
started run finished pre-training rounds and finished cells are not recomputed.

Outputs (``--docs``, default ``docs/``): ``results.csv`` (``method,finetune,n_labeled,
dice_mean,dice_std``), ``results_folds.csv`` (the per-site, per-fold Dice and HD95 behind
each cell, with the id of the compute environment the site computed it in),
``results_dice_vs_n.png``, ``results_overlays.png``, and the generated part of ``RESULTS.md``
between the ``BEGIN/END GENERATED`` markers (the rest of that file is left as written): the
paper's tables, each method paired site by site against random init and against FCL (mean,
spread, sites ahead, standard errors), and the compute environments the cells came from.

Engines: ``flower`` (default) runs each method with ``fcl-flower simulate`` (a private
SuperLink, Flower's Ray simulation engine, one virtual SuperNode per site);
``inprocess`` runs the very same ``ServerApp``/``ClientApp`` objects (``server_fn``,
``client_fn``, ``FCLServer``, ``StageClient``) in this process with in-process client
proxies, skipping Flower's process start-up (used by the CI test of the quick profile).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from omegaconf import DictConfig  # noqa: E402

from fcl_flower.config import CONF_DIR, FINETUNE_TASKS, config_to_yaml, load_config  # noqa: E402

PROFILE_DIR = CONF_DIR / "profile"
CSV_COLUMNS = ("method", "finetune", "n_labeled", "dice_mean", "dice_std")
FOLD_COLUMNS = ("method", "finetune", "n_labeled", "site", "fold", "dice", "hd95", "environment")
BEGIN, END = "<!-- BEGIN GENERATED: simulations/paper_experiment.py -->", "<!-- END GENERATED -->"


@dataclass(frozen=True)
class Method:
    """One row of the paper's tables: its name here, the paper's name, and its config."""

    name: str
    paper: str | None  # row name in the paper's tables; None for rows the paper does not have
    overrides: tuple[str, ...]


# Pre-training happens inside the same Flower run as fine-tuning (stages=[pretrain,finetune])
# for the federated methods. Random init has no pre-training. Local CL (Chaitanya et al.) is
# pre-trained by each site ALONE (finetune.init=local_pretrain: `rounds` rounds of local
# G_D contrastive training on the site's own volumes, no averaging, no exchange); each site
# fine-tunes locally from its own encoder, and federated fine-tuning starts from the FedAvg
# of the sites' local encoders (one averaging step, after pre-training).
METHODS: tuple[Method, ...] = (
    Method("random", "random init", ("method=none", "stages=[finetune]", "finetune.init=random")),
    Method("local_cl", "local CL", ("method=local_cl", "stages=[finetune]", "finetune.init=local_pretrain")),
    Method("fedrotation", "FedRotation", ("method=rotation", "relay.enabled=false", "stages=[pretrain,finetune]")),
    Method("fedsimclr", "FedSimCLR", ("method=simclr", "relay.enabled=false", "stages=[pretrain,finetune]")),
    Method("fcl", "FCL", ("method=fcl", "stages=[pretrain,finetune]")),
    Method("fcl_no_gsm", None, ("method=fcl", "pretrain.use_remote_positives=false", "stages=[pretrain,finetune]")),
    Method(
        "fcl_no_fe", None,
        ("method=fcl", "pretrain.use_feature_exchange=false", "relay.enabled=false", "stages=[pretrain,finetune]"),
    ),
)
METHOD_NAMES = tuple(m.name for m in METHODS)
# Run order: the comparisons the paper is about first, so an interrupted run has them.
RUN_ORDER = ("random", "fcl", "fedsimclr", "fedrotation", "local_cl", "fcl_no_gsm", "fcl_no_fe")
LABELS = {
    "random": "random init", "local_cl": "local CL", "fedrotation": "FedRotation", "fedsimclr": "FedSimCLR",
    "fcl": "FCL", "fcl_no_gsm": "FCL w/o remote positives (GSM)", "fcl_no_fe": "FCL w/o feature exchange",
}

# The paper's Dice (Wu et al., MICCAI 2021, Tables 1 and 2; ACDC, 10 clients x 10 patients).
PAPER = {
    "local": {
        "random": (0.280, 0.414, 0.618, 0.766), "local_cl": (0.320, 0.456, 0.637, 0.770),
        "fedrotation": (0.357, 0.508, 0.660, 0.783), "fedsimclr": (0.288, 0.435, 0.619, 0.765),
        "fcl": (0.506, 0.631, 0.745, 0.824),
    },
    "federated": {
        "random": (0.445, 0.572, 0.764, 0.834), "local_cl": (0.473, 0.717, 0.784, 0.847),
        "fedrotation": (0.516, 0.627, 0.821, 0.867), "fedsimclr": (0.395, 0.576, 0.788, 0.859),
        "fcl": (0.646, 0.824, 0.871, 0.894),
    },
}
PAPER_N = (1, 2, 4, 8)


# ---------------------------------------------------------------- configs


def profile_file(profile: str) -> Path:
    path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise SystemExit(f"paper_experiment: no profile {profile!r} ({path}); known: {known}")
    return path


def method_config(method: Method, profile: str, out: Path, overrides: Sequence[str]) -> DictConfig:
    """The config of one method's run: profile layer, the method's keys, its output folder, resume on."""
    return load_config(
        [*method.overrides, f"output_dir={(out / method.name).resolve()}", "resume=true", *overrides],
        profile_file(profile),
    )


def expected_cells(cfg: DictConfig) -> list[str]:
    from fcl_flower.finetune_stage import cell_key, requested_cells

    return [cell_key(t, n) for t, n in requested_cells(cfg.finetune)]


def finished(cfg: DictConfig) -> bool:
    """All fine-tuning cells of this run are stored, complete, and were computed with this config.

    ``cfg`` is the resolved config of the run (``prepare_run``). Each expected cell must
    carry the config key of ``cfg``: a ``results.json`` also keeps cells computed under
    an earlier config (e.g. other N, or before a setting changed), and those do not count.
    A cell without a key (written before cells carried one) does not count either; the
    run then starts, and its fine-tuning stage recomputes only cells whose fingerprint
    differs, stamping the key on the others.
    """
    from fcl_flower.finetune import config_fingerprint

    path = Path(cfg.output_dir) / "finetune" / "results.json"
    if not path.is_file():
        return False
    key = config_fingerprint(cfg)
    cells = json.loads(path.read_text()).get("cells", {})
    return all(cells.get(c, {}).get("complete") and cells[c].get("config_key") == key for c in expected_cells(cfg))


# ---------------------------------------------------------------- engines


def run_flower(cfg: DictConfig) -> int:
    """One ``fcl-flower simulate`` run (private SuperLink, Ray simulation engine)."""
    from fcl_flower.runner import simulate

    return simulate(cfg)


def run_inprocess(cfg: DictConfig) -> int:
    """The same ServerApp and ClientApp objects as a Flower run, with in-process client proxies."""
    from flwr.common import Context, RecordDict

    from fcl_flower.client_app import client_fn
    from fcl_flower.server_app import prepare_run, server_fn
    from fcl_flower.site import resolve_data_root

    cfg = resolve_data_root(prepare_run(cfg))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.yaml"
    config_file.write_text(config_to_yaml(cfg))
    (out / "summary.json").unlink(missing_ok=True)
    run_config = {"config-file": str(config_file), "overrides": ""}
    components = server_fn(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    server = components.server
    for partition in range(cfg.sites):
        node_config = {"partition-id": partition, "num-partitions": cfg.sites}
        client = client_fn(Context(run_id=0, node_id=partition + 1, node_config=node_config, state=RecordDict(),
                                   run_config=run_config))
        server.client_manager().register(InProcessClientProxy(str(partition + 1), client))
    # sites in parallel threads, one per CPU a client may use (results are aggregated in site order,
    # and every site's training draws from its own seeded generators: same numbers as any order)
    server.set_max_workers(max(1, min(cfg.sites, (os.cpu_count() or 1) // cfg.federation.client_cpus)))
    server.fit(components.config.num_rounds, components.config.round_timeout)
    summary = out / "summary.json"
    return 0 if summary.is_file() and json.loads(summary.read_text()).get("completed") else 1


def _proxy_class():
    from flwr.server.client_proxy import ClientProxy

    class _InProcessClientProxy(ClientProxy):
        """Hands Flower's instructions straight to a ``flwr.client.Client`` in this process."""

        def __init__(self, cid: str, client: Any) -> None:
            super().__init__(cid)
            self.client = client

        def get_properties(self, ins, timeout, group_id):
            return self.client.get_properties(ins)

        def get_parameters(self, ins, timeout, group_id):
            return self.client.get_parameters(ins)

        def fit(self, ins, timeout, group_id):
            return self.client.fit(ins)

        def evaluate(self, ins, timeout, group_id):
            return self.client.evaluate(ins)

        def reconnect(self, ins, timeout, group_id):
            from flwr.common import DisconnectRes

            return DisconnectRes(reason="")

    return _InProcessClientProxy


def InProcessClientProxy(cid: str, client: Any):  # noqa: N802 - a class built lazily (flwr import)
    return _proxy_class()(cid, client)


ENGINES: dict[str, Callable[[DictConfig], int]] = {"flower": run_flower, "inprocess": run_inprocess}


# ---------------------------------------------------------------- collecting the results


def stored_cells(out: Path, name: str) -> list[dict[str, Any]]:
    """The local and federated fine-tuning cells in ``<out>/<name>/finetune/results.json``, in
    table order (local first, then by N); none if the method has not run."""
    path = out / name / "finetune" / "results.json"
    if not path.is_file():
        return []
    cells = (c for c in json.loads(path.read_text())["cells"].values() if c["finetune"] in FINETUNE_TASKS)
    return sorted(cells, key=lambda c: (FINETUNE_TASKS.index(c["finetune"]), c["n_labeled"]))


def load_rows(out: Path, methods: Sequence[str]) -> list[dict[str, Any]]:
    """``CSV_COLUMNS`` rows for every stored cell of the given methods, in table order."""
    return [{"method": name, "finetune": cell["finetune"], "n_labeled": int(cell["n_labeled"]),
             "dice_mean": float(cell["dice_mean"]), "dice_std": float(cell["dice_std"]), "complete": bool(cell["complete"])}
            for name in methods for cell in stored_cells(out, name)]


def load_fold_rows(out: Path, methods: Sequence[str]) -> list[dict[str, Any]]:
    """``FOLD_COLUMNS`` rows: the per-site, per-fold scores behind every stored cell.

    A cell's ``dice_mean`` is the mean over sites of each site's mean over its folds; these
    rows let a reader pair methods by site and fold (same labeled and held-out patients).
    """
    rows = []
    for name in methods:
        for cell in stored_cells(out, name):
            environments = cell.get("environment", {}).get("sites", {})  # none for cells computed before it was recorded
            for site, result in sorted(cell["sites"].items()):
                for fold in sorted(result["folds"], key=lambda f: f["fold"]):
                    rows.append({"method": name, "finetune": cell["finetune"], "n_labeled": int(cell["n_labeled"]),
                                 "site": site, "fold": int(fold["fold"]), "dice": float(fold["dice"]),
                                 "hd95": float(fold.get("hd95", math.nan)), "environment": environments.get(site, "")})
    return rows


def _cells(count: int) -> str:
    return f"{count} cell" + ("" if count == 1 else "s")


def environments_summary(out: Path, methods: Sequence[str]) -> str:
    """Which compute environments (server and sites) the stored cells were computed in.

    One line when all cells share one; otherwise each environment with the cells it took
    part in, since the same cell computed on two machines can differ (RESULTS.md,
    "Whether a cell reproduces on another machine").
    """
    from fcl_flower.environment import describe

    described: dict[str, dict[str, str]] = {}
    cells_in: dict[str, list[str]] = {}
    unrecorded = []
    for name in methods:
        for cell in stored_cells(out, name):
            label = f"{name} {cell['finetune']} N={cell['n_labeled']}"
            record = cell.get("environment")
            if not record:
                unrecorded.append(label)
                continue
            described.update(record["described"])
            for ident in sorted({part for joined in (record["server"], *record["sites"].values())
                                 for part in joined.split("+")}):
                cells_in.setdefault(ident, []).append(label)
    lines = []
    if len(cells_in) == 1:
        ident = next(iter(cells_in))
        lines.append(f"Compute environment of every cell (server and sites): `{ident}`, {describe(described[ident])}.")
    elif cells_in:
        lines.append(f"**These cells come from {len(cells_in)} compute environments** (server and sites); the same "
                     "cell computed in two of them can differ in its last digits, at N = 1 by a few hundredths a site:")
        lines.append("")
        lines += [f"- `{ident}`, {describe(described[ident])}: {_cells(len(labels))} ({', '.join(labels)})"
                  for ident, labels in sorted(cells_in.items())]
    if unrecorded:
        lines += [""] if lines else []
        lines.append(f"{_cells(len(unrecorded))} without a record of the compute environment (computed before it "
                     f"was recorded): {', '.join(unrecorded)}.")
    return "\n".join(lines) + ("\n" if lines else "")


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    """``columns`` of ``rows`` as CSV; floats with four decimals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([f"{r[c]:.4f}" if isinstance(r[c], float) else r[c] for c in columns])


def _fmt(mean: float, std: float | None = None) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def markdown_tables(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """The paper's two tables (local, federated): Dice mean ± std across sites, one column per N."""
    out = []
    budgets = sorted({r["n_labeled"] for r in rows})
    for task, title in (("local", "Local fine-tuning"), ("federated", "Federated fine-tuning")):
        cells = {(r["method"], r["n_labeled"]): r for r in rows if r["finetune"] == task}
        if not cells:
            continue
        out.append(f"**{title}** (Dice, mean ± std across sites)\n")
        out.append("| method | " + " | ".join(f"N={n}" for n in budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        for name in methods:
            if not any((name, n) in cells for n in budgets):
                continue
            values = []
            for n in budgets:
                r = cells.get((name, n))
                values.append("—" if r is None else _fmt(r["dice_mean"], r["dice_std"]) + ("" if r["complete"] else " (incomplete)"))
            out.append(f"| {LABELS.get(name, name)} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def paper_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """Ours next to the paper's, per task and N, for the rows the paper has, with the gain over random init."""
    out = []
    for task, title in (("local", "Local"), ("federated", "Federated")):
        ours = {(r["method"], r["n_labeled"]): r["dice_mean"] for r in rows if r["finetune"] == task}
        if not ours:
            continue
        budgets = [n for n in PAPER_N if any(k[1] == n for k in ours)]
        out.append(f"**{title} fine-tuning: ours / paper (gain over random init: ours / paper)**\n")
        out.append("| method | " + " | ".join(f"N={n}" for n in budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        for name, paper_row in PAPER[task].items():
            cells = []
            for n in budgets:
                i = PAPER_N.index(n)
                mine, base = ours.get((name, n), float("nan")), ours.get(("random", n), float("nan"))
                gain_paper = paper_row[i] - PAPER[task]["random"][i]
                cell = f"{_fmt(mine)} / {paper_row[i]:.3f}"
                if name != "random":
                    cell += f" ({mine - base:+.3f} / {gain_paper:+.3f})" if math.isfinite(mine - base) else f" (n/a / {gain_paper:+.3f})"
                cells.append(cell)
            out.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _site_dice(out: Path, name: str) -> dict[tuple[str, int], dict[str, float]]:
    """{(task, N): {site: Dice averaged over the site's folds}} of one method's stored cells."""
    return {(c["finetune"], int(c["n_labeled"])): {s: float(v["dice"]) for s, v in c["sites"].items()}
            for c in stored_cells(out, name)}


def paired_difference(mine: dict[str, float], other: dict[str, float]) -> str:
    """``mine - other`` paired by site, over the sites both have: ``describe_differences`` of them."""
    common = sorted(set(mine) & set(other))
    return describe_differences([mine[s] - other[s] for s in common])


def describe_differences(d: Sequence[float]) -> str:
    """Per-site differences as "mean ± std (ahead/n, z SE)"; "—" when there are none.

    ``std`` is over sites (ddof 0, as the tables' ± everywhere); ``ahead`` counts the positive
    differences; ``z = |mean| / (std / sqrt(n))``, the mean in standard errors (∞ when every
    site differs by the same non-zero amount).
    """
    if not d:
        return "—"
    mean, std = statistics.fmean(d), statistics.pstdev(d)
    if std > 1e-9:
        z = f"{abs(mean) / (std / math.sqrt(len(d))):.1f}"
    else:  # every site differs by the same amount (up to rounding): a non-zero mean is infinitely many errors
        z = "∞" if abs(mean) > 1e-9 else "0.0"
    return f"{mean:+.3f} ± {std:.3f} ({sum(x > 0 for x in d)}/{len(d)}, {z} SE)"


def paired_gains(out: Path, methods: Sequence[str]) -> str:
    """Methods compared site by site (same splits, same labeled and test patients), per task and N.

    Two tables per task: each method minus random init, and FCL minus each other
    pre-training (when FCL is among ``methods``). A cell is ``paired_difference`` of the two methods'
    per-site Dice; only sites both have are compared.
    """
    dice = {name: _site_dice(out, name) for name in dict.fromkeys(["random", *methods])}
    others = [m for m in methods if m != "random"]
    # (caption, the method every row is paired with, rows as (method shown, minuend, subtrahend))
    tables = [("gain over random init", "random", [(m, m, "random") for m in others])]
    if "fcl" in methods:
        tables.append(("FCL minus each method", "fcl", [(m, "fcl", m) for m in others if m != "fcl"]))
    lines = []
    for task, title in (("local", "Local"), ("federated", "Federated")):
        for caption, reference, pairs in tables:
            budgets = sorted(n for t, n in dice[reference] if t == task)
            rows = []
            for name, a, b in pairs:
                cells = [paired_difference(dice[a].get((task, n), {}), dice[b].get((task, n), {})) for n in budgets]
                if any(c != "—" for c in cells):
                    rows.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
            if rows:
                lines += [f"**{title} fine-tuning: {caption}, paired by site** (mean ± std over sites of the per-site "
                          "Dice difference; sites where it is positive; the mean in standard errors)\n",
                          "| method | " + " | ".join(f"N={n}" for n in budgets) + " |",
                          "|---|" + "---|" * len(budgets), *rows, ""]
    return "\n".join(lines)


def plot_dice_vs_n(rows: Sequence[dict[str, Any]], methods: Sequence[str], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in FINETUNE_TASKS if any(r["finetune"] == task for r in rows)] or ["local"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, task in zip(axes, tasks):
        for name in methods:
            pts = sorted((r["n_labeled"], r["dice_mean"], r["dice_std"]) for r in rows
                         if r["method"] == name and r["finetune"] == task)
            if not pts:
                continue
            n, mean, std = zip(*pts)
            style = "-" if name in PAPER[task] else "--"
            ax.errorbar(n, mean, yerr=std, fmt=style + "o", capsize=3, label=LABELS.get(name, name), alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["n_labeled"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("labeled patients per site (N)")
        ax.set_title(f"{task} fine-tuning")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean ± std across sites)")
    if axes[-1].lines:
        axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_overlays(out: Path, methods: Sequence[str], png: Path, task: str = "local") -> Path | None:
    """Held-out slices of the first site at the smallest N: image, ground truth, then each method's prediction.

    Reads the ``overlays/<task>_n<N>.npz`` each site wrote into its own state folder
    (simulation keeps them under the run's output folder).
    """
    import numpy as np

    found = []
    for name in methods:
        sites = sorted((out / name / "sites").glob(f"*/finetune/overlays/{task}_n*.npz"))
        if sites:
            first_site = sites[0].parents[2].name
            own = sorted((p for p in sites if p.parents[2].name == first_site),
                         key=lambda p: int(p.stem.split("_n")[1]))
            found.append((name, own[0]))
    if not found:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fcl_flower.finetune import label_colours

    ref = np.load(found[0][1])
    rows, cols = len(ref["image"]), 2 + len(found)
    colours = label_colours(int(max(ref["label"].max(), 3)) + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(ref["image"][r], cmap="gray")
            if c == 1:
                ax.imshow(colours[ref["label"][r]], interpolation="nearest")
            elif c >= 2:
                data = np.load(found[c - 2][1])
                ax.imshow(colours[data["pred"][r]], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(["image", "ground truth", *(LABELS.get(n, n) for n, _ in found)][c], fontsize=7)
    n_label = found[0][1].stem.split("_n")[1]
    fig.suptitle(f"{task} fine-tuning, N={n_label}, held-out slices of {found[0][1].parents[2].name} "
                 "(red RV, green myocardium, blue LV)", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def generated_section(rows, methods, profile: str, command: str, cfg_text: str, timings: dict[str, float],
                      docs: Path, complete: bool, collect_only: bool = False, out: Path | None = None) -> str:
    """The generated part of ``RESULTS.md``; ``complete``: every method has all the cells its run asks for
    (``finished``), else the section says that some are missing or incomplete."""
    lines = [
        BEGIN,
        f"_Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}; profile **{profile}**"
        + (" (collected from the runs so far, `--collect-only`)" if collect_only else "")
        + ("" if complete else "; **some cells are missing or incomplete**") + "._",
        "",
        markdown_tables(rows, methods),
        paired_gains(out, methods) if out is not None else "",
        paper_comparison(rows),
        f"![Dice vs N]({'results_dice_vs_n.png'})",
        "",
    ]
    if (docs / "results_overlays.png").is_file():
        lines += ["![overlays](results_overlays.png)", ""]
    if out is not None:
        lines.append(environments_summary(out, methods))
    ran = {k: v for k, v in timings.items() if v > 0}
    if ran:
        lines += ["Wall-clock per method run by this invocation (methods already finished are not listed): "
                  + ", ".join(f"{k} {v / 60:.1f} min" for k, v in ran.items()), ""]
    lines += ["<details><summary>Resolved config (first method; the others differ only in the method keys)</summary>",
              "", "```yaml", cfg_text.strip(), "```", "", "</details>", END]
    return "\n".join(lines)


def update_results_md(path: Path, section: str) -> None:
    """Replace the generated section of ``RESULTS.md`` (or create the file around it)."""
    if path.is_file() and BEGIN in path.read_text() and END in path.read_text():
        text = path.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(head + section + tail)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Results: the paper's experiment on synthetic multi-site data\n\n" + section + "\n")


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", help="conf/profile/<name>.yaml (quick | full)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help=f"comma-separated subset of {','.join(METHOD_NAMES)}")
    parser.add_argument("--engine", default="flower", choices=sorted(ENGINES))
    parser.add_argument("--out", default=None, help="runs folder (default runs/paper-<profile>)")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where results.csv, the plots and RESULTS.md go")
    parser.add_argument("--collect-only", action="store_true",
                        help="start no run: only rebuild the docs from the cells finished so far (e.g. while a run goes on)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides applied to every method, e.g. sites=4")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHOD_NAMES)}")
    out = Path(args.out or REPO / "runs" / f"paper-{args.profile}").resolve()
    docs = Path(args.docs).resolve()
    engine = ENGINES[args.engine]
    command = "python simulations/paper_experiment.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"[paper] profile {args.profile}, engine {args.engine}, methods {methods}, runs in {out}", flush=True)

    from fcl_flower.server_app import prepare_run
    from fcl_flower.site import resolve_data_root

    failed, timings, first_cfg = [], {}, None
    by_name = {m.name: m for m in METHODS}
    for method in (by_name[n] for n in RUN_ORDER if n in methods):
        cfg = resolve_data_root(prepare_run(method_config(method, args.profile, out, args.overrides)))
        first_cfg = first_cfg or cfg
        if finished(cfg):
            print(f"[paper] {method.name}: all cells finished in {cfg.output_dir} (same config): skipped", flush=True)
            timings[method.name] = 0.0
            continue
        if args.collect_only:
            print(f"[paper] {method.name}: not finished (collect-only: not started)", flush=True)
            failed.append(method.name)
            continue
        print(f"[paper] {method.name}: running {' '.join(method.overrides)} -> {cfg.output_dir}", flush=True)
        t0 = time.perf_counter()
        rc = engine(cfg)
        timings[method.name] = time.perf_counter() - t0
        if rc != 0 or not finished(cfg):
            failed.append(method.name)
            print(f"[paper] {method.name}: run failed or left cells unfinished (rc {rc}); see {cfg.output_dir}/logs", flush=True)
        else:
            print(f"[paper] {method.name}: done in {timings[method.name] / 60:.1f} min", flush=True)

    rows = load_rows(out, methods)
    write_csv(rows, docs / "results.csv")
    write_csv(load_fold_rows(out, methods), docs / "results_folds.csv", FOLD_COLUMNS)
    plot_dice_vs_n(rows, methods, docs / "results_dice_vs_n.png")
    plot_overlays(out, methods, docs / "results_overlays.png")
    (out / "tables.md").write_text(markdown_tables(rows, methods) + "\n" + paper_comparison(rows))
    cfg_text = config_to_yaml(first_cfg) if first_cfg is not None else ""
    run_command = command.replace(" --collect-only", "")
    complete = bool(rows) and not failed
    section = generated_section(rows, methods, args.profile, run_command, cfg_text, timings, docs, complete,
                                args.collect_only, out)
    update_results_md(docs / "RESULTS.md", section)
    print(markdown_tables(rows, methods), flush=True)
    print(f"[paper] wrote {docs / 'results.csv'}, {docs / 'results_dice_vs_n.png'}, {docs / 'RESULTS.md'}", flush=True)
    if failed:
        print(f"[paper] unfinished methods: {failed}; run the same command again to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
