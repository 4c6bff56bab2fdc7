"""The benchmark suite: its parts on small inputs, the client's start-up metric, and --quick end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "simulations"))

import benchmark as bm  # noqa: E402

TINY = ["model.channels=[8,16,32]", "model.proj_hidden=32", "model.proj_dim=16", "pretrain.queue_size=64",
        "pretrain.bank_sample_size=64"]


def test_tree_memory_follows_children_in_other_sessions():
    # A parent that starts a child in a session of its own; the child holds ~200 MB.
    child = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    sampler = bm.TreeMemory(proc.pid, interval=0.2)
    sampler.start()
    try:
        deadline = time.monotonic() + 60
        while sampler.peak_rss < 200 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        result = sampler.stop()
        for group in sampler.groups:  # the parent's and the child's (our own group is never in it)
            try:
                os.killpg(group, 9)
            except ProcessLookupError:
                pass
        proc.wait()
    assert result["peak_rss_gb"] * bm.GB >= 200 * 2**20
    assert 0 < result["peak_pss_gb"] and result["max_processes"] >= 2 and result["samples"] > 0


def test_relay_bytes_all_to_all_grow_with_sites_and_weights_do_not():
    from fcl_flower.config import load_config

    cfg = load_config([*TINY, *bm.all_to_all()])
    small, large = (bm._per_site(bm._relay_round_bytes(cfg, n, 64)) for n in (3, 6))
    assert small["remote_rows"] == 2 * 64 and large["remote_rows"] == 5 * 64
    assert large["down_bank_bytes"] > 2 * small["down_bank_bytes"]
    assert small["down_weights_bytes"] == large["down_weights_bytes"] > 0
    assert small["up_bank_bytes"] == large["up_bank_bytes"] >= 64 * 16 * 4
    # float16 halves the feature bytes
    half = bm._per_site(bm._relay_round_bytes(load_config([*TINY, "relay.max_rows_per_site=0"]), 3, 64))
    assert half["remote_rows"] == small["remote_rows"] and half["down_bank_bytes"] < 0.7 * small["down_bank_bytes"]


def test_markdown_keeps_hand_written_text(tmp_path: Path):
    doc = {"command": "fcl-flower bench", "profile": "quick", "finished": "now", "seconds": 60.0,
           "machine": bm.machine_info(), "summary": {"trainer_overhead_ratio": 1.05}, "results": {}}
    path = tmp_path / "BENCHMARKS.md"
    bm.write_markdown(path, doc)
    text = path.read_text()
    assert text.startswith("# Benchmarks") and bm.BEGIN in text and "| `trainer_overhead_ratio`" in text
    path.write_text("# Benchmarks\n\nanalysis before\n\n" + text[text.index(bm.BEGIN):] + "\n## Fixes\n\nafter\n")
    doc["summary"]["trainer_overhead_ratio"] = 1.5
    bm.write_markdown(path, doc)
    text = path.read_text()
    assert "analysis before" in text and "## Fixes\n\nafter" in text and "1.500 | < 1.1 | **missed**" in text
    assert text.count(bm.BEGIN) == 1


def test_client_reports_its_startup(tiny_synthetic: Path, small_cfg, tmp_path: Path):
    from fcl_flower import client_app
    from fcl_flower.config import config_to_yaml
    from fcl_flower.pretrain import initial_weights

    # The process start time is in the past, and only the first message of a process is timed from it.
    assert client_app.process_start_time() <= time.time()
    cfg = small_cfg("sites=2", f"data.root={tiny_synthetic}", f"output_dir={tmp_path / 'run'}", *TINY)
    before = time.time()
    client = client_app.StageClient({"partition-id": 0}, started=before - 2.0)
    _, _, metrics = client.fit(initial_weights(cfg), {"config": config_to_yaml(cfg), "stage": "pretrain", "round": 1})
    assert 2.0 <= metrics["startup_seconds"] <= 2.0 + (time.time() - before)
    assert 0.0 <= metrics["setup_seconds"] <= metrics["startup_seconds"] and metrics["seconds"] > 0


def test_message_start_time_is_the_process_start_once():
    from fcl_flower import client_app

    saved = client_app._PROCESS_START
    try:
        client_app._PROCESS_START = 123.0
        assert client_app.message_start_time() == 123.0
        now = time.time()
        assert client_app.message_start_time() >= now  # Ray reuses the process: later messages start now
    finally:
        client_app._PROCESS_START = saved


@pytest.mark.slow
def test_quick_mode_writes_every_key(tmp_path: Path):
    out, work = tmp_path / "docs", tmp_path / "work"
    caches = [f"synthetic.cache_root={tmp_path / 'synthetic'}", f"data.cache_dir={tmp_path / 'cache'}"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fcl-flower"), "bench", "--quick", "--out-dir", str(out),
         "--work-dir", str(work), *caches],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "benchmarks.json").read_text())
    for key in bm.REQUIRED_KEYS:
        assert key in doc, key
    for key in ("trainer_overhead_ratio", "round_time_ratio_fcl_vs_fedmoco", "peak_rss_gb_100_sites",
                "deploy_startup_fraction"):
        assert isinstance(doc[key], float) and math.isfinite(doc[key]) and doc[key] > 0, (key, doc[key])
    assert isinstance(doc["weight_download_bytes_per_site"], int) and doc["weight_download_bytes_per_site"] > 0
    banks = doc["bank_download_bytes_per_site"]
    assert set(banks) == {"10", "50"} and all(isinstance(v, int) and v > 0 for v in banks.values())
    a2a = doc["bank_download_bytes_per_site_all_to_all"]
    assert a2a["50"] > 4 * a2a["10"]  # the paper's relay grows with the number of sites
    assert doc["details"]["bytes"]["cross_check"]["values_compared"] > 0
    assert doc["details"]["bytes"]["cross_check"]["mismatches"] == []
    assert doc["details"]["deploy"]["status"] == "finished:completed"
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["flwr"] == "1.42.0"
    md = (out / "BENCHMARKS.md").read_text()
    for heading in ("## Machine", "## Targets", "## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in md, heading
    print(f"quick benchmark: {time.monotonic() - t0:.0f} s")

    # --update re-measures one section and keeps the others, saying which run measured which
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fcl-flower"), "bench", "--quick", "--sections", "bytes", "--update",
         "--out-dir", str(out), "--work-dir", str(work), *caches],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    updated = json.loads((out / "benchmarks.json").read_text())
    for key in bm.REQUIRED_KEYS:
        assert updated[key] == doc[key], key  # the bytes are deterministic; the kept sections are copied
    assert updated["details"]["deploy"] == doc["details"]["deploy"]
    assert "cross_check" not in updated["details"]["bytes"]  # its simulation (section 2) was not re-run
    assert "--update" in updated["measured_by"]["bytes"]["command"].split()
    assert updated["measured_by"]["deploy"] == doc["measured_by"]["deploy"]
    assert "Sections come from more than one run" in (out / "BENCHMARKS.md").read_text()
