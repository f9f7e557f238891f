"""Export rows as a CSV file under KIT_REPORT_DIR.

The file is named after the report and the task id and written atomically
(temporary file in the same directory, fsync, rename), so a re-delivered task
replaces its own file instead of adding a second one, and a reader never sees
a half-written export. Bad input raises PermanentError: no retry can fix it.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

from celery import Task

from service.app import app
from service.errors import PermanentError
from service.settings import load
from service.tasks.files import written_atomically

#: Report names and task ids must match this to become part of a file name.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")


def report_path(report_dir: Path, report: str, task_id: str) -> Path:
    """Where the export of ``report`` by task ``task_id`` is written."""
    return report_dir / f"{report}-{task_id}.csv"


def _check_input(report: Any, rows: Any, columns: Any) -> list[str]:
    """Validate the arguments; return the header row. Raises PermanentError."""
    if not isinstance(report, str) or not SAFE_NAME.fullmatch(report):
        raise PermanentError(
            f"invalid report name {report!r}: use 1-100 letters, digits, '_' or '-' (it becomes a file name)"
        )
    if not isinstance(rows, list):
        raise PermanentError(f"rows must be a list of objects (dicts), got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PermanentError(f"rows[{index}] is a {type(row).__name__}, not an object (dict)")
    if columns is None:
        # Every key that appears, in the order of first appearance.
        return list(dict.fromkeys(key for row in rows for key in row))
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise PermanentError(f"columns must be a list of non-empty strings or null, got {columns!r}")
    if len(set(columns)) != len(columns):
        raise PermanentError(f"columns has duplicates: {columns!r}")
    return columns


def _cell(value: Any) -> Any:
    """Nested values become JSON text (not Python's repr); None becomes an empty cell."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


def write_csv_atomically(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` under ``header`` to ``path`` so it appears complete or not at all."""
    with written_atomically(path) as tmp_name, open(tmp_name, "w", newline="", encoding="utf-8") as f:
        # Keys not in ``columns`` are left out; missing ones are empty cells.
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)
        f.flush()
        os.fsync(f.fileno())


@app.task(name="reports.export", bind=True)
def export(self: Task, report: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Write ``rows`` as CSV to KIT_REPORT_DIR/<report>-<task id>.csv and return that path.

    Promises: the file is complete when it appears (atomic rename); running the
    same task again overwrites it; ``columns`` picks and orders the columns
    (default: every key, in order of first appearance); nested values are
    written as JSON. A bad report name, rows that are not a list of dicts or
    bad columns raise PermanentError.
    Disk errors (full, read-only) are raised as they are and retried.
    """
    header = _check_input(report, rows, columns)
    task_id = self.request.id
    if task_id is None:
        raise PermanentError("reports.export must run as a task (it names the file after the task id)")
    if not SAFE_NAME.fullmatch(task_id):
        raise PermanentError(f"task id {task_id!r} cannot be used in a file name; publish with a UUID task id")
    directory = load().report_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = report_path(directory, report, task_id)
    write_csv_atomically(path, header, rows)
    return str(path)
