"""Work-log exports: the report of the integrated example (a web page submits it, polls it, downloads it).

There is no database in the kit, so the rows are made up, deterministically,
from the inputs: every weekday from ``start_date`` to ``end_date``, one to
three entries per employee of a fixed directory of EMPLOYEE_COUNT employees
(``emp_001`` ...), each entry seeded by its date and employee, so the same
request always gives the same rows. In a real application this module would
read them from the database; the rest (validation, chunks, progress, atomic
file) stays as it is.

The file (CSV, or XLSX through openpyxl) is written under KIT_REPORT_DIR as
``work_logs_<start>_<end>_<task id>.<format>``, atomically (temporary file in
the same directory, fsync, rename): a re-delivered task replaces its own file,
and a reader never sees half of one. While it writes, the task reports its
progress with ``update_state(state="PROGRESS", meta={"current", "total",
"percent", "message"})``, as Celery documents; without a result backend that
is skipped. Bad input (dates, format, an employee the directory does not know)
raises PermanentError: no retry can fix it, the message is dead-lettered.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import date, timedelta
from typing import Any

from celery import Task
from celery.backends.base import DisabledBackend

from service.app import app
from service.errors import PermanentError
from service.settings import load
from service.tasks.contracts import (
    EXPORT_FORMATS,
    MAX_CHUNK_PAUSE,
    MAX_EMPLOYEES,
    MAX_EXPORT_DAYS,
    WORK_LOGS_TASK,
)
from service.tasks.files import written_atomically

logger = logging.getLogger(__name__)

#: The made-up employee directory: emp_001 .. emp_<EMPLOYEE_COUNT>.
EMPLOYEE_COUNT = 50
#: Employees of an export that names none: the first DEFAULT_EMPLOYEES of the directory.
DEFAULT_EMPLOYEES = 20
#: Progress is reported this many times while the rows are written (after each chunk).
PROGRESS_STEPS = 20
COLUMNS = ("date", "employee_id", "employee_name", "project", "task", "hours", "description")

_EMPLOYEE_ID = re.compile(r"emp_(\d{3})")
_FIRST = ("Li", "Wang", "Zhang", "Liu", "Chen", "Yang", "Zhao", "Huang", "Zhou", "Wu")
_LAST = ("Wei", "Fang", "Na", "Min", "Jing", "Lei", "Yan", "Jun", "Tao", "Hui")
_PROJECTS = ("CRM", "Billing", "Mobile app", "Data platform", "Support portal")
_TASKS = ("development", "code review", "meetings", "testing", "documentation", "customer call")


def employee_ids_default() -> list[str]:
    """The employees of an export that names none."""
    return [f"emp_{n:03d}" for n in range(1, DEFAULT_EMPLOYEES + 1)]


def employee_name(employee_id: str) -> str:
    """The directory's name for ``employee_id`` (which must be known)."""
    n = int(employee_id[4:])
    return f"{_FIRST[n % len(_FIRST)]} {_LAST[(n // len(_FIRST)) % len(_LAST)]}"


def file_name(start: date, end: date, task_id: str, export_format: str) -> str:
    """The export's file name (in KIT_REPORT_DIR)."""
    return f"work_logs_{start.isoformat()}_{end.isoformat()}_{task_id}.{export_format}"


