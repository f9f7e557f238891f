"""The lock of replay, purge and import on a dead-letter queue, and the record of who holds it.

The lock is an exclusive queue, ``<dlq>.lock`` (``queues.lock_queue_name``),
declared on the holder's connection (``hold``). RabbitMQ gives it to one
connection only and drops it when that connection goes, also on kill -9; a
second taker is refused and gets ``QueueBusy``. The lock is the truth.

The record says who holds it: ``{"holder", "since", "host", "pid", "queue"}``
as JSON in the queue ``<dlq>.lock.holder`` (``holder_queue_name``: durable,
``x-max-length`` 1, ``x-expires``). Right after taking the lock the holder
publishes it, confirmed, through the direct exchange ``HOLDER_EXCHANGE``
(routing key: the dead-letter queue), never through the default exchange:
publishing there takes write on ``amq.default``, which reaches every queue of
the vhost. A reader takes it with basic.get without ack and closes its channel,
which puts it back. The holder consumes the record queue itself (prefetch 1,
so it holds one copy unacked) and publishes a second copy, the one readers get:
while it lives the queue has a consumer and never expires, however long the
hold. When it dies, its copy returns (the queue keeps one, ``x-max-length``)
and the queue expires ``HOLDER_QUEUE_EXPIRES_MS`` later. Such a stale record
blocks nothing: it is read only while the lock is held, and the next holder
purges it before it writes its own.

Rights (RabbitMQ 3.10.8, tests/test_dlq_lock.py, tests/test_security.py): the
lock takes configure on ``<dlq>.lock``; the record configure on the record
queue and on ``HOLDER_EXCHANGE`` (declare, delete), write on the record queue
and read on the exchange (bind), write on the exchange (publish), read on the
record queue (purge, consume, basic.get).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
from datetime import UTC, datetime
from typing import Any

import amqp
from kombu import Connection

from service import queues
from service.deadletters.letter import DeadLetterError

logger = logging.getLogger(__name__)

#: The direct exchange the holders' records go through; routing key: the dead-letter queue's name.
HOLDER_EXCHANGE = "kit.dlq.holders"
#: A record queue with no consumer (its holder gone) and unused this long is deleted by the broker.
HOLDER_QUEUE_EXPIRES_MS = 60_000
#: The arguments of every record queue (always the same: a declare with others is PRECONDITION_FAILED).
HOLDER_QUEUE_ARGUMENTS: dict[str, Any] = {"x-max-length": 1, "x-expires": HOLDER_QUEUE_EXPIRES_MS}
#: The longest holder text kept in a record (free text shown in one-line errors).
HOLDER_CHARS = 200
#: How long the holder waits for the broker to confirm its record (seconds).
RECORD_CONFIRM_TIMEOUT_S = 10.0
#: How many messages a reader looks at in a record queue (normally one; a requeued stale one may precede it).
_READ_AT_MOST = 3
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_HOLDER_FIELDS = {"holder": str, "since": str, "host": str, "pid": int, "queue": str}


def holder_queue_name(dead_letter_queue: str) -> str:
    """The queue that holds the record of who holds ``dead_letter_queue``'s lock."""
    return f"{queues.lock_queue_name(dead_letter_queue)}.holder"


class QueueBusy(DeadLetterError):
    """Another replay, purge or import holds the queue.

    ``queue`` is the dead-letter queue; ``holder`` the record of who holds it
    (keys holder, since, host, pid, queue), or None when it left none.
    """

    def __init__(self, queue: str, holder: dict[str, Any] | None = None) -> None:
        self.queue = queue
        # holder_of's answer for a holder without a record (every value None) counts as none.
        self.holder = holder if holder and (holder.get("holder") or holder.get("pid") is not None) else None
        holder = self.holder
        who = f": {holder_text(holder)}" if holder else " (its holder left no record of who it is)"
        super().__init__(f"another replay, purge or import is working on {queue!r}{who}; wait for it to finish "
                         "(its lock is released when it ends or its process dies)")


