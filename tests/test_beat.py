"""Celery beat, run for real, schedules the report clean-up that a real worker runs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.helpers import running_beat, wait_until


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
    with running_beat(kit_env, log_path) as still_running:
        def old_export_deleted() -> bool:
            still_running()
            return not old.exists()

        wait_until(old_export_deleted, 60, "the scheduled clean-up to delete the old export", interval=0.1)

    assert new.exists()
    assert any(state_dir.glob("celerybeat-schedule*"))  # beat kept its state where it was told
    assert "Sending due task maintenance.cleanup_reports" in log_path.read_text(errors="replace")
