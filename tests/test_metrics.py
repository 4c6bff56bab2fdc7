"""Round records: JSON lines, per-site CSV, console line, truncation on resume, PNG."""

import csv
import json
from pathlib import Path

from fcl_flower.metrics import RunRecorder, console_line


def _record(r: int, failed: bool = False) -> dict:
    sites = {
        f"site_{i:02d}": {"loss": 4.0 - r * 0.1 - i * 0.01, "samples": 10, "down_weights_bytes": 1_000_000, "down_bank_bytes": 50_000, "remote_rows": 100}
        for i in range(3 - failed)
    }
    return {
        "round": r, "stage": "pretrain", "seconds": 1.5, "loss": 4.0 - r * 0.1, "eval_loss": 4.2,
        "sites": sites, "failures": [{"site": "site_02", "reason": "DataError: bad"}] if failed else [],
        "rejected_banks": [],
        "environment": {"server": "0a0a0a0a", "sites": {name: f"{r:08d}" for name in sites}, "described": {}},
    }


def test_files_follow_records_and_resume_truncates(tmp_path: Path):
    lines: list[str] = []
    rec = RunRecorder(tmp_path, echo=lines.append)
    for r in (1, 2, 3):
        rec.record(_record(r, failed=(r == 2)), total_rounds=3)
    assert [json.loads(x)["round"] for x in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1, 2, 3]
    rows = list(csv.DictReader(open(tmp_path / "rounds.csv")))
    assert len(rows) == 9
    assert [r["status"] for r in rows if r["round"] == "2" and r["site"] == "site_02"] == ["failed"]
    assert [r["environment"] for r in rows if r["site"] == "site_00"] == ["00000001", "00000002", "00000003"]
    assert [r["environment"] for r in rows if r["status"] == "failed"] == [""]
    assert "round 2/3" in lines[1] and "2 ok 1 failed" in lines[1]
    rec.truncate_after(1, "pretrain")
    assert [r["round"] for r in rec.records()] == [1]
    assert len(list(csv.DictReader(open(tmp_path / "rounds.csv")))) == 3
    png = rec.plot()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_line_is_one_concise_line():
    line = console_line(_record(4), total_rounds=10)
    assert "\n" not in line and line.startswith("[fcl] pretrain round 4/10")
    assert "loss 3.6000" in line and "down 1.00+0.05 MB/site" in line
