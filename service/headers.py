"""Header names the kit adds to messages, and the reasons a message is dead-lettered.

All of them are the kit's own: none starts with ``x-``, because RabbitMQ 3.13
and later own those (a client-set ``x-death`` is ignored). A dead letter can be
understood from these headers alone, with no Sentry or result backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

#: Why the message was dead-lettered: one of the REASON_* values below.
REASON = "kit-reason"
#: Qualified name of the exception of the last failure, e.g. "smtplib.SMTPDataError".
EXCEPTION_TYPE = "kit-exception-type"
#: str() of that exception, cut to MAX_MESSAGE_CHARS.
EXCEPTION_MESSAGE = "kit-exception-message"
#: The last lines of its traceback, cut to MAX_TRACEBACK_CHARS.
TRACEBACK = "kit-traceback"
#: How many times the task ran (or was delivered, for messages that never ran).
ATTEMPTS = "kit-attempts"
#: The work queue the message came from: where a replay puts it back.
SOURCE_QUEUE = "kit-source-queue"
#: ISO 8601 UTC times of the first and the latest failure.
FIRST_FAILURE_AT = "kit-first-failure-at"
LAST_FAILURE_AT = "kit-last-failure-at"
#: ISO 8601 UTC time the worker dead-lettered the message.
DEAD_LETTERED_AT = "kit-dead-lettered-at"
#: How many deliveries ended with the worker process dying (poison detection).
WORKER_LOST = "kit-worker-lost"
#: Host name of the worker that dead-lettered the message.
WORKER = "kit-worker"
#: How many times ``dlq replay`` put the message back (``KIT_MAX_REPLAYS`` limits it).
REPLAYS = "kit-replays"
#: ISO 8601 UTC time of the latest replay.
REPLAYED_AT = "kit-replayed-at"
#: How many times a worker sent the message back to a wait queue because its
#: ``eta`` was still ahead (a delay longer than KIT_LONGEST_WAIT waits again).
WAITS = "kit-waits"
#: Epoch seconds when the message became (or becomes, after a wait) ready in its
#: work queue: the start of its queue wait time.
ENQUEUED_AT = "kit-enqueued-at"
#: While ``topology migrate`` holds a message in a ``<queue>.migrating`` queue: the
#: routing key it was delivered with, and its AMQP ``expiration`` (removed there, so
#: a waiting retry cannot expire with no dead-letter exchange). Both go on the way back.
MIGRATING_ROUTING_KEY = "kit-migrating-routing-key"
MIGRATING_EXPIRATION = "kit-migrating-expiration"

REASON_RETRIES_EXHAUSTED = "retries-exhausted"
REASON_PERMANENT = "permanent-error"
REASON_TIME_LIMIT = "time-limit"
REASON_WORKER_LOST = "worker-lost"
REASON_UNDECODABLE = "undecodable"
REASON_CONTENT_DISALLOWED = "content-disallowed"
REASON_UNKNOWN_TASK = "unknown-task"
REASON_INVALID_ARGUMENTS = "invalid-arguments"
REASON_INVALID_MESSAGE = "invalid-message"
REASON_EXPIRED = "expired"
#: Cancelled with ``task cancel`` / ``service.client.revoke`` before it ran (service.status.revoke).
REASON_REVOKED = "revoked"

MAX_MESSAGE_CHARS = 1000
MAX_TRACEBACK_CHARS = 4000
MAX_TRACEBACK_LINES = 30


def count(value: Any) -> int:
    """A count header (``retries``, ``kit-replays``, ...) as an int: 0 when missing or not a whole number >= 0.

    For code that must not fail on a malformed message; the worker's validation
    dead-letters such messages before they run.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def utc_now_iso() -> str:
    """The current time as ISO 8601 in UTC, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def traceback_excerpt(text: str | None) -> str:
    """The last MAX_TRACEBACK_LINES lines of a traceback, at most MAX_TRACEBACK_CHARS long."""
    if not text:
        return ""
    lines = text.rstrip().splitlines()[-MAX_TRACEBACK_LINES:]
    excerpt = "\n".join(lines)
    return excerpt[-MAX_TRACEBACK_CHARS:]


def exception_type_name(exc: BaseException) -> str:
    """``module.QualName`` of an exception's class (builtins without the module)."""
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def with_failure(
    headers: dict[str, Any],
    *,
    exception_type: str,
    exception_message: str,
    traceback: str,
    attempts: int,
    source_queue: str,
) -> dict[str, Any]:
    """A copy of ``headers`` that records one more failure.

    The first failure time is kept from earlier failures; everything else
    describes the failure at hand.
    """
    now = utc_now_iso()
    updated = dict(headers)
    updated.setdefault(FIRST_FAILURE_AT, now)
    updated[LAST_FAILURE_AT] = now
    updated[EXCEPTION_TYPE] = exception_type
    updated[EXCEPTION_MESSAGE] = exception_message[:MAX_MESSAGE_CHARS]
    updated[TRACEBACK] = traceback_excerpt(traceback)
    updated[ATTEMPTS] = attempts
    updated[SOURCE_QUEUE] = source_queue
    return updated


#: The retry rule that decided the message's fate (``service.retry_policy.RULES``:
#: ``kit-policy``, ``autoretry-for``, ``self-retry``, ``manual-retry``, ...), set on the
#: dead letters of tasks that ran.
RETRY_RULE = "kit-retry-rule"

#: Headers a replay removes, so the task starts over with a fresh retry budget
#: (with queues.WAIT_HEADER, the routing header of a retry's wait queue).
RESET_ON_REPLAY = (WORKER_LOST, WAITS, RETRY_RULE, "x-death", "x-first-death-exchange", "x-first-death-queue",
                   "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")
