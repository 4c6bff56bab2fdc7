"""Paired tables over several training seeds, from the per-fold Dice of the paper driver's runs.

One run of ``paper_experiment.py`` is one training seed; its ``results_folds.csv`` holds every
site's per-fold Dice. ``merge`` stacks several of them into one CSV with ``federation`` and
``seed`` columns (how ``docs/results_n1_seeds.csv`` and ``docs/results_n1_wide_r120.csv`` are
made); ``summary`` reads such a CSV and prints, for one fine-tuning task and label budget:

- each method's Dice at each seed (mean over sites of each site's mean over its folds);
- its gain over random init, paired by site and averaged over the seeds: per site, the mean
  over seeds of (method - random init of the same seed);
- FCL minus the method, paired and averaged over seeds the same way.

A paired cell uses the seeds where both methods ran (named in the cell when that is not every
seed) and the sites both have; it is ``paper_experiment.describe_differences`` of the per-site
differences: mean ± std over sites, sites ahead, and the mean in standard errors::

    python simulations/seed_tables.py merge docs/results_n1_wide_r120.csv \\
        test:0:runs/diag/test-wide-r120-all-docs/results_folds.csv test:2:runs/diag/s2-wide-r120-all-docs/results_folds.csv \\
        test:3:runs/diag/s3-wide-r120-all-docs/results_folds.csv
    python simulations/seed_tables.py summary docs/results_n1_wide_r120.csv --federation test --finetune local --n-labeled 1

``target`` checks the paper experiment's target (docs/RESULTS.md) on one or more settings, one
Markdown row each (``SETTING`` is ``LABEL=FEDERATION:CSV[,CSV...]``; the rows of the CSVs are
pooled). For the task and budget asked (local N = 1 by default, the target's), FCL must gain at
least 0.10 Dice over random init, be above every other baseline (local CL, FedRotation,
FedSimCLR), and its two ablations must lie between FCL and FedSimCLR. Every comparison is a
seed-averaged paired mean over sites, as in ``summary``, and "above" is read leniently: any
positive mean counts, whatever its standard error. A comparison whose methods were not run
leaves the target undecided unless another one already fails it::

    python simulations/seed_tables.py target "48 px, wide, 120 rounds=test:docs/results_n1_wide_r120.csv"
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_experiment import FOLD_COLUMNS, LABELS, METHOD_NAMES, describe_differences, write_csv  # noqa: E402

SEED_COLUMNS = ("federation", "seed", *FOLD_COLUMNS)
REQUIRED_COLUMNS = ("federation", "seed", "method", "finetune", "n_labeled", "site", "dice")
BASELINES = ("local_cl", "fedrotation", "fedsimclr")
ABLATIONS = ("fcl_no_gsm", "fcl_no_fe")
TARGET_GAIN = 0.10
SHORT = {**LABELS, "fcl_no_gsm": "w/o GSM", "fcl_no_fe": "w/o FE"}  # table-width names of the methods
# {method: {seed: {site: Dice averaged over the site's folds}}}
SiteDice = dict[str, dict[int, dict[str, float]]]


def merge(sources: Sequence[tuple[str, int, Path]], n_labeled: int | None = None) -> list[dict[str, str]]:
    """The rows of each ``results_folds.csv`` with its federation and seed in front.

    ``sources``: (federation, seed, path) per run. ``n_labeled`` keeps only that budget's rows.
    A row keeps the columns of ``FOLD_COLUMNS`` it has (older files have no ``environment``).
    """
    rows = []
    for federation, seed, path in sources:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if n_labeled is None or int(row["n_labeled"]) == n_labeled:
                    rows.append({"federation": federation, "seed": str(seed),
                                 **{c: row[c] for c in FOLD_COLUMNS if c in row}})
    return rows


def site_dice(rows: Sequence[dict[str, str]], federation: str, finetune: str, n_labeled: int) -> SiteDice:
    """Each method's per-seed, per-site Dice (mean over the site's folds) for one task and budget."""
    folds: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r["federation"] == federation and r["finetune"] == finetune and int(r["n_labeled"]) == n_labeled:
            folds[r["method"]][int(r["seed"])][r["site"]].append(float(r["dice"]))
    return {m: {seed: {site: statistics.fmean(d) for site, d in sites.items()} for seed, sites in by_seed.items()}
            for m, by_seed in folds.items()}


def seed_averaged_difference(dice: SiteDice, minuend: str, subtrahend: str) -> tuple[dict[str, float], list[int]]:
    """Per site, the mean over the seeds both methods have of (minuend - subtrahend), and those seeds.

    Only sites present at every one of those seeds are kept.
    """
    seeds = sorted(set(dice.get(minuend, {})) & set(dice.get(subtrahend, {})))
    sites = set.intersection(*(set(dice[minuend][s]) & set(dice[subtrahend][s]) for s in seeds)) if seeds else set()
    return ({site: statistics.fmean(dice[minuend][s][site] - dice[subtrahend][s][site] for s in seeds)
             for site in sorted(sites)}, seeds)


def summary_table(dice: SiteDice) -> str:
    """Markdown: per-seed Dice, the seed-averaged gain over random init and FCL minus each method."""
    seeds = sorted({s for by_seed in dice.values() for s in by_seed})
    methods = [m for m in METHOD_NAMES if m in dice]

    def paired(a: str, b: str) -> str:
        diff, used = seed_averaged_difference(dice, a, b)
        cell = describe_differences(list(diff.values()))
        return cell if used == seeds or cell == "—" else f"{cell} [seeds {','.join(map(str, used))}]"

    names = ",".join(map(str, seeds))
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds)
             + f" | gain over random init, seeds {names} | FCL − method, seeds {names} |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for m in methods:
        per_seed = [f"{statistics.fmean(dice[m][s].values()):.3f}" if s in dice[m] else "—" for s in seeds]
        gain = paired(m, "random") if m != "random" else ""
        versus = paired("fcl", m) if m != "fcl" and m != "random" else ""
        lines.append(f"| {LABELS[m]} | " + " | ".join(per_seed) + f" | {gain} | {versus} |")
    return "\n".join(lines)


def target_row(label: str, dice: SiteDice, min_gain: float = TARGET_GAIN) -> str:
    """One Markdown row: random init's Dice, every method's gain over it, and whether the target is met.

    ``dice`` must hold random init. Every comparison pairs the seeds both methods ran; a gain or a
    failing comparison made on other seeds than FCL's names its seeds in brackets. The verdict is
    "met", "not met: <every failing comparison>", or "undecided, not run: <methods>" when nothing
    that was run fails it.
    """
    fcl_seeds = sorted(dice.get("fcl", {}))

    def compared(a: str, b: str) -> tuple[float, str] | None:
        """The seed-averaged paired mean of a - b, and its seeds in brackets when they are not FCL's."""
        diff, seeds = seed_averaged_difference(dice, a, b)
        if not diff:
            return None
        return statistics.fmean(diff.values()), "" if seeds == fcl_seeds else f" [{','.join(map(str, seeds))}]"

    def fails(a: str, b: str) -> str | None:
        d = compared(a, b)
        return f"{SHORT[a]} − {SHORT[b]} {d[0]:+.3f}{d[1]}" if d is not None and d[0] <= 0 else None

    failures: list[str] = []
    gain = compared("fcl", "random")
    if gain is not None and gain[0] < min_gain:
        failures.append(f"FCL gains {gain[0]:+.3f} < {min_gain:+.2f}")
    comparisons = [("fcl", b) for b in BASELINES] + [pair for a in ABLATIONS for pair in (("fcl", a), (a, "fedsimclr"))]
    failures += [f for a, b in comparisons if (f := fails(a, b)) is not None]
    missing = [SHORT[m] for m in ("fcl", *BASELINES, *ABLATIONS) if m not in dice]
    if failures:
        verdict = "not met: " + "; ".join(failures)
    else:
        verdict = "undecided, not run: " + ", ".join(missing) if missing else "met"

    random_init = statistics.fmean(statistics.fmean(dice["random"][s].values()) for s in sorted(dice["random"]))
    gains = [f"{g[0]:+.3f}{g[1]}" if (g := compared(m, "random")) is not None else "—"
             for m in ("fcl", *BASELINES, *ABLATIONS)]
    return (f"| {label} | {','.join(map(str, fcl_seeds)) or '—'} | {random_init:.3f} | " + " | ".join(gains)
            + f" | {verdict} |")


