"""Monitoring events (Celery's task-sent) gathered and sent a batch at a time, off the caller's path.

Celery's event receivers (Flower, celery-exporter, ``celery events``) accept
a message whose body is a JSON list of events, as Celery's own workers send
them when they buffer. One such message for many tasks costs the broker one
message instead of one per task. A batch goes out when ``limit`` events are
waiting, or ``delay_s`` after its first event, whichever comes first, so a
monitor sees a task-sent event at most that late. Events are telemetry: a
batch that cannot be sent is dropped, never retried and never raised.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from service.publishing.channel import ConfirmedChannel
from service.publishing.message import Outgoing

#: Events per batch message at most.
DEFAULT_LIMIT = 100
#: Longest an event waits for its batch, in seconds.
DEFAULT_DELAY_S = 0.2


class EventBatcher:
    """Sends the events given to ``add`` as list messages on ``channel`` (thread-safe, fork-safe)."""

    def __init__(self, channel: ConfirmedChannel, exchange: str, routing_key: str, headers: dict[str, Any], *,
                 limit: int = DEFAULT_LIMIT, delay_s: float = DEFAULT_DELAY_S) -> None:
        self._channel = channel
        self._exchange = exchange
        self._routing_key = routing_key
        self._headers = headers
        self._limit = limit
        self._delay_s = delay_s
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._waiting: list[dict[str, Any]] = []
        self._timer: threading.Timer | None = None

    def add(self, event: dict[str, Any]) -> None:
        """Queue one event; it is sent with its batch (never blocks on the broker, except a full batch's send)."""
        if self._pid != os.getpid():
            self._reset()  # a forked child: the parent's events and timer are the parent's
        with self._lock:
            self._waiting.append(event)
            full = len(self._waiting) >= self._limit
            if not full and self._timer is None:
                self._timer = threading.Timer(self._delay_s, self.flush)
                self._timer.daemon = True
                self._timer.start()
        if full:
            self.flush()

    def flush(self) -> None:
        """Send every waiting event now (best effort)."""
        with self._lock:
            batch, self._waiting = self._waiting, []
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        if batch:
            body = json.dumps(batch).encode()
            self._channel.publish_events([Outgoing(
                self._exchange, self._routing_key, body, self._headers,
                {"content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 1},
            )])
