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
