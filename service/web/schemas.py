"""Request and response models of the web service: what is validated, and every JSON shape it answers.

Requests are strict: unknown fields, dates that are not YYYY-MM-DD, an end
before the start, a range, list or text too long, a format or type not offered
are refused with 422 naming the field, before anything is published. The limits
are the tasks' own (service.tasks.contracts); what only a task can know (an
employee the directory does not have) fails in the task and shows in its status.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from service.tasks.contracts import EMPLOYEE_ID, MAX_EMPLOYEES, MAX_EXPORT_DAYS, MAX_MESSAGE, USER_ID

EmployeeId = Annotated[str, StringConstraints(pattern=f"^{EMPLOYEE_ID.pattern}$")]


def _date_text(value: Any) -> Any:
    """Only ``YYYY-MM-DD`` text is a date here (pydantic alone would also take a number of seconds)."""
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(f"must be a date as YYYY-MM-DD, got {value!r}")
    return value


IsoDate = Annotated[date, BeforeValidator(_date_text)]


class ExportRequest(BaseModel):
    """``POST /api/export/work-logs``: the work logs of a date range, as CSV or XLSX."""

    model_config = ConfigDict(extra="forbid")

    start_date: IsoDate = Field(description="First day, YYYY-MM-DD.", examples=["2024-01-01"])
    end_date: IsoDate = Field(description=f"Last day, YYYY-MM-DD; at most {MAX_EXPORT_DAYS} days "
                                                    "after start_date.", examples=["2024-01-31"])
    employee_ids: list[EmployeeId] | None = Field(
        None, min_length=1, max_length=MAX_EMPLOYEES,
        description="Employees to export (default: the first 20 of the directory).",
        examples=[["emp_001", "emp_002"]])
    export_format: Literal["csv", "xlsx"] = Field("xlsx", description="File format.")

    @field_validator("end_date")
    @classmethod
    def _range(cls, end: date, info: ValidationInfo) -> date:
        start = info.data.get("start_date")
        if start is None:
            return end  # start_date itself is invalid; that error names it
        if end < start:
            raise ValueError(f"end_date {end} is before start_date {start}")
        if (end - start).days + 1 > MAX_EXPORT_DAYS:
            raise ValueError(f"{start} to {end} is more than {MAX_EXPORT_DAYS} days")
        return end

    @field_validator("employee_ids")
    @classmethod
    def _unique(cls, ids: list[str] | None) -> list[str] | None:
        if ids is not None and len(set(ids)) != len(ids):
            raise ValueError("employee_ids lists an employee twice")
        return ids


class NotificationRequest(BaseModel):
    """``POST /api/notifications``: a message for a user."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(pattern=f"^{USER_ID.pattern}$", examples=["user_001"])
    message: str = Field(min_length=1, max_length=MAX_MESSAGE, examples=["Your report is ready"])
    notification_type: Literal["email", "sms", "push", "in_app"] = "in_app"

    @field_validator("message")
    @classmethod
    def _not_blank(cls, message: str) -> str:
        if not message.strip():
            raise ValueError("message is blank")
        return message


class Submitted(BaseModel):
    """202: the task was published (the broker confirmed it); poll ``status_url``."""

    task_id: str
    status: Literal["pending"] = "pending"
    message: str
    status_url: str


class DeadLetter(BaseModel):
    """Where a failed task was parked, and why."""

    queue: str | None
    reason: str | None
    replayable: bool


class RetryInfo(BaseModel):
    """A task waiting in the broker for its next attempt."""

    attempt: int | None
    due_at: str | None


#: What the page sees, from the kit's states (service.status.STATES).
WebStatus = Literal["unknown", "pending", "processing", "retrying", "completed", "failed", "cancelled",
                    "expired"]


class TaskView(BaseModel):
    """``GET`` / ``DELETE /api/tasks/{task_id}``: a task's status as the page polls it.

    ``status`` is the page's word for the kit's ``state``; ``progress`` is 0-100
    (100 once completed); ``result`` is the task's return value once completed
    and its progress report (current, total, percent, message) while it runs;
    ``error`` says why it failed; ``download_url`` is set for a completed export.
    """

    task_id: str
    status: WebStatus
    state: str
    progress: int = Field(ge=0, le=100)
    result: Any = None
    error: str | None = None
    name: str | None = None
    worker: str | None = None
    dead_letter: DeadLetter | None = None
    retry: RetryInfo | None = None
    updated_at: str | None = None
    note: str | None = None
    download_url: str | None = None


class ExportFile(BaseModel):
    """One file of the export directory."""

    file_name: str
    size: int
    created_at: str
    download_url: str


class ExportList(BaseModel):
    """``GET /api/exports``: the export files, newest first."""

    count: int
    files: list[ExportFile]


class Problem(BaseModel):
    """An error: one line saying what was wrong (422s also carry FastAPI's per-field ``errors``)."""

    detail: str
    errors: list[dict[str, Any]] | None = None
