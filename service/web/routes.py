"""The web service's endpoints: the integrated example's, on the kit.

- ``POST /api/export/work-logs`` -> 202 Submitted: publishes ``reports.work_logs``.
- ``GET /api/tasks/{task_id}`` -> TaskView; ``DELETE`` cancels (service.status.arevoke) -> TaskView.
- ``GET /api/download/{file_name}``: an export file; ``GET /api/exports`` -> ExportList.
- ``POST /api/notifications`` -> 202: publishes ``notifications.send``.
- ``POST /api/cleanup?days_old=7`` -> 202: publishes ``maintenance.cleanup_reports``.
- ``GET /healthz``: the process answers (no broker check: the service stays up and
  answers 503 while the broker is down); ``GET /metrics``; ``GET /``: links.

A 202 means the broker confirmed the message. Errors are mapped in service.web.app.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from service.tasks.contracts import CLEANUP_TASK, NOTIFICATION_TASK, WORK_LOGS_TASK
from service.web import exports
from service.web.metrics import WebMetrics
from service.web.schemas import ExportList, ExportRequest, NotificationRequest, Problem, Submitted, TaskView
from service.web.task_view import view

router = APIRouter()

#: Longest cleanup age, in days (ten years).
MAX_DAYS_OLD = 3650
_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "description": "Invalid input: `detail` names the field."},
    503: {"model": Problem, "description": "Broker or result backend unavailable, or too slow."},
}
TaskId = Annotated[str, Path(min_length=1, max_length=255, description="The id a submission answered.")]


def _metrics(request: Request) -> WebMetrics:
    return request.app.state.metrics


async def _submit(request: Request, name: str, kwargs: dict[str, Any], what: str) -> Submitted:
    """Publish ``name`` and answer its id once the broker confirmed it (errors: service.web.app)."""
    started = time.monotonic()
    outcome = "ok"
    try:
        task_id = await request.app.state.publisher.publish(name, kwargs=kwargs)
    except BaseException as exc:  # also CancelledError: the request deadline
        outcome = type(exc).__name__
        raise
    finally:
        _metrics(request).publish_seconds.labels(name, outcome).observe(time.monotonic() - started)
    return Submitted(task_id=task_id, message=f"{what} submitted; poll status_url for its status",
                     status_url=str(request.app.url_path_for("task_status", task_id=task_id)))


async def _timed_status(request: Request, call: Any, task_id: str) -> TaskView:
    started = time.monotonic()
    outcome = "ok"
    try:
        return view(await call(task_id, request.app.state.settings))
    except BaseException as exc:  # also CancelledError: the request deadline
        outcome = type(exc).__name__
        raise
    finally:
        _metrics(request).status_seconds.labels(outcome).observe(time.monotonic() - started)


@router.post("/api/export/work-logs", status_code=202, response_model=Submitted, responses=_ERRORS,
             tags=["exports"])
async def export_work_logs(body: ExportRequest, request: Request) -> Submitted:
    """Submit a work-log export (CSV or XLSX). Answers at once with the task id; poll `status_url`."""
    kwargs = {"start_date": body.start_date.isoformat(), "end_date": body.end_date.isoformat(),
              "employee_ids": body.employee_ids, "export_format": body.export_format}
    pause = request.app.state.settings.web_export_pause
    if pause:
        kwargs["chunk_pause"] = pause
    return await _submit(request, WORK_LOGS_TASK, kwargs, f"{body.export_format} export")


@router.get("/api/tasks/{task_id}", name="task_status", response_model=TaskView, responses=_ERRORS,
            tags=["tasks"])
async def task_status(task_id: TaskId, request: Request) -> TaskView:
    """A task's status, progress (0-100) and result or error."""
    from service.status import astatus

    return await _timed_status(request, astatus, task_id)


@router.delete("/api/tasks/{task_id}", response_model=TaskView, responses=_ERRORS, tags=["tasks"])
async def cancel_task(task_id: TaskId, request: Request) -> TaskView:
    """Cancel a task: one not run yet never runs (cancelled; its message is dead-lettered as `revoked`).

    A running one finishes this run but never runs again; a finished one is left alone (`note` says so).
    Answers the task's status after the cancel.
    """
    from service.status import arevoke

    return await _timed_status(request, arevoke, task_id)


@router.get("/api/download/{file_name}", response_class=StreamingResponse, tags=["exports"],
            responses={200: {"content": {m: {} for m in exports.MEDIA_TYPES.values()}},
                       400: {"model": Problem, "description": "Not an export file name."},
                       404: {"model": Problem, "description": "No such export."}})
async def download(request: Request, file_name: str) -> StreamingResponse:
    """An export file of the export directory (nothing else: no paths, no symlinks, no hidden files)."""
    # In a thread, as every filesystem call here: a slow disk or NFS must not stall the event loop.
    opened = await asyncio.to_thread(exports.open_export, request.app.state.settings.report_dir, file_name)
    headers = {"Content-Length": str(opened.size),
               "Content-Disposition": f'attachment; filename="{opened.file_name}"'}
    return StreamingResponse(opened.chunks(), media_type=opened.media_type, headers=headers)


@router.get("/api/exports", response_model=ExportList, tags=["exports"])
async def list_exports(request: Request) -> ExportList:
    """The export files, newest first, with their download URLs."""
    entries = await asyncio.to_thread(exports.list_exports, request.app.state.settings.report_dir)
    files = [{"file_name": e.file_name, "size": e.size, "created_at": e.created_at.isoformat(),
              "download_url": exports.download_url(e.file_name)} for e in entries]
    return ExportList.model_validate({"count": len(files), "files": files})


@router.post("/api/notifications", status_code=202, response_model=Submitted, responses=_ERRORS,
             tags=["notifications"])
async def send_notification(body: NotificationRequest, request: Request) -> Submitted:
    """Submit a notification for a user."""
    return await _submit(request, NOTIFICATION_TASK, body.model_dump(), f"{body.notification_type} notification")


@router.post("/api/cleanup", status_code=202, response_model=Submitted, responses=_ERRORS, tags=["exports"])
async def cleanup(request: Request, days_old: int = Query(7, ge=1, le=MAX_DAYS_OLD,
                                                          description="Delete exports older than this.")
                  ) -> Submitted:
    """Submit a clean-up of the exports older than `days_old` days."""
    return await _submit(request, CLEANUP_TASK, {"max_age_hours": days_old * 24}, f"clean-up of exports older "
                         f"than {days_old} days")


@router.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    """The process answers (the broker is not checked: see the module docstring)."""
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this process (service.web.metrics)."""
    body, content_type = _metrics(request).exposition()
    return Response(body, media_type=content_type)


@router.get("/", tags=["service"])
async def index() -> dict[str, Any]:
    """What this service is and where to go next."""
    return {"service": "celery-rabbitmq-kit example web service", "docs": "/docs", "openapi": "/openapi.json",
            "exports": "/api/exports", "health": "/healthz", "metrics": "/metrics"}
