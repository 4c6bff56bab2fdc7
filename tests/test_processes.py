"""How a finished run is reported: the exit code and the reason shown to the user."""

from __future__ import annotations

from pathlib import Path

from fcl_flower.processes import report_outcome

TRACEBACK = """INFO :      Starting Flower ServerApp
Traceback (most recent call last):
  File "server_app.py", line 101, in _restore
    raise ConfigError(
ValueError: an earlier, wrapped error
fcl_flower.config.ConfigError: /run/checkpoints: the checkpoint holds another model than this config builds
ERROR :     Exit Code: 700
"""


def test_a_failed_run_names_its_last_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "run.log").write_text(TRACEBACK)
    assert report_outcome("finished:failed", False, tmp_path) == 1
    err = capsys.readouterr().err
    assert "status finished:failed, summary missing" in err
    assert "last error: fcl_flower.config.ConfigError: /run/checkpoints: the checkpoint holds another model" in err


def test_a_completed_run_is_quiet_and_a_log_without_errors_adds_nothing(tmp_path: Path, capsys) -> None:
    assert report_outcome("finished:completed", True, tmp_path) == 0
    assert capsys.readouterr().err == ""
    (tmp_path / "run.log").write_text("INFO :      round 1\n")
    assert report_outcome("finished:completed", False, tmp_path) == 1  # no summary: not complete
    assert "last error" not in capsys.readouterr().err
