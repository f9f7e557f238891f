"""One dead letter as the kit reads it, and the codec of its AMQP values.

``DeadLetter`` is a message of a dead-letter queue (or of ``unroutable.dead``)
with what the kit knows about why it died: reason, exception, attempts, the
work queue to put it back on. ``to_jsonable``/``from_jsonable`` turn AMQP
header values into JSON and back (``dlq show --json`` and the archive).
``resolve_queues`` reads the ``--queue`` names operators type.

``unroutable.dead`` (queues.UNROUTABLE_QUEUE) is handled like the dead-letter
queues. Its messages were published to the task exchange with a routing key no
work queue is bound to; they carry no kit-* headers, so their reason
(``unroutable``) and explanation come from the queue and the routing key they
were delivered with.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from service import headers as h
from service import queues
from service.errors import KitError

#: The reason of every message in queues.UNROUTABLE_QUEUE (none carries a kit-reason header).
REASON_UNROUTABLE = "unroutable"


class DeadLetterError(KitError):
    """A dead-letter operation was asked something it cannot do (bad queue, filter, id)."""


def as_utc(moment: datetime) -> datetime:
    """``moment`` with a time zone: UTC when it has none."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def to_jsonable(value: Any) -> Any:
    """AMQP header values as JSON, with tags for the types JSON lacks (round-trips)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    return value


def from_jsonable(value: Any) -> Any:
    """The inverse of ``to_jsonable``."""
    if isinstance(value, dict):
        if len(value) == 1:
            (key, inner), = value.items()
            if key == "$datetime":
                return datetime.fromisoformat(inner)
            if key == "$bytes":
                return base64.b64decode(inner)
            if key == "$decimal":
                return Decimal(inner)
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value



@dataclass
class DeadLetter:
    """One message of a dead-letter queue, with what the kit knows about why it died."""

    queue: str
    position: int
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    delivery_tag: int = 0
    #: The routing key and exchange it was delivered with: for a dead letter its work
    #: queue and tasks.dead, for an unroutable message the key it was published with.
    routing_key: str = ""
    exchange: str = ""

    @property
    def unroutable(self) -> bool:
        """True for a message of queues.UNROUTABLE_QUEUE."""
        return self.queue == queues.UNROUTABLE_QUEUE

    @property
    def id(self) -> str:
        """The Celery task id, else the message's own id, else a hash of the body."""
        for value in (self.headers.get("id"), self.properties.get("message_id"),
                      self.properties.get("correlation_id")):
            if value:
                return str(value)
        return "sha1:" + hashlib.sha1(self.body).hexdigest()[:16]  # noqa: S324 - an identifier, not security

    @property
    def task(self) -> str:
        return str(self.headers.get("task") or "")

    @property
    def reason(self) -> str:
        """The kit's reason, or RabbitMQ's own (x-death) for broker dead-lettering.

        ``unroutable`` for every message of queues.UNROUTABLE_QUEUE: that is why
        it is there, whatever headers it carries from an earlier life.
        """
        if self.unroutable:
            return REASON_UNROUTABLE
        if self.headers.get(h.REASON):
            return str(self.headers[h.REASON])
        death = self._last_death()
        return f"broker-{death.get('reason')}" if death else "unknown"

    @property
    def exception_type(self) -> str:
        return str(self.headers.get(h.EXCEPTION_TYPE) or "")

    @property
    def exception_message(self) -> str:
        if self.unroutable:
            return (f"no work queue is bound to routing key {self.routing_key!r} on exchange "
                    f"{self.published_to!r}; the work queues are {', '.join(queues.WORK_QUEUE_NAMES)}")
        return str(self.headers.get(h.EXCEPTION_MESSAGE) or "")

    @property
    def published_to(self) -> str:
        """The exchange it was published to: for an unroutable message, the one whose
        alternate exchange parked it (an imported one is delivered by that alternate exchange)."""
        if self.unroutable and self.exchange in ("", queues.UNROUTABLE_EXCHANGE):
            return queues.TASK_EXCHANGE
        return self.exchange

    @property
    def attempts(self) -> int:
        value = self.headers.get(h.ATTEMPTS)
        if value is not None and h.count(value):
            return h.count(value)
        return h.count(self.headers.get("retries")) + 1

    @property
    def replays(self) -> int:
        return h.count(self.headers.get(h.REPLAYS))

    @property
    def source_queue(self) -> str:
        """The work queue to put it back on; "" for an unroutable message whose routing key
        names no work queue (it has none: a replay needs ``to``)."""
        if self.unroutable:  # a work queue's name, or its high lane's (parked after a move back to classic)
            return queues.work_queue_of_key(self.routing_key) or ""
        source = self.headers.get(h.SOURCE_QUEUE)
        if source in queues.WORK_QUEUE_NAMES:
            return str(source)
        death = self._last_death()
        if death and death.get("queue") in queues.WORK_QUEUE_NAMES:
            return str(death["queue"])
        return work_queue_of(self.queue)

    @property
    def died_at(self) -> datetime | None:
        """When it was dead-lettered (UTC), from the kit's header or RabbitMQ's x-death."""
        value = self.headers.get(h.DEAD_LETTERED_AT)
        if value:
            try:
                return as_utc(datetime.fromisoformat(str(value)))
            except ValueError:
                pass
        death = self._last_death()
        if death and isinstance(death.get("time"), datetime):
            return as_utc(death["time"])
        if self.unroutable:
            return self._published_at()
        return None

    def _published_at(self) -> datetime | None:
        """When it was published, if the publisher said (AMQP timestamp, the kit client's kit-enqueued-at):
        for an unroutable message that is when it was parked."""
        stamp = self.properties.get("timestamp")
        if isinstance(stamp, datetime):
            return as_utc(stamp)
        for value in (stamp, self.headers.get(h.ENQUEUED_AT)):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                try:
                    return datetime.fromtimestamp(float(value), UTC)
                except (OverflowError, OSError, ValueError):
                    continue
        return None

    def _last_death(self) -> dict[str, Any] | None:
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            return deaths[0]  # RabbitMQ keeps the most recent first
        return None

    def summary(self) -> dict[str, Any]:
        """The fields ``dlq list`` shows (``retry_rule``: the ``kit-retry-rule`` header)."""
        died = self.died_at
        return {
            "position": self.position,
            "id": self.id,
            "task": self.task,
            "reason": self.reason,
            # The retry rule that decided (service.retry_policy), for tasks that ran; None otherwise.
            "retry_rule": str(self.headers[h.RETRY_RULE]) if self.headers.get(h.RETRY_RULE) else None,
            "exception": self.exception_type,
            "message": self.exception_message,
            "attempts": self.attempts,
            "replays": self.replays,
            "source_queue": self.source_queue or None,
            "routing_key": self.routing_key,
            "died_at": died.isoformat(timespec="seconds") if died else None,
        }

    def details(self, show_args: bool = True) -> dict[str, Any]:
        """Everything ``dlq show`` shows."""
        info = self.summary()
        info.update(
            queue=self.queue,
            exchange=self.exchange,
            traceback=str(self.headers.get(h.TRACEBACK) or ""),
            first_failure_at=self.headers.get(h.FIRST_FAILURE_AT),
            last_failure_at=self.headers.get(h.LAST_FAILURE_AT),
            x_death=to_jsonable(self.headers.get("x-death") or []),
            headers=to_jsonable(self.headers),
            properties=to_jsonable(self.properties),
            body_bytes=len(self.body),
        )
        if show_args:
            info["args"], info["kwargs"] = _decode_args(self)
        else:
            info["headers"] = {k: ("<hidden>" if k in ("argsrepr", "kwargsrepr") else v)
                               for k, v in info["headers"].items()}
        return info


