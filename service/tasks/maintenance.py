"""Periodic clean-up, scheduled by Celery beat (see ``beat_schedule`` in service.app)."""

from __future__ import annotations

import time

from service.app import app
from service.settings import load


@app.task(name="maintenance.cleanup_reports", max_retries=2)
def cleanup_reports(max_age_hours: float | None = None) -> int:
    """Delete report exports (*.csv, *.xlsx) older than ``max_age_hours`` (KIT_REPORT_MAX_AGE_HOURS).

    Returns the number of files deleted. Safe to run twice at once: a file
    already gone is skipped.
    """
    settings = load()
    age_h = settings.report_max_age_hours if max_age_hours is None else float(max_age_hours)
    cutoff = time.time() - age_h * 3600
    directory = settings.report_dir
    if not directory.is_dir():
        return 0
    deleted = 0
    # CSV and XLSX exports; never the temporary files of one being written (*.tmp).
    for path in [*directory.glob("*.csv"), *directory.glob("*.xlsx")]:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                deleted += 1
        except FileNotFoundError:
            continue
    return deleted
