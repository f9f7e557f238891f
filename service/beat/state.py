"""Beat's schedule state on the broker: when each entry last ran, for the next beat that takes the lease.

One durable queue, ``queues.BEAT_STATE_QUEUE``, with ``x-max-length`` 1 (the
newest message pushes the older one out), bound to a direct exchange of its own,
``queues.BEAT_STATE_EXCHANGE``. The active beat writes the last run of every
entry there, persistent and confirmed, on its lease connection, *before* it
sends the due task; a beat that takes the lease reads it and goes on from there.

- Written before the send: a beat killed between the write and the send loses
  that one run; the next beat does not send it a second time.
- Written on the lease connection: a confirmed write was in the queue before the
  broker could free the lease, so the next holder reads it.
- Read without consuming it (rejected back into the queue), so a beat that dies
  before its first write leaves the state to the next one.

The message is JSON: ``{"format": FORMAT, "written_at": ISO 8601, "by":
"host/pid", "last_run_at": {entry name: ISO 8601 with its offset}}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import amqp

from service import queues
from service.beat.lease import IO_TIMEOUT_S
from service.errors import KitError

#: The ``format`` of a state message this code writes and reads.
FORMAT = "kit-beat-state/1"
#: Routing key of the state in BEAT_STATE_EXCHANGE (the queue's own name).
ROUTING_KEY = queues.BEAT_STATE_QUEUE


class StateUnreadable(KitError):
    """The state queue holds a message that is not a schedule state of this format."""


@dataclass(frozen=True)
class ScheduleState:
    """The schedule state as read from the broker: each entry's last run, who wrote it and when."""

    last_run_at: dict[str, datetime]
    written_at: datetime
    by: str


def queue_arguments(queue_type: str) -> dict[str, Any]:
    """Arguments of the state queue: one message; replicated (quorum) on the quorum profile."""
    arguments: dict[str, Any] = {"x-max-length": 1}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


def declare(open_channel: Callable[[], Any], queue_type: str) -> Any:
    """Declare the state's queue, exchange and binding (idempotent); returns a confirmed channel for them.

    A state queue that exists is used as it is (whatever its type), so
    changing KIT_QUEUE_TYPE never stops beat. Raises what the broker raises.
    """
    channel = open_channel()
    try:
        channel.queue_declare(queues.BEAT_STATE_QUEUE, passive=True)
    except amqp.exceptions.NotFound:  # the broker closed that channel
        channel = open_channel()
        channel.queue_declare(queues.BEAT_STATE_QUEUE, durable=True, auto_delete=False,
                              arguments=queue_arguments(queue_type))
    channel.exchange_declare(queues.BEAT_STATE_EXCHANGE, "direct", durable=True, auto_delete=False)
    channel.queue_bind(queues.BEAT_STATE_QUEUE, queues.BEAT_STATE_EXCHANGE, routing_key=ROUTING_KEY)
    channel.confirm_select()
    return channel


def read(channel: Any) -> ScheduleState | None:
    """The state on the broker, None when there is none; StateUnreadable for a message that is not one.

    The message stays in the queue (rejected back into it).
    """
    message = channel.basic_get(queues.BEAT_STATE_QUEUE, no_ack=False)
    if message is None:
        return None
    try:
        return decode(message.body)
    finally:
        channel.basic_reject(message.delivery_tag, requeue=True)


def write(channel: Any, last_run_at: Mapping[str, datetime], by: str) -> None:
    """Publish the state (persistent) and wait for the broker's confirm, at most IO_TIMEOUT_S; raises on failure."""
    message = amqp.Message(encode(last_run_at, by), content_type="application/json", delivery_mode=2)
    channel.basic_publish_confirm(message, queues.BEAT_STATE_EXCHANGE, ROUTING_KEY, confirm_timeout=IO_TIMEOUT_S)


def encode(last_run_at: Mapping[str, datetime], by: str, now: datetime | None = None) -> bytes:
    """The JSON body of a state message; naive times are taken as UTC."""
    runs = {name: _aware(when).isoformat() for name, when in sorted(last_run_at.items())}
    written = (now or datetime.now(UTC)).isoformat()
    return json.dumps({"format": FORMAT, "written_at": written, "by": by, "last_run_at": runs}).encode()


def decode(body: bytes | str) -> ScheduleState:
    """A state message's body read back; StateUnreadable (saying what is wrong) for anything else."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"its format is not {FORMAT!r}")
        runs = data["last_run_at"]
        if not isinstance(runs, dict):
            raise ValueError("last_run_at is not a mapping")
        return ScheduleState(
            last_run_at={str(name): _aware(datetime.fromisoformat(when)) for name, when in runs.items()},
            written_at=_aware(datetime.fromisoformat(data["written_at"])),
            by=str(data.get("by", "")),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise StateUnreadable(f"the message in {queues.BEAT_STATE_QUEUE!r} is no schedule state: "
                              f"{' '.join(str(exc).split()) or type(exc).__name__}") from None


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
