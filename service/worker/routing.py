"""Move a delivered message to a wait queue (retry) or to its dead-letter queue.

Each move is recorded in the result backend when there is one
(``service.status.recorder``): retrying just before the retry is published,
dead-lettered, expired or revoked once the dead letter was (or could not be);
never failing a move or holding it up for more than a short timeout.

Runs in the worker's main process, which holds the original message. The new
message is published and confirmed BEFORE the caller acks the original, so a
crash in between duplicates a message at worst and never loses one. Both
functions return False instead of raising when the broker refused or could not
be reached; the caller then rejects the original without requeue, which makes
RabbitMQ itself dead-letter it through the work queue's x-dead-letter-exchange.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.message import Message

from service import headers as h
from service import queues
from service.errors import KitError
from service.monitoring import metrics, sentry
from service.publishing import ConfirmedChannel, Outgoing, republished_properties
from service.settings import Settings, load
from service.status import recorder
from service.topology import declare_on

logger = logging.getLogger(__name__)


_channel: ConfirmedChannel | None = None
_channel_pid = 0
_lock = threading.Lock()


@functools.cache
def _longest_wait() -> int:
    """KIT_LONGEST_WAIT, read once per process (settings do not change while a worker runs)."""
    return load().longest_wait


def _publisher() -> ConfirmedChannel:
    global _channel, _channel_pid
    with _lock:
        if _channel is None or _channel_pid != os.getpid():
            settings = load()
            _ensure_topology(settings)
            _channel, _channel_pid = ConfirmedChannel(settings), os.getpid()
        return _channel


def _ensure_topology(settings: Settings) -> None:
    """Declare the topology once per process, so the exchanges we publish to exist."""
    if not settings.declare_topology:
        return  # least privilege (KIT_DECLARE_TOPOLOGY=false): the broker's definitions hold it
    declare_on(settings)


def source_queue(message: Message) -> str:
    """The work queue a delivered message came from (its routing key: the work queue's or its high lane's)."""
    key = (message.delivery_info or {}).get("routing_key") or ""
    return queues.work_queue_of_key(key) or queues.DEFAULT_QUEUE


def return_key(message: Message) -> str:
    """The routing key that puts a delivered message back where it came from, high lane included."""
    key = (message.delivery_info or {}).get("routing_key") or ""
    return key if queues.work_queue_of_key(key) else queues.DEFAULT_QUEUE


def _properties(message: Message) -> dict[str, Any]:
    props = republished_properties(message.properties or {})
    props.setdefault("content_type", message.content_type)
    props.setdefault("content_encoding", message.content_encoding)
    return {k: v for k, v in props.items() if v is not None}


def _send(outgoing: Outgoing, what: str) -> bool:
    try:
        _publisher().publish(outgoing)
        return True
    except KitError as exc:
        logger.error("could not %s: %s", what, exc)
    except Exception:  # noqa: BLE001 - never let a publish failure escape into the consumer loop
        logger.exception("could not %s", what)
    return False


def dead_letter(message: Message, reason: str, failure: dict[str, Any], *, worker_lost: int = 0) -> bool:
    """Publish ``message`` to its dead-letter queue with ``reason`` and failure headers.

    ``failure`` holds the keyword arguments of ``headers.with_failure`` except the
    source queue. Returns True once the broker confirmed the dead letter, False
    when it could not be published (never raises).
    """
    try:
        return _dead_letter(message, reason, failure, worker_lost)
    except Exception:  # noqa: BLE001 - a value read from the message must not wedge the worker
        logger.exception("could not build the dead letter of a message (reason %s)", reason)
        metrics.ROUTING_FAILURES.labels("dead-letter").inc()
        return False


def _dead_letter(message: Message, reason: str, failure: dict[str, Any], worker_lost: int) -> bool:
    source = source_queue(message)
    headers = h.with_failure(dict(message.headers or {}), source_queue=source, **failure)
    headers.pop(queues.WAIT_HEADER, None)
    if worker_lost:
        headers[h.WORKER_LOST] = worker_lost
    headers[h.REASON] = reason
    headers[h.DEAD_LETTERED_AT] = h.utc_now_iso()
    headers[h.WORKER] = socket.gethostname()
    outgoing = Outgoing(queues.DEAD_LETTER_EXCHANGE, source, message.body, headers, _properties(message))
    sent = _send(outgoing, f"dead-letter {headers.get('task')}[{headers.get('id')}]")
    if not sent:
        metrics.ROUTING_FAILURES.labels("dead-letter").inc()
    else:
        metrics.DEAD_LETTERS.labels(source, str(headers.get("task") or ""), reason).inc()
        logger.warning(
            "dead-lettered %s[%s] from %s: %s (%s: %s)",
            headers.get("task"), headers.get("id"), source, reason,
            headers.get(h.EXCEPTION_TYPE), headers.get(h.EXCEPTION_MESSAGE),
        )
    # Also when the publish failed: RabbitMQ then dead-letters the message itself.
    try:
        sentry.capture_dead_letter(headers, published=sent)
    except Exception:  # noqa: BLE001 - reporting must not change what happens to the message
        logger.debug("could not report the dead letter to Sentry", exc_info=True)
    try:
        recorder.record_dead_lettered(headers, reason, failure, source, published=sent)
    except Exception:  # noqa: BLE001 - a state is telemetry: the message's path goes on
        logger.debug("could not record the dead letter's state", exc_info=True)
    return sent


def _to_wait_queue(message: Message, headers: dict[str, Any], delay_s: float) -> Outgoing:
    """The message that waits ``delay_s`` in the broker, then returns to its work queue.

    A delay longer than KIT_LONGEST_WAIT waits that long and carries its due
    time as ``eta``, so the worker sends it to wait again until it is due.
    """
    tier, step = queues.wait_step(delay_s, _longest_wait())
    headers[queues.WAIT_HEADER] = queues.wait_tier_name(tier)
    if delay_s > step:
        headers["eta"] = (datetime.now(UTC) + timedelta(seconds=delay_s)).isoformat()
    headers[h.ENQUEUED_AT] = time.time() + delay_s
    props = _properties(message)
    props["expiration"] = str(max(1, int(step * 1000)))
    return Outgoing(queues.RETRY_EXCHANGE, return_key(message), message.body, headers, props)


def schedule_retry(message: Message, delay_s: float, failure: dict[str, Any], *, worker_lost: int = 0) -> bool:
    """Publish ``message`` to the wait queue that returns it to its work queue after ``delay_s``.

    Increments Celery's ``retries`` header and keeps priority and body. Returns
    True once the broker confirmed it, False when it could not (never raises).
    """
    try:
        source = source_queue(message)
        headers = h.with_failure(dict(message.headers or {}), source_queue=source, **failure)
        headers["retries"] = h.count(headers.get("retries")) + 1
        headers["eta"] = None
        if worker_lost:
            headers[h.WORKER_LOST] = worker_lost
        outgoing = _to_wait_queue(message, headers, delay_s)
    except Exception:  # noqa: BLE001 - a value read from the message must not wedge the worker
        logger.exception("could not build the retry of a message")
        metrics.ROUTING_FAILURES.labels("retry").inc()
        return False
    # Recorded before the publish: once published, the next run may start (and record
    # running) before this process gets to it. If the publish fails, the dead letter
    # that follows records its own state over this one.
    try:
        recorder.record_retrying(headers, delay_s, failure)
    except Exception:  # noqa: BLE001 - a state is telemetry: the retry goes on
        logger.debug("could not record the retry's state", exc_info=True)
    sent = _send(outgoing, f"schedule a retry of {headers.get('task')}[{headers.get('id')}]")
    if not sent:
        metrics.ROUTING_FAILURES.labels("retry").inc()
    else:
        metrics.RETRIES.labels(source, str(headers.get("task") or "")).inc()
        logger.info(
            "retry %d of %s[%s] in %.1fs after %s",
            headers["retries"], headers.get("task"), headers.get("id"), delay_s, headers.get(h.EXCEPTION_TYPE),
        )
    return sent


def wait_until_due(message: Message, delay_s: float) -> bool:
    """Send a message whose ``eta`` is ``delay_s`` ahead to wait in the broker instead of in memory.

    Nothing else changes (its ``retries`` stay); ``kit-waits`` counts these
    trips. Returns True once the broker confirmed it, False when it could not
    (never raises): the caller then lets Celery hold it until its ETA.
    """
    try:
        headers = dict(message.headers or {})
        headers[h.WAITS] = h.count(headers.get(h.WAITS)) + 1
        eta = headers.get("eta")
        outgoing = _to_wait_queue(message, headers, delay_s)
        outgoing.headers["eta"] = eta  # the original due time, to the microsecond
    except Exception:  # noqa: BLE001 - a value read from the message must not wedge the worker
        logger.exception("could not build the wait of a message")
        return False
    sent = _send(outgoing, f"send {headers.get('task')}[{headers.get('id')}] to wait for its ETA")
    if sent:
        metrics.ETA_WAITS.labels(source_queue(message), str(headers.get("task") or "")).inc()
        logger.info("%s[%s] is due in %.0fs: waits in %s (trip %d)", headers.get("task"), headers.get("id"),
                    delay_s, headers[queues.WAIT_HEADER], headers[h.WAITS])
    return sent