def target_header() -> str:
    """The header of ``target_row``'s table."""
    names = [SHORT[m] for m in ("fcl", *BASELINES, *ABLATIONS)]
    return ("| setting | seeds | random init | " + " | ".join(names) + " | target |\n"
            "|---|---|---|" + "---|" * len(names) + "---|")


def _source(text: str) -> tuple[str, int, Path]:
    try:
        federation, seed, path = text.split(":", 2)
        return federation, int(seed), Path(path)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FEDERATION:SEED:results_folds.csv") from None


def _setting(text: str) -> tuple[str, str, list[Path]]:
    label, sep, rest = text.partition("=")
    federation, colon, paths = rest.partition(":")
    if not (sep and colon and label and federation and paths):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=FEDERATION:CSV[,CSV...]")
    return label, federation, [Path(p) for p in paths.split(",")]


def _read_merged(parser: argparse.ArgumentParser, path: Path) -> list[dict[str, str]]:
    """The rows of a ``merge``d CSV; a parser error naming the file when it is absent or lacks a column."""
    if not path.is_file():
        parser.error(f"no such CSV: {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in REQUIRED_COLUMNS if rows and c not in rows[0]]
    if missing:
        parser.error(f"{path} has no column(s) {missing}; make it with `seed_tables.py merge`")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("merge", help="stack several runs' results_folds.csv with federation and seed columns")
    m.add_argument("out", type=Path, help="the CSV to write")
    m.add_argument("sources", nargs="+", type=_source, help="FEDERATION:SEED:path/to/results_folds.csv, one per run")
    m.add_argument("--n-labeled", type=int, default=None, help="keep only this label budget's rows")
    s = commands.add_parser("summary", help="per-seed Dice and seed-averaged paired tables of a merged CSV")
    s.add_argument("csv", type=Path)
    s.add_argument("--federation", default="test")
    s.add_argument("--finetune", default="local", choices=("local", "federated"))
    s.add_argument("--n-labeled", type=int, default=1)
    t = commands.add_parser("target", help="the paper experiment's target (local N = 1 by default) checked on each setting")
    t.add_argument("settings", nargs="+", type=_setting, help="LABEL=FEDERATION:CSV[,CSV...], one per table row")
    t.add_argument("--finetune", default="local", choices=("local", "federated"))
    t.add_argument("--n-labeled", type=int, default=1)
    args = parser.parse_args(argv)

    if args.command == "merge":
        missing = [str(p) for _, _, p in args.sources if not p.is_file()]
        if missing:
            parser.error(f"no such results_folds.csv: {', '.join(missing)}")
        rows = merge(args.sources, args.n_labeled)
        columns = [c for c in SEED_COLUMNS if all(c in r for r in rows)]
        write_csv(rows, args.out, columns)
        print(f"[seeds] wrote {len(rows)} rows to {args.out}")
        return 0

    if args.command == "target":
        lines = [target_header()]
        for label, federation, paths in args.settings:
            rows = [r for p in paths for r in _read_merged(parser, p)]
            dice = site_dice(rows, federation, args.finetune, args.n_labeled)
            if "random" not in dice:
                parser.error(f"setting {label!r}: {', '.join(map(str, paths))} has no random-init rows for "
                             f"federation={federation}, finetune={args.finetune}, n_labeled={args.n_labeled}")
            lines.append(target_row(label, dice))
        print(f"{args.finetune} fine-tuning, N = {args.n_labeled}: gains over random init (seed-averaged paired means "
              "over sites)\n")
        print("\n".join(lines))
        return 0

    rows = _read_merged(parser, args.csv)
    dice = site_dice(rows, args.federation, args.finetune, args.n_labeled)
    if not dice:
        parser.error(f"{args.csv} has no rows for federation={args.federation}, finetune={args.finetune}, "
                     f"n_labeled={args.n_labeled}")
    if "random" not in dice:
        parser.error(f"{args.csv} has no random-init rows for that task: gains over random init need them")
    print(f"{args.finetune} fine-tuning, N = {args.n_labeled}, {args.federation} federation "
          "(paired cells: mean ± std over sites of the seed-averaged per-site difference; sites ahead; "
          "the mean in standard errors)\n")
    print(summary_table(dice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
