"""Celery beat, run for real, schedules the report clean-up that a real worker runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, wait_until


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM beat and wait; SIGKILL its process group if it does not exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # and anything it left in its group
    process.wait(10)


def test_beat_schedules_the_report_cleanup(kit_env, monkeypatch, start_worker, tmp_path):
    state_dir = tmp_path / "beat-state"
    state_dir.mkdir()  # beat cannot create its schedule file in a missing directory
    for key, value in {"KIT_CLEANUP_INTERVAL": "1", "KIT_STATE_DIR": str(state_dir)}.items():
        monkeypatch.setenv(key, value)
        kit_env[key] = value

    report_dir = Path(kit_env["KIT_REPORT_DIR"])
    report_dir.mkdir(parents=True)
    old, new = report_dir / "old-export.csv", report_dir / "new-export.csv"
    for path in (old, new):
        path.write_text("a,b\n1,2\n")
    long_ago = time.time() - 200 * 3600  # older than KIT_REPORT_MAX_AGE_HOURS (168)
    os.utime(old, (long_ago, long_ago))

    start_worker(queues=("bulk",))
    log_path = tmp_path / "beat.log"
    with log_path.open("wb") as log:
        beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "service.app", "beat", "-l", "INFO"],
            env=kit_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            def old_export_deleted() -> bool:
                if beat.poll() is not None:
                    pytest.fail(f"beat exited with {beat.returncode}:\n{log_path.read_text(errors='replace')}")
                return not old.exists()

            wait_until(old_export_deleted, 20, "the scheduled clean-up to delete the old export", interval=0.1)
        finally:
            _stop(beat)

    assert new.exists()
    assert any(state_dir.glob("celerybeat-schedule*"))  # beat kept its state where it was told
    assert "Sending due task maintenance.cleanup_reports" in log_path.read_text(errors="replace")
