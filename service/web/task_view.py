"""A task's status (service.status.TaskStatus) as the page sees it: status word, progress 0-100, result or error.

The page's words are the integrated example's (pending, processing, completed,
failed) plus what the kit can tell besides (retrying, cancelled, expired,
unknown). Every kit state maps to exactly one of them (STATUS_OF_STATE); the
kit's own state stays in the answer as ``state``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from service.web.exports import download_url, is_export_name
from service.web.schemas import DeadLetter, RetryInfo, TaskView

#: service.status.STATES -> the page's status.
STATUS_OF_STATE: dict[str, str] = {
    "unknown": "unknown",  # never seen (or just published and not marked yet): keep polling
    "queued": "pending",
    "running": "processing",
    "progress": "processing",
    "retrying": "retrying",
    "succeeded": "completed",
    "dead-lettered": "failed",
    "replayed": "pending",  # sent back from its dead-letter queue: queued again
    "expired": "expired",
    "revoked": "cancelled",
}


def _percent(progress: dict[str, Any] | None) -> int:
    """0-100 from a PROGRESS meta: its ``percent``, else ``current``/``total``; 0 when it says neither."""
    if not isinstance(progress, dict):
        return 0
    percent = progress.get("percent")
    if isinstance(percent, int | float) and not isinstance(percent, bool):
        return max(0, min(100, int(percent)))
    current, total = progress.get("current"), progress.get("total")
    if isinstance(current, int | float) and isinstance(total, int | float) and total > 0:
        return max(0, min(100, int(current * 100 / total)))
    return 0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def view(status: Any) -> TaskView:
    """The page's view of a TaskStatus."""
    state = status.state
    word = STATUS_OF_STATE.get(state, "unknown")
    data = status.to_dict()  # result and progress as JSON-safe values
    result: Any = None
    progress = 0
    if state == "succeeded":
        progress, result = 100, data["result"]
    elif state in ("progress", "running"):
        progress, result = _percent(data["progress"]), data["progress"]
    dead_letter = None
    if state == "dead-lettered" or status.dead_letter_queue:
        dead_letter = DeadLetter(queue=status.dead_letter_queue, reason=status.reason,
                                 replayable=bool(status.replayable))
    retry = RetryInfo(attempt=status.attempt, due_at=_iso(status.due_at)) if state == "retrying" else None
    error = status.error
    if error is None and state == "dead-lettered" and status.reason:
        error = f"dead-lettered: {status.reason}"
    url = None
    if state == "succeeded" and isinstance(result, dict) and is_export_name(str(result.get("file_name", ""))):
        url = download_url(str(result["file_name"]))
    return TaskView(task_id=status.task_id, status=word, state=state, progress=progress, result=result,
                    error=error, name=status.name, worker=status.worker, dead_letter=dead_letter, retry=retry,
                    updated_at=_iso(status.updated_at), note=status.note, download_url=url)
