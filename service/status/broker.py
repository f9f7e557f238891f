"""``status`` without a result backend (or without a record there): what the broker's queues show about a task.

The dead-letter queues (and ``unroutable.dead``) and the wait queues, where
retries wait, are read with unacked ``basic.get``s: nothing is taken, every
message goes back to its place when the channel closes. (Not with
``service.deadletters``' reader: that package is the operators', and the
client, which answers ``status``, must not import it.) Only the first
SCAN_LIMIT messages of each queue are read, so a lookup stays bounded on a huge
queue; the answer's ``note`` says when a queue was longer. A task found in
neither is ``unknown``: queued, running, done and never published look the same
to the broker without reading the work queues, which would take messages away
from the workers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import amqp
from kombu import Connection

from service import headers as h
from service import queues
from service.connection import connect
from service.settings import Settings
from service.status.model import TaskStatus

#: Messages read at most from each dead-letter and wait queue per lookup.
SCAN_LIMIT = 5000

_NO_BACKEND = "no result backend (KIT_RESULT_BACKEND is empty)"
#: ``why`` of a look-up made because the result backend had no record of the task.
NOT_IN_BACKEND = "no record in the result backend"
_STATE_BY_REASON = {h.REASON_EXPIRED: "expired", h.REASON_REVOKED: "revoked"}


def look_up(task_id: str, settings: Settings, why: str = _NO_BACKEND) -> TaskStatus:
    """The task's state as the dead-letter and wait queues show it (source ``broker``); raises
    BrokerUnavailable when the broker cannot be reached within KIT_CONNECT_TIMEOUT.

    ``why`` the broker is asked starts each note: no backend (the default), or NOT_IN_BACKEND.
    """
    profile = queues.topology(settings.queue_type)
    conn = connect(settings)
    longer: list[str] = []
    try:
        for queue in profile.dead_letter_queues:
            found = _find(conn, queue.name, task_id, longer)
            if found is not None:
                return _from_dead_letter(task_id, queue.name, found, settings, why)
        for queue in profile.wait_queues:
            found = _find(conn, queue.name, task_id, longer)
            if found is not None:
                return _from_waiting(task_id, found, why)
    finally:
        conn.release()
    truncated = (f"; only the first {SCAN_LIMIT} messages of {', '.join(longer)} were searched" if longer else "")
    if why != _NO_BACKEND:
        return TaskStatus(task_id=task_id, state="unknown", source="broker",
                          note=f"no dead letter or waiting retry has this id either{truncated}")
    return TaskStatus(
        task_id=task_id, state="unknown", source="broker",
        note=(f"{_NO_BACKEND}: no dead letter or waiting retry has this id{truncated}. It may be queued, running, "
              "done or never published: without a result backend the kit cannot tell these apart "
              "(set KIT_RESULT_BACKEND=redis://... to know)"))


def _find(conn: Connection, queue: str, task_id: str, longer: list[str]) -> amqp.Message | None:
    """The message of ``task_id`` among the first SCAN_LIMIT of ``queue``; every message read goes back."""
    channel = conn.channel()
    try:
        try:
            _, count, _ = channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return None  # not declared on this broker
        if count > SCAN_LIMIT:
            longer.append(queue)
        for _ in range(min(count, SCAN_LIMIT)):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                break  # consumed or expired meanwhile
            if _headers(message).get("id") == task_id:
                return message
        return None
    finally:
        try:
            channel.close()  # returns every message read, unacked, to its place
        except Exception:  # noqa: BLE001 - a channel the broker closed has returned them already
            pass


def _headers(message: amqp.Message) -> dict[str, Any]:
    headers = message.properties.get("application_headers")
    return dict(headers) if isinstance(headers, dict) else {}


def _error(kind: Any, text: Any) -> str | None:
    if not kind:
        return None
    return f"{kind}: {text}" if text else str(kind)


def _text(value: Any) -> str | None:
    return str(value) if value else None


def _reason(queue: str, headers: dict[str, Any]) -> str:
    """The kit's reason, ``unroutable``, or RabbitMQ's own (x-death) for broker dead-lettering."""
    if queue == queues.UNROUTABLE_QUEUE:
        return "unroutable"
    if headers.get(h.REASON):
        return str(headers[h.REASON])
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return f"broker-{deaths[0].get('reason')}"
    return "unknown"


def _from_dead_letter(task_id: str, queue: str, message: amqp.Message, settings: Settings,
                      why: str) -> TaskStatus:
    headers = _headers(message)
    reason = _reason(queue, headers)
    died: datetime | None = None
    if headers.get(h.DEAD_LETTERED_AT):
        try:
            died = datetime.fromisoformat(str(headers[h.DEAD_LETTERED_AT]))
        except ValueError:
            died = None
    source = headers.get(h.SOURCE_QUEUE)
    home = source in queues.WORK_QUEUE_NAMES or queue != queues.UNROUTABLE_QUEUE
    return TaskStatus(
        task_id=task_id,
        state=_STATE_BY_REASON.get(reason, "dead-lettered"),
        name=_text(headers.get("task")),
        worker=_text(headers.get(h.WORKER)),
        error=_error(headers.get(h.EXCEPTION_TYPE), headers.get(h.EXCEPTION_MESSAGE)),
        reason=reason,
        dead_letter_queue=queue,
        replayable=home and h.count(headers.get(h.REPLAYS)) < settings.max_replays,
        attempt=h.count(headers.get(h.ATTEMPTS)) or h.count(headers.get("retries")) + 1,
        updated_at=died if died is None or died.tzinfo else died.replace(tzinfo=UTC),
        source="broker",
        note=f"{why}: found in the dead-letter queue {queue}",
    )


def _from_waiting(task_id: str, message: amqp.Message, why: str) -> TaskStatus:
    headers = _headers(message)
    due = headers.get(h.ENQUEUED_AT)
    due_at = (datetime.fromtimestamp(float(due), UTC)
              if isinstance(due, (int, float)) and not isinstance(due, bool) and due > 0 else None)
    retries = h.count(headers.get("retries"))
    return TaskStatus(
        task_id=task_id,
        state="retrying" if retries else "queued",
        name=str(headers.get("task") or "") or None,
        error=_error(headers.get(h.EXCEPTION_TYPE), headers.get(h.EXCEPTION_MESSAGE)),
        attempt=retries or None,
        due_at=due_at,
        source="broker",
        note=(f"{why}: waiting in a wait queue for its next run" if retries
              else f"{why}: waiting in a wait queue until its countdown or ETA is due"),
    )
