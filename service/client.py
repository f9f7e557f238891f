"""The thin publishing client: what a web app imports to enqueue work.

It publishes ordinary Celery (protocol 2) task messages by task name, so the
web app never imports task code, and Celery workers run them unchanged. Each
publish is persistent, mandatory and confirmed by the broker before it returns.
Input is checked before anything is sent::

    from service.client import publish
    task_id = publish("emails.send", kwargs={"to": "a@example.com", ...}, priority="high")

For many messages keep a ``Publisher`` and use ``publish_many``, which waits for
the broker's confirms a window at a time instead of one by one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from service import queues
from service.errors import KitError
from service.monitoring import sentry
from service.publishing import ConfirmedChannel, Outgoing
from service.publishing.events import EventBatcher
from service.settings import Settings, load
from service.status import arevoke, astatus, revoke, status
from service.status.marks import QueuedMarker
from service.task_message import (
    EVENT_EXCHANGE,
    EVENT_ROUTING_KEY,
    HOSTNAME,
    MAX_COUNTDOWN_S,
    TaskRequest,
    build_message,
    sent_event,
    sent_event_fields,
)

# AsyncPublisher and apublish come from the module __getattr__ below.
__all__ = ["EVENT_EXCHANGE", "MAX_COUNTDOWN_S", "AsyncPublisher", "Publisher", "TaskRequest",  # noqa: F822
           "apublish", "arevoke", "astatus", "build_message", "publish", "revoke", "sent_event", "status"]


class Publisher:
    """A reusable, thread-safe publisher holding one broker connection.

    Share one between threads: their publishes overlap on the connection (each
    call still returns only once the broker confirmed its own task). The
    connection opens on first use and is reopened after it drops; after a fork
    the child opens its own. Close it with ``close()`` or use the publisher as
    a context manager.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings or load()
        self._profile = queues.topology(self._settings.queue_type)
        sentry.init("client", self._settings)  # once per process; never over the host app's own init
        self._channel = ConfirmedChannel(
            self._settings, event_exchange=EVENT_EXCHANGE if self._settings.send_sent_events else None)
        self._events = (EventBatcher(self._channel, EVENT_EXCHANGE, EVENT_ROUTING_KEY, {"hostname": HOSTNAME})
                        if self._settings.send_sent_events else None)
        self._marks = QueuedMarker(self._settings)

    def publish(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        priority: str | int = queues.DEFAULT_PRIORITY,
        queue: str | None = None,
        countdown: float | None = None,
        task_id: str | None = None,
    ) -> str:
        """Publish one task and return its id once the broker confirmed it.

        Raises InvalidTaskInput (nothing sent), BrokerUnavailable or PublishError.
        """
        request = TaskRequest(name, args, kwargs, priority, queue, countdown, task_id)
        task_id, message = build_message(request, self._settings.max_payload_bytes, self._settings.longest_wait,
                                         self._profile)
        self._channel.publish(message)
        self._published(task_id, message)
        return task_id

    def publish_many(self, requests: Iterable[TaskRequest], *, window: int = 256) -> list[str]:
        """Publish many tasks; returns their ids once all are confirmed.

        Every request is validated before the first is sent, so bad input sends
        nothing. A broken connection re-sends the unconfirmed window. When a
        window fails, the error (BrokerUnavailable, PublishError) carries
        ``task_ids``: the ids of the tasks confirmed before it, which are queued.
        """
        built = [build_message(r, self._settings.max_payload_bytes, self._settings.longest_wait, self._profile)
                 for r in requests]
        try:
            self._channel.publish_many((m for _, m in built), window=window)
        except KitError as exc:
            confirmed = built[:getattr(exc, "confirmed", 0)]
            for task_id, message in confirmed:
                self._published(task_id, message)
            exc.task_ids = [task_id for task_id, _ in confirmed]
            raise
        for task_id, message in built:
            self._published(task_id, message)
        return [task_id for task_id, _ in built]

    def _published(self, task_id: str, message: Outgoing) -> None:
        """After the broker confirmed a task: its task-sent event and its "queued" state, both batched."""
        if self._events is not None:
            self._events.add(sent_event_fields(task_id, message))
        self._marks.add(task_id, message.headers["task"])

    def close(self) -> None:
        """Send the events still waiting, then close the broker connection."""
        if self._events is not None:
            self._events.flush()
        self._channel.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_default: Publisher | None = None
_default_pid = 0
_default_lock = threading.Lock()


def _publisher() -> Publisher:
    global _default, _default_pid
    with _default_lock:
        # A connection must not be shared across fork (gunicorn, uwsgi workers).
        if _default is None or _default_pid != os.getpid():
            _default, _default_pid = Publisher(), os.getpid()
        return _default


def publish(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    priority: str | int = queues.DEFAULT_PRIORITY,
    queue: str | None = None,
    countdown: float | None = None,
    task_id: str | None = None,
) -> str:
    """Publish the task ``name`` and return its id once the broker confirmed it.

    Uses a per-process Publisher configured from the environment. ``priority``
    is one of low, normal, high, critical; ``queue`` defaults to the task's route
    in service.queues; ``countdown`` delays it in the broker's wait queues.
    """
    return _publisher().publish(
        name, args, kwargs, priority=priority, queue=queue, countdown=countdown, task_id=task_id
    )


def __getattr__(name: str) -> Any:
    """``AsyncPublisher`` and ``apublish`` of service.async_client, imported on first use.

    So a sync user of this module never imports aio-pika.
    """
    if name in ("AsyncPublisher", "apublish"):
        from service import async_client

        return getattr(async_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