def _decode_args(letter: DeadLetter) -> tuple[Any, Any]:
    if letter.properties.get("content_type") != "application/json":
        return None, None
    try:
        args, kwargs, _ = json.loads(letter.body)
        return args, kwargs
    except (ValueError, TypeError):
        return None, None


def work_queue_of(name: str) -> str:
    """The work queue a dead-letter queue belongs to."""
    for queue in queues.WORK_QUEUE_NAMES:
        if queues.dead_letter_queue_name(queue) == name:
            return queue
    raise DeadLetterError(f"{name!r} is not a dead-letter queue")


#: What ``--queue`` accepts besides the queue names: ``default`` for ``default.dead``,
#: ``unroutable`` for ``unroutable.dead``.
_SHORT_NAMES = {name.removesuffix(".dead"): name for name in queues.DEAD_LETTER_QUEUE_NAMES}


def resolve_queues(names: Iterable[str] | None) -> list[str]:
    """Dead-letter queue names from user input: ``default`` or ``default.dead``,
    ``unroutable`` or ``unroutable.dead``; all when empty."""
    dead = list(queues.DEAD_LETTER_QUEUE_NAMES)
    chosen: list[str] = []
    for name in names or ():
        if name in dead:
            chosen.append(name)
        elif name in _SHORT_NAMES:
            chosen.append(_SHORT_NAMES[name])
        else:
            raise DeadLetterError(
                f"unknown queue {name!r}; use a work queue ({', '.join(queues.WORK_QUEUE_NAMES)}), "
                f"unroutable, or a dead-letter queue ({', '.join(dead)})"
            )
    return list(dict.fromkeys(chosen)) or dead  # each queue once, in the order given
