"""What ``status()`` answers: ``TaskStatus``, the states a task can be in, and task id checks."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from service.errors import InvalidTaskInput

#: Every state a task can be in, as ``TaskStatus.state`` names it.
STATES = ("unknown", "queued", "running", "progress", "retrying", "succeeded", "dead-lettered", "replayed",
          "expired", "revoked")
#: States after which nothing more happens to the task (unless an operator replays its dead letter).
FINAL_STATES = frozenset({"succeeded", "dead-lettered", "expired", "revoked"})
#: Where an answer came from: the result backend, the broker's queues (no backend), nowhere.
SOURCES = ("backend", "broker", "none")
#: The longest task id accepted (Celery's are 36-character UUIDs; callers may choose their own).
MAX_TASK_ID_CHARS = 255
_TASK_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: safe in keys, URLs and logs


def check_task_id(task_id: Any) -> str:
    """``task_id`` when it can be a task id (printable ASCII, no spaces, 1-255 chars); else InvalidTaskInput."""
    if not isinstance(task_id, str) or not task_id:
        raise InvalidTaskInput(f"task id must be a non-empty string, got {task_id!r}")
    if len(task_id) > MAX_TASK_ID_CHARS or not _TASK_ID.fullmatch(task_id):
        shown = task_id if len(task_id) <= 60 else task_id[:60] + "..."
        raise InvalidTaskInput(f"{shown!r} is not a task id (printable ASCII without spaces, "
                               f"at most {MAX_TASK_ID_CHARS} characters)")
    return task_id


@dataclass(frozen=True)
class TaskStatus:
    """One task's state as the kit knows it.

    ``state`` is one of STATES. The other fields are filled where the state has
    them: ``worker`` (running, progress, and the worker that retried or
    dead-lettered it), ``progress`` (the ``meta`` of the task's
    ``update_state(state="PROGRESS", meta=...)``), ``result`` (succeeded),
    ``error`` ("ExcType: message" of the last failure), ``reason``,
    ``dead_letter_queue`` and ``replayable`` (dead-lettered, expired, revoked),
    ``attempt`` (runs so far, 1 for the first) and ``due_at`` (retrying: when
    the next run is due). ``source`` says where the answer came from
    (``backend``, ``broker`` or ``none``) and ``note`` what could not be known
    and why.
    """

    task_id: str
    state: str
    name: str | None = None
    worker: str | None = None
    progress: dict[str, Any] | None = None
    result: Any = None
    error: str | None = None
    reason: str | None = None
    dead_letter_queue: str | None = None
    replayable: bool = False
    attempt: int | None = None
    due_at: datetime | None = None
    updated_at: datetime | None = None
    source: str = "none"
    note: str | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown task state {self.state!r}; one of {', '.join(STATES)}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; one of {', '.join(SOURCES)}")

    @property
    def final(self) -> bool:
        """True for succeeded, dead-lettered, expired and revoked: nothing more happens by itself."""
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-safe values (times as ISO 8601 strings), plus ``final``."""
        data = asdict(self)
        for name in ("due_at", "updated_at"):
            moment = data[name]
            data[name] = moment.isoformat() if isinstance(moment, datetime) else None
        data["result"] = _jsonable(data["result"])
        data["progress"] = _jsonable(data["progress"])
        data["final"] = self.final
        return data


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into its repr (results come back JSON-decoded already)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)