def _parse_date(value: Any, field: str) -> date:
    if not isinstance(value, str):
        raise PermanentError(f"{field} must be a date as YYYY-MM-DD, got {value!r}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise PermanentError(f"{field} {value!r} is not a date as YYYY-MM-DD") from None


def check_input(start_date: Any, end_date: Any, employee_ids: Any, export_format: Any,
                chunk_pause: Any) -> tuple[date, date, list[str]]:
    """The validated dates and employees; PermanentError naming the argument otherwise.

    Unknown employees are only found here, as a database lookup would find them.
    """
    start, end = _parse_date(start_date, "start_date"), _parse_date(end_date, "end_date")
    if end < start:
        raise PermanentError(f"end_date {end} is before start_date {start}")
    if (end - start).days + 1 > MAX_EXPORT_DAYS:
        raise PermanentError(f"{start} to {end} is more than {MAX_EXPORT_DAYS} days; export a shorter range")
    if export_format not in EXPORT_FORMATS:
        raise PermanentError(f"export_format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
    if isinstance(chunk_pause, bool) or not isinstance(chunk_pause, int | float) or not (
            0 <= chunk_pause <= MAX_CHUNK_PAUSE):
        raise PermanentError(f"chunk_pause must be 0 to {MAX_CHUNK_PAUSE:g} seconds, got {chunk_pause!r}")
    if employee_ids is None:
        return start, end, employee_ids_default()
    if not isinstance(employee_ids, list) or not all(isinstance(e, str) for e in employee_ids):
        raise PermanentError(f"employee_ids must be a list of strings or null, got {employee_ids!r}")
    if not employee_ids or len(employee_ids) > MAX_EMPLOYEES:
        raise PermanentError(f"employee_ids must name 1 to {MAX_EMPLOYEES} employees, got {len(employee_ids)}")
    unknown = [e for e in employee_ids if not (m := _EMPLOYEE_ID.fullmatch(e)) or not
               1 <= int(m[1]) <= EMPLOYEE_COUNT]
    if unknown:
        raise PermanentError(f"unknown employee ids: {', '.join(unknown[:10])}"
                             f"{' ...' if len(unknown) > 10 else ''} (the directory has emp_001 to "
                             f"emp_{EMPLOYEE_COUNT:03d})")
    return start, end, list(dict.fromkeys(employee_ids))


def work_log_rows(start: date, end: date, employee_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The rows of an export, in date then employee order: the same inputs give the same rows."""
    employees = list(employee_ids)
    rows: list[dict[str, Any]] = []
    day = start
    while day <= end:
        if day.weekday() < 5:
            for employee in employees:
                rng = random.Random(f"{day.isoformat()}/{employee}")
                for _ in range(rng.randint(1, 3)):
                    project, task = rng.choice(_PROJECTS), rng.choice(_TASKS)
                    rows.append({
                        "date": day.isoformat(), "employee_id": employee, "employee_name": employee_name(employee),
                        "project": project, "task": task, "hours": rng.randint(1, 16) / 2,
                        "description": f"{task} on {project}",
                    })
        day += timedelta(days=1)
    return rows


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    size = max(1, math.ceil(len(rows) / PROGRESS_STEPS))
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def _write_csv(path: str, rows: list[dict[str, Any]], after_chunk: Callable[[int], None]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        done = 0
        for chunk in _chunks(rows):
            writer.writerows(chunk)
            done += len(chunk)
            after_chunk(done)
        f.flush()
        os.fsync(f.fileno())


def _write_xlsx(path: str, rows: list[dict[str, Any]], after_chunk: Callable[[int], None]) -> None:
    from openpyxl import Workbook

    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet("work_logs")
    sheet.append(list(COLUMNS))
    done = 0
    for chunk in _chunks(rows):
        for row in chunk:
            sheet.append([row[c] for c in COLUMNS])
        done += len(chunk)
        after_chunk(done)
    workbook.save(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class _Progress:
    """Reports PROGRESS states of a running task; best effort: a failed write is logged once, then skipped."""

    def __init__(self, task: Task, total: int) -> None:
        self.task, self.total = task, total
        self.enabled = bool(task.request.id) and not isinstance(task.backend, DisabledBackend)

    def __call__(self, current: int) -> None:
        if not self.enabled:
            return
        # 99 at most until the file is in place: 100 is the finished task.
        percent = min(99, int(current * 100 / self.total)) if self.total else 99
        meta = {"current": current, "total": self.total, "percent": percent,
                "message": f"writing rows ({current}/{self.total})"}
        try:
            self.task.update_state(state="PROGRESS", meta=meta)
        except Exception:  # noqa: BLE001 - progress must never fail the export
            logger.warning("could not store the progress of %s; not reporting it any more", self.task.request.id,
                           exc_info=True)
            self.enabled = False


@app.task(name=WORK_LOGS_TASK, bind=True)
def work_logs(self: Task, start_date: str, end_date: str, employee_ids: list[str] | None = None,
              export_format: str = "xlsx", chunk_pause: float = 0.0) -> dict[str, Any]:
    """Write the work logs of ``start_date`` .. ``end_date`` (YYYY-MM-DD) as CSV or XLSX under KIT_REPORT_DIR.

    ``employee_ids`` (default: the first DEFAULT_EMPLOYEES of the directory)
    picks the employees; ``chunk_pause`` seconds (0 to 1) are slept after each
    of the PROGRESS_STEPS chunks, only to make the progress watchable in demos
    and tests. Promises: the rows are the same for the same inputs; the file is
    complete when it appears; progress is reported while it is written.
    Returns ``{"file_name", "rows", "size", "format", "start_date", "end_date"}``.
    Bad input raises PermanentError; disk errors are raised as they are (retried).
    """
    start, end, employees = check_input(start_date, end_date, employee_ids, export_format, chunk_pause)
    task_id = self.request.id
    if not task_id or not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", task_id):
        raise PermanentError(f"reports.work_logs needs a task id usable in a file name (a UUID), got {task_id!r}")
    rows = work_log_rows(start, end, employees)
    directory = load().report_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name(start, end, task_id, export_format)
    progress = _Progress(self, len(rows))

    def after_chunk(done: int) -> None:
        progress(done)
        if chunk_pause:
            time.sleep(chunk_pause)

    with written_atomically(path) as tmp_name:
        (_write_csv if export_format == "csv" else _write_xlsx)(tmp_name, rows, after_chunk)
    return {"file_name": path.name, "rows": len(rows), "size": path.stat().st_size, "format": export_format,
            "start_date": start.isoformat(), "end_date": end.isoformat()}
