"""Seed-averaged paired tables: merging runs' per-fold CSVs and averaging site by site over seeds."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "simulations"))

import paper_experiment as pe  # noqa: E402
import seed_tables as st  # noqa: E402


def _folds_csv(path: Path, dice: dict[str, dict[str, tuple[float, ...]]], n_labeled: int = 1) -> Path:
    """A ``results_folds.csv`` as the driver writes it: {method: {site: per-fold Dice}} at local N."""
    rows = [{"method": m, "finetune": "local", "n_labeled": n_labeled, "site": site, "fold": k, "dice": d,
             "hd95": 10.0, "environment": "env"}
            for m, sites in dice.items() for site, folds in sites.items() for k, d in enumerate(folds)]
    pe.write_csv(rows, path, pe.FOLD_COLUMNS)
    return path


def test_merge_and_summary_average_each_sites_gain_over_seeds(tmp_path, capsys) -> None:
    # seed 0: FCL gains +0.2 on site a, +0.0 on b; FedSimCLR +0.1 on both.
    seed0 = _folds_csv(tmp_path / "s0.csv", {
        "random": {"a": (0.3, 0.5), "b": (0.4, 0.4)},
        "fcl": {"a": (0.5, 0.7), "b": (0.4, 0.4)},
        "fedsimclr": {"a": (0.5, 0.5), "b": (0.5, 0.5)},
    })
    # seed 2: FCL +0.1 on a, +0.2 on b; FedSimCLR not run; an N = 2 row that merge drops.
    seed2 = _folds_csv(tmp_path / "s2.csv", {"random": {"a": (0.2,), "b": (0.3,)}, "fcl": {"a": (0.3,), "b": (0.5,)}})
    extra = _folds_csv(tmp_path / "n2.csv", {"random": {"a": (0.9,)}}, n_labeled=2)
    merged = tmp_path / "merged.csv"
    assert st.main(["merge", str(merged), f"test:0:{seed0}", f"test:2:{seed2}", f"test:2:{extra}", "--n-labeled", "1"]) == 0
    with merged.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(st.SEED_COLUMNS)
    assert len(rows) == 12 + 4 and {r["seed"] for r in rows} == {"0", "2"}

    dice = st.site_dice(rows, "test", "local", 1)
    assert dice["random"][0] == pytest.approx({"a": 0.4, "b": 0.4})
    gain, seeds = st.seed_averaged_difference(dice, "fcl", "random")
    assert seeds == [0, 2] and gain == pytest.approx({"a": 0.15, "b": 0.1})
    assert st.seed_averaged_difference(dice, "fcl", "fedsimclr")[1] == [0]

    assert st.main(["summary", str(merged)]) == 0
    table = capsys.readouterr().out
    # FCL: site gains 0.15 and 0.10 -> +0.125 ± 0.025, both ahead, 0.125 / (0.025 / sqrt 2) = 7.1 SE
    assert "| FCL | 0.500 | 0.400 | +0.125 ± 0.025 (2/2, 7.1 SE) |  |" in table
    # FedSimCLR ran at seed 0 only: its cells say so; FCL - FedSimCLR at seed 0 is +0.1 and -0.1
    assert "| FedSimCLR | 0.500 | — | +0.100 ± 0.000 (2/2, ∞ SE) [seeds 0] | +0.000 ± 0.100 (1/2, 0.0 SE) [seeds 0] |" in table


def test_summary_names_what_is_missing(tmp_path) -> None:
    merged = tmp_path / "merged.csv"
    st.main(["merge", str(merged), f"test:0:{_folds_csv(tmp_path / 'a.csv', {'fcl': {'a': (0.5,)}})}"])
    with pytest.raises(SystemExit):
        st.main(["summary", str(merged)])  # no random-init rows
    with pytest.raises(SystemExit):
        st.main(["summary", str(merged), "--federation", "dev"])  # no rows for that federation
    with pytest.raises(SystemExit):
        st.main(["merge", str(tmp_path / "x.csv"), f"test:0:{tmp_path / 'absent.csv'}"])
    with pytest.raises(SystemExit):
        st.main(["merge", str(tmp_path / "x.csv"), "test:zero:a.csv"])


def _merged(tmp_path: Path, name: str, seeds: dict[int, dict[str, float]]) -> Path:
    """A merged CSV of one federation: {seed: {method: Dice on both sites, one fold each}}."""
    runs = [_folds_csv(tmp_path / f"{name}{seed}.csv", {m: {"a": (d,), "b": (d,)} for m, d in dice.items()})
            for seed, dice in seeds.items()]
    merged = tmp_path / f"{name}.csv"
    st.main(["merge", str(merged), *(f"test:{seed}:{run}" for seed, run in zip(seeds, runs))])
    return merged


def test_target_is_met_only_when_every_comparison_holds(tmp_path, capsys) -> None:
    paper_order = {"random": 0.30, "local_cl": 0.35, "fedrotation": 0.36, "fedsimclr": 0.34,
                   "fcl_no_fe": 0.38, "fcl_no_gsm": 0.42, "fcl": 0.45}
    met = _merged(tmp_path, "met", {0: paper_order})
    # FCL gains only +0.08, FedRotation beats it over the two seeds, and w/o GSM is above it at seed 0
    short = _merged(tmp_path, "short", {0: {**paper_order, "fcl": 0.38, "fcl_no_gsm": 0.40, "fcl_no_fe": 0.37},
                                        2: {"random": 0.30, "fcl": 0.38, "fedrotation": 0.42}})
    untried = _merged(tmp_path, "untried", {0: {"random": 0.30, "fcl": 0.45, "fedsimclr": 0.34}})
    assert st.main(["target", f"as the paper=test:{met}", f"short=test:{short}", f"untried=test:{untried}"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[-3] == ("| as the paper | 0 | 0.300 | +0.150 | +0.050 | +0.060 | +0.040 | +0.120 | +0.080 | met |")
    assert rows[-2].startswith("| short | 0,2 | 0.300 | +0.080 | +0.050 [0] | +0.090 | +0.040 [0] | +0.100 [0] | +0.070 [0] |")
    assert rows[-2].endswith("| not met: FCL gains +0.080 < +0.10; FCL − FedRotation -0.010; FCL − w/o GSM -0.020 [0] |")
    assert rows[-1].endswith("| undecided, not run: local CL, FedRotation, w/o GSM, w/o FE |")


def test_target_names_a_bad_setting(tmp_path) -> None:
    no_random = _merged(tmp_path, "nr", {0: {"fcl": 0.45}})
    for setting in ("no federation", f"x=test:{no_random}", f"x=test:{tmp_path / 'absent.csv'}",
                    f"x=test:{_folds_csv(tmp_path / 'unmerged.csv', {'random': {'a': (0.3,)}})}"):
        with pytest.raises(SystemExit):
            st.main(["target", setting])
