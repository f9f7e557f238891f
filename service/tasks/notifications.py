"""User notifications (the integrated example's ``POST /api/notifications``), into an outbox directory.

The kit has no SMS, push or in-app gateway (and e-mail needs an address, not
a user id), so a notification is written, as JSON, to
KIT_STATE_DIR/notifications/<task id>.json: the hand-over point a real sender
would replace. The file is named after the task id and written atomically, so a
re-delivered task rewrites its own notification instead of sending a second
one. Bad input raises PermanentError (dead-lettered at once).
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from typing import Any

from celery import Task

from service.app import app
from service.errors import PermanentError
from service.settings import load
from service.tasks.contracts import MAX_MESSAGE, NOTIFICATION_TASK, NOTIFICATION_TYPES, USER_ID
from service.tasks.files import written_atomically

_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")


@app.task(name=NOTIFICATION_TASK, bind=True)
def send(self: Task, user_id: str, message: str, notification_type: str = "in_app") -> dict[str, Any]:
    """Queue ``message`` for ``user_id`` in the outbox (KIT_STATE_DIR/notifications/<task id>.json).

    Promises: one file per task, complete when it appears; the same task run
    twice writes the same file. Returns ``{"notification_id", "user_id",
    "notification_type", "outbox_file", "queued_at"}``.
    """
    if not isinstance(user_id, str) or not USER_ID.fullmatch(user_id):
        raise PermanentError(f"user_id must be 1-100 letters, digits or _.@-, got {user_id!r}")
    if not isinstance(message, str) or not message.strip() or len(message) > MAX_MESSAGE:
        raise PermanentError(f"message must be non-empty text of at most {MAX_MESSAGE} characters")
    if notification_type not in NOTIFICATION_TYPES:
        raise PermanentError(f"notification_type must be one of {', '.join(NOTIFICATION_TYPES)}, "
                             f"got {notification_type!r}")
    task_id = self.request.id
    if not task_id or not _TASK_ID.fullmatch(task_id):
        raise PermanentError(f"notifications.send needs a task id usable in a file name, got {task_id!r}")
    outbox = load().state_dir / "notifications"
    outbox.mkdir(parents=True, exist_ok=True)
    queued_at = datetime.now(UTC).isoformat()
    record = {"notification_id": task_id, "user_id": user_id, "notification_type": notification_type,
              "message": message, "queued_at": queued_at}
    path = outbox / f"{task_id}.json"
    with written_atomically(path) as tmp_name, open(tmp_name, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    return {"notification_id": task_id, "user_id": user_id, "notification_type": notification_type,
            "outbox_file": path.name, "queued_at": queued_at}
