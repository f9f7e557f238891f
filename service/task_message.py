"""The task message: a Celery protocol-2 message built from a ``TaskRequest``, and its task-sent event.

What both clients (``service.client``, ``service.async_client``) send, checked
before anything is sent. The Celery workers run it unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from reprlib import Repr
from typing import Any

from service import headers as h
from service import queues
from service.errors import InvalidTaskInput
from service.monitoring import sentry
from service.publishing import Outgoing

__all__ = ["EVENT_EXCHANGE", "EVENT_ROUTING_KEY", "HOSTNAME", "MAX_COUNTDOWN_S", "TaskRequest", "build_message",
           "sent_event", "sent_event_fields"]

_REPR = Repr()
_REPR.maxstring = 100
_REPR.maxother = 100
#: Bodies up to this size show their arguments in full (Celery's own argsrepr_maxsize is 1024 characters).
_FULL_REPR_BYTES = 1024


def _shown(value: Any, body_bytes: int) -> str:
    """``argsrepr``/``kwargsrepr``: arguments as Flower shows them, in full when small, else shortened."""
    return repr(value) if body_bytes <= _FULL_REPR_BYTES else _REPR.repr(value)
HOSTNAME = f"gen{os.getpid()}@{socket.gethostname()}"
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


@dataclass
class TaskRequest:
    """One task to publish, as given to ``Publisher.publish_many``."""

    name: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] | None = None
    priority: str | int = queues.DEFAULT_PRIORITY
    queue: str | None = None
    countdown: float | None = None
    task_id: str | None = None
    extra_headers: dict[str, Any] = field(default_factory=dict)


#: The longest countdown the client accepts (about 10 years): beyond it, the due
#: time is more likely a unit mistake (milliseconds) than a plan.
MAX_COUNTDOWN_S = 10 * 366 * 86400


def build_message(
    request: TaskRequest, max_payload_bytes: int, longest_wait_s: int = queues.WAIT_TIERS_S[-1],
    profile: queues.Topology | None = None,
) -> tuple[str, Outgoing]:
    """Validate a TaskRequest and turn it into a Celery protocol-2 message.

    Returns (task id, message). Raises InvalidTaskInput, saying what was wrong,
    before anything is sent. A countdown waits in the broker's wait queues, in
    trips of at most ``longest_wait_s`` (KIT_LONGEST_WAIT). ``profile``
    (KIT_QUEUE_TYPE's; default classic) picks the routing key: on quorum, a
    high or critical task goes to its work queue's high lane.
    """
    name = request.name
    if not isinstance(name, str) or not name.strip():
        raise InvalidTaskInput(f"task name must be a non-empty string, got {name!r}")
    try:
        queue = queues.work_queue(request.queue or queues.queue_for_task(name)).name
        priority = queues.resolve_priority(request.priority)
    except ValueError as exc:
        raise InvalidTaskInput(str(exc)) from None
    args = request.args
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise InvalidTaskInput(f"args must be a list or tuple, got {type(args).__name__}")
    kwargs = {} if request.kwargs is None else request.kwargs
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidTaskInput("kwargs must be a mapping with string keys")
    task_id = request.task_id or str(uuid.uuid4())
    if not isinstance(task_id, str) or not task_id:
        raise InvalidTaskInput(f"task_id must be a non-empty string, got {task_id!r}")
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    try:
        body = json.dumps([list(args), dict(kwargs), embed], allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidTaskInput(
            f"arguments of {name} are not JSON-serializable ({exc}); pass plain "
            "strings, numbers, lists and dicts (ISO strings for dates, ids for objects)"
        ) from None
    payload = body.encode()
    if len(payload) > max_payload_bytes:
        raise InvalidTaskInput(
            f"the arguments of {name} encode to {len(payload)} bytes, over the limit of "
            f"{max_payload_bytes} (KIT_MAX_PAYLOAD_BYTES); store the data elsewhere and "
            "pass a reference (a path, a URL or an id)"
        )
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": _shown(list(args), len(payload)),
        "kwargsrepr": _shown(dict(kwargs), len(payload)),
        "origin": _ORIGIN,
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    headers[h.ENQUEUED_AT] = time.time() + (request.countdown or 0)
    headers.update(sentry.trace_headers())  # continues the caller's Sentry trace in the task
    headers.update(request.extra_headers)
    properties = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": priority,
        "correlation_id": task_id,
        "reply_to": "",
    }
    exchange = queues.TASK_EXCHANGE
    countdown = request.countdown
    if countdown is not None:
        if (isinstance(countdown, bool) or not isinstance(countdown, (int, float))
                or not 0 <= countdown <= MAX_COUNTDOWN_S):
            raise InvalidTaskInput(
                f"countdown must be a number of seconds from 0 to {MAX_COUNTDOWN_S}, got {countdown!r}")
        if countdown > 0:
            # Held by the broker in a wait queue, not as an ETA in a worker's memory. A
            # countdown longer than one wait carries its due time: the worker sends the
            # message to wait again until it is due.
            tier, step = queues.wait_step(countdown, longest_wait_s)
            exchange = queues.RETRY_EXCHANGE
            headers[queues.WAIT_HEADER] = queues.wait_tier_name(tier)
            properties["expiration"] = str(max(1, int(step * 1000)))
            if countdown > step:
                headers["eta"] = (datetime.now(UTC) + timedelta(seconds=countdown)).isoformat()
    routing_key = (profile or queues.topology()).routing_key(queue, priority)
    return task_id, Outgoing(exchange, routing_key, payload, headers, properties)


EVENT_EXCHANGE = "celeryev"  # Celery's own event exchange (celery.events)
#: The routing key of task-sent events (the publisher role may write only this one; a batch goes out under it too).
EVENT_ROUTING_KEY = "task.sent"


def sent_event(task_id: str, message: Outgoing) -> Outgoing:
    """Celery's ``task-sent`` event for a message, as one event message (celery-exporter and Flower read it).

    With it the exporter labels the task's later events with its queue.
    """
    return Outgoing(EVENT_EXCHANGE, EVENT_ROUTING_KEY, json.dumps(sent_event_fields(task_id, message)).encode(),
                    {"hostname": HOSTNAME},
                    {"content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 1})


def sent_event_fields(task_id: str, message: Outgoing) -> dict[str, Any]:
    """The fields of Celery's ``task-sent`` event for a message (one item of a batched event message)."""
    headers = message.headers
    queue = queues.work_queue_of_key(message.routing_key) or message.routing_key  # a lane counts as its queue
    event = {
        "type": "task-sent", "timestamp": time.time(), "hostname": HOSTNAME, "utcoffset": _utcoffset(),
        "pid": os.getpid(), "clock": 0, "uuid": task_id, "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"), "name": headers.get("task"), "args": headers.get("argsrepr"),
        "kwargs": headers.get("kwargsrepr"), "retries": headers.get("retries", 0), "eta": None, "expires": None,
        "queue": queue, "exchange": queues.TASK_EXCHANGE, "routing_key": message.routing_key,
    }
    return event


def _utcoffset() -> int:
    return -time.timezone // 3600 if not time.localtime().tm_isdst else -time.altzone // 3600
