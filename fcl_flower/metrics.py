"""Per-round metrics of a run: JSON lines, a per-site CSV, one console line, a PNG of curves.

A round record is a plain dict::

    {"round": 3, "stage": "pretrain", "seconds": 12.1, "loss": 4.2, "eval_loss": 4.4,
     "sites": {"site_00": {"loss": 4.1, "samples": 16, "seconds": 5.2,
                           "up_weights_bytes": ..., "up_bank_bytes": ...,
                           "down_weights_bytes": ..., "down_bank_bytes": ...,
                           "remote_rows": 512, "eval_loss": 4.3}, ...},
     "failures": [{"site": "site_03", "reason": "..."}],
     "rejected_banks": [{"site": "site_05", "reason": "..."}],
     "environment": {"server": "3f1c9a0b", "sites": {"site_00": "3f1c9a0b", ...},
                     "described": {"3f1c9a0b": {"torch": "2.13.0+cpu", ...}}}}

``environment`` is ``fcl_flower.environment``'s record of where the round was computed;
``rounds.csv`` gives each site's environment id.

Flower-free; the ServerApp builds the records.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

SITE_COLUMNS = (
    "loss", "eval_loss", "samples", "steps", "seconds", "up_weights_bytes", "up_bank_bytes",
    "down_weights_bytes", "down_bank_bytes", "remote_rows",
)


class RunRecorder:
    """Appends round records to ``rounds.jsonl`` and keeps ``rounds.csv`` in step with it."""

    def __init__(self, output_dir: Path, echo: Callable[[str], None] = print) -> None:
        self.output_dir = output_dir
        self.jsonl = output_dir / "rounds.jsonl"
        self.csv = output_dir / "rounds.csv"
        self.echo = echo

    def records(self) -> list[dict[str, Any]]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def truncate_after(self, server_round: int, stage: str) -> None:
        """Drop records of rounds after a resumed checkpoint (they are run again)."""
        kept = [r for r in self.records() if not (r["stage"] == stage and r["round"] > server_round)]
        self._rewrite(kept)

    def record(self, rec: dict[str, Any], total_rounds: int) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        self._write_csv(self.records())
        self.echo(console_line(rec, total_rounds))

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.jsonl.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.jsonl)
        self._write_csv(records)

    def _write_csv(self, records: list[dict[str, Any]]) -> None:
        tmp = self.csv.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(("stage", "round", "site", "status", *SITE_COLUMNS, "environment"))
            for rec in records:
                failed = {f["site"]: f["reason"] for f in rec.get("failures", [])}
                environments = rec.get("environment", {}).get("sites", {})
                for site, values in sorted(rec.get("sites", {}).items()):
                    writer.writerow((rec["stage"], rec["round"], site, "ok", *(values.get(c, "") for c in SITE_COLUMNS),
                                     environments.get(site, "")))
                for site in sorted(failed):
                    writer.writerow((rec["stage"], rec["round"], site, "failed", *([""] * (len(SITE_COLUMNS) + 1))))
        tmp.replace(self.csv)

    def plot(self, png: Path | None = None) -> Path:
        """Write the loss and traffic curves of all recorded rounds as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        png = png or self.output_dir / "curves.png"
        records = self.records()
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for stage in dict.fromkeys(r["stage"] for r in records):
            rs = [r for r in records if r["stage"] == stage]
            x = [r["round"] for r in rs]
            axes[0].plot(x, [r.get("loss") for r in rs], "o-", label=f"{stage} train")
            if any(r.get("eval_loss") is not None for r in rs):
                axes[0].plot(x, [r.get("eval_loss") for r in rs], "s--", label=f"{stage} held-out")
            axes[1].plot(x, [r["seconds"] for r in rs], "o-", label=stage)
            for key, style in (("down_weights_bytes", "o-"), ("down_bank_bytes", "s--")):
                axes[2].plot(x, [_mean_site(r, key) / 1e6 for r in rs], style, label=f"{stage} {key.split('_')[1]}")
        for ax, title in zip(axes, ("loss", "seconds per round", "MB down per site")):
            ax.set_title(title)
            ax.set_xlabel("round")
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png


def _mean_site(rec: dict[str, Any], key: str) -> float:
    values = [s.get(key, 0) or 0 for s in rec.get("sites", {}).values()]
    return sum(values) / len(values) if values else 0.0


def console_line(rec: dict[str, Any], total_rounds: int) -> str:
    """``[fcl] pretrain round 3/10 | loss 4.123 | held-out 4.200 | sites 9 ok 1 failed | ...``"""
    parts = [f"[fcl] {rec['stage']} round {rec['round']}/{total_rounds}"]
    for key, label in (("loss", "loss"), ("eval_loss", "held-out"), ("dice", "dice")):
        if rec.get(key) is not None:
            parts.append(f"{label} {rec[key]:.4f}")
    parts.append(f"sites {len(rec.get('sites', {}))} ok {len(rec.get('failures', []))} failed")
    if rec.get("rejected_banks"):
        parts.append(f"{len(rec['rejected_banks'])} banks rejected")
    parts.append(f"down {_mean_site(rec, 'down_weights_bytes') / 1e6:.2f}+{_mean_site(rec, 'down_bank_bytes') / 1e6:.2f} MB/site")
    parts.append(f"{rec['seconds']:.1f} s")
    return " | ".join(parts)