def process_holder(command: str = "") -> str:
    """This process as a holder: ``user@host pid N (command)``, e.g. ``root@box pid 123 (dlq replay)``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container without a passwd entry)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}" + (f" ({command})" if command else "")


def holder_text(record: dict[str, Any]) -> str:
    """One line about a holder record: ``<holder> since <since>`` (whatever of it is known)."""
    who = record.get("holder") or (f"pid {record['pid']} on {record['host']}" if record.get("pid") is not None
                                   else "a holder that left no record")
    return f"{who} since {record['since']}" if record.get("since") else str(who)


def hold(conn: Connection, queue: str, holder: str | None = None) -> amqp.Channel:
    """Take ``queue``'s lock for the life of ``conn`` and record ``holder`` as the one who holds it.

    ``holder`` is free text naming who works on it ("alice via the console
    (replay)"); None names this process (``process_holder()``). Returns the
    channel to give to ``release``. Raises QueueBusy, naming the holder and since
    when, when another connection holds it; DeadLetterError when the user may
    not take it. Taking it again on the same
    connection succeeds (and renews the record). A record that cannot be written
    (a user without the rights) is logged; the lock is taken all the same.
    """
    channel = conn.channel()
    try:
        channel.queue_declare(queues.lock_queue_name(queue), exclusive=True, auto_delete=True)
    except amqp.exceptions.ResourceLocked:
        raise QueueBusy(queue, _read_record(conn, queue)) from None
    except amqp.exceptions.AccessRefused as exc:
        raise DeadLetterError(
            f"the broker refused this user the lock of {queue!r} ({exc.reply_text}): it takes configure on "
            f"{queues.lock_queue_name(queue)!r}, which kit-admin and kit-console have (deploy/rabbitmq/README.md)"
        ) from None
    record = _record(queue, process_holder() if holder is None else holder)
    try:
        _write_record(channel, queue, record)
    except (amqp.exceptions.ChannelError, amqp.exceptions.MessageNacked) as exc:
        logger.warning("took the lock of %s, but could not record its holder (%s): others will see no name",
                       queue, exc)
        _close_quietly(channel)
        channel = conn.channel()  # the lock belongs to the connection, not to the channel the broker closed
    except BaseException:
        _drop_lock(conn, queue)  # nobody would release it: the caller gets no channel
        raise
    return channel


def release(channel: amqp.Channel, queue: str) -> None:
    """Give back a lock taken with ``hold``, its record first (the broker also does when the connection closes)."""
    try:
        channel.queue_delete(holder_queue_name(queue))  # while the lock is still ours: no other holder's record
    except amqp.exceptions.ChannelError:
        try:
            channel = channel.connection.channel()  # the broker closed this one; the lock is the connection's
        except Exception:  # noqa: BLE001 - a lost connection has released the lock already
            return
    except Exception:  # noqa: BLE001 - a lost connection has released the lock already
        return
    try:
        channel.queue_delete(queues.lock_queue_name(queue))
    except Exception:  # noqa: BLE001 - a lost connection has released the lock already
        pass
    _close_quietly(channel)


def is_busy(conn: Connection, queue: str) -> bool:
    """True when a replay, purge or import on another connection holds ``queue``."""
    channel = conn.channel()
    try:
        channel.queue_declare(queues.lock_queue_name(queue), passive=True)
    except amqp.exceptions.ResourceLocked:
        return True
    except amqp.exceptions.NotFound:
        return False
    finally:
        _close_quietly(channel)
    return False


def holder_of(conn: Connection, queue: str) -> dict[str, Any] | None:
    """Who holds ``queue``'s lock on another connection, or None when nobody does.

    The record's keys: ``holder`` (the text given to ``hold``), ``since`` (ISO
    8601, UTC), ``host``, ``pid``, ``queue``. Held by someone who left no record,
    they are all None but ``queue``. A record left by a holder that died is never
    returned: the lock, not the record, says whether the queue is held.
    """
    if not is_busy(conn, queue):
        return None
    return _read_record(conn, queue) or {"holder": None, "since": None, "host": None, "pid": None, "queue": queue}


# -- the record -----------------------------------------------------------------------------


def _record(queue: str, holder: str) -> dict[str, Any]:
    return {"holder": _one_line(holder), "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "pid": os.getpid(), "queue": queue}


def _one_line(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()[:HOLDER_CHARS]


def _write_record(channel: amqp.Channel, queue: str, record: dict[str, Any]) -> None:
    """Put ``record`` in ``queue``'s record queue: one copy this channel keeps unacked (so the queue
    has a consumer and does not expire while the lock is held), one for readers."""
    name = holder_queue_name(queue)
    channel.exchange_declare(HOLDER_EXCHANGE, "direct", durable=True, auto_delete=False)
    channel.queue_declare(name, durable=True, auto_delete=False, arguments=HOLDER_QUEUE_ARGUMENTS)
    channel.queue_bind(name, HOLDER_EXCHANGE, routing_key=queue)
    channel.queue_purge(name)  # a dead holder's record
    channel.basic_qos(0, 1, False)  # the consumer below takes the first copy and no more
    channel.basic_consume(name, no_ack=False, callback=_keep, on_cancel=_keep)
    body = json.dumps(record)
    for _ in range(2):  # the first goes to that consumer, the second waits for readers
        channel.basic_publish_confirm(amqp.Message(body, content_type="application/json"), HOLDER_EXCHANGE, queue,
                                      confirm_timeout=RECORD_CONFIRM_TIMEOUT_S)


def _keep(*_: Any) -> None:
    """The holder's own consumer: keeps its copy of the record unacked; a cancel (its queue deleted) is fine."""


def _read_record(conn: Connection, queue: str) -> dict[str, Any] | None:
    """The newest valid record in ``queue``'s record queue, read without taking it; None when there is none."""
    channel = conn.channel()
    channel.auto_decode = False
    records = []
    try:
        for _ in range(_READ_AT_MOST):
            message = channel.basic_get(holder_queue_name(queue), no_ack=False)
            if message is None:
                break
            record = _parsed(message.body, queue)
            if record is not None:
                records.append(record)
    except amqp.exceptions.ChannelError:  # no record queue (released a moment ago), or no right to read it
        pass
    finally:
        _close_quietly(channel)  # puts what was read back
    return max(records, key=lambda r: r["since"]) if records else None


def _parsed(body: bytes | str, queue: str) -> dict[str, Any] | None:
    """A record as written by ``_record``, or None for anything else (anyone who may publish there could)."""
    try:
        record = json.loads(body)
    except (ValueError, TypeError):
        return None
    if not isinstance(record, dict) or record.get("queue") != queue:
        return None
    if any(not isinstance(record.get(key), kind) or isinstance(record.get(key), bool)
           for key, kind in _HOLDER_FIELDS.items()):
        return None
    try:
        since = datetime.fromisoformat(record["since"])
    except ValueError:
        return None
    if since.tzinfo is None:
        return None
    return {"holder": _one_line(record["holder"]), "since": since.astimezone(UTC).isoformat(timespec="seconds"),
            "host": _one_line(record["host"]), "pid": record["pid"], "queue": queue}


def _drop_lock(conn: Connection, queue: str) -> None:
    try:
        release(conn.channel(), queue)
    except Exception:  # noqa: BLE001 - a lost connection has released the lock already
        pass


def _close_quietly(channel: amqp.Channel) -> None:
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - the broker closed it already
        pass
