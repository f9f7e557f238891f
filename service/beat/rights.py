"""What beat's broker user must be allowed, checked before beat starts (``service.startup.check_beat``).

Beat declares its lease queue, its state queue and exchange, binds them, reads
the state and publishes it; each needs a right, which ``service.broker``'s
publisher role grants. Without one, beat would run and never schedule, so the
check tries each operation once and turns a 403 into one line naming the user,
the resource and the right. It disturbs no running beat: a lease it takes is
deleted at once, the state message is put back, and its probe publish goes to
a routing key nothing is bound to (the broker drops it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import amqp
from kombu import Connection

from service import queues
from service.beat.lease import IO_TIMEOUT_S, RIGHTS_FIX
from service.beat.state import ROUTING_KEY, queue_arguments
from service.connection import permission_refused

#: Routing key of the probe publish: no queue is bound to it.
PROBE_KEY = "kit.beat.rights-check"


def check_rights(conn: Connection, queue_type: str) -> None:
    """Raise BrokerRefused (the user, the resource, the right, the fix) if beat's user lacks a right it needs.

    ``conn`` is a connected kombu connection as beat's user; ``queue_type`` is
    KIT_QUEUE_TYPE (the state queue's type when it must be created).
    """
    state, exchange = queues.BEAT_STATE_QUEUE, queues.BEAT_STATE_EXCHANGE
    _attempt(conn, "taking beat's schedule lease", {"queue": "configure"}, _take_and_give_back)
    _attempt(conn, "declaring beat's schedule state", {"queue": "configure"},
             lambda ch: _declare_queue(ch, queue_type))
    _attempt(conn, "declaring beat's schedule state", {"exchange": "configure"},
             lambda ch: ch.exchange_declare(exchange, "direct", durable=True, auto_delete=False))
    _attempt(conn, "binding beat's schedule state", {"queue": "write", "exchange": "read"},
             lambda ch: ch.queue_bind(state, exchange, routing_key=ROUTING_KEY))
    _attempt(conn, "reading beat's schedule state", {"queue": "read"}, _read_and_put_back)
    _attempt(conn, "writing beat's schedule state", {"exchange": "write"}, _probe_publish)


def _attempt(conn: Connection, doing: str, rights: dict[str, str], action: Callable[[Any], Any]) -> None:
    channel = conn.channel()
    try:
        action(channel)
    except amqp.exceptions.AccessRefused as exc:
        raise permission_refused(exc, doing, rights, advice=RIGHTS_FIX) from None
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def _take_and_give_back(channel: Any) -> None:
    try:
        channel.queue_declare(queues.BEAT_LEASE_QUEUE, exclusive=True, auto_delete=True)
    except amqp.exceptions.ResourceLocked:
        return  # another beat holds it: the right is there (the broker checks rights first)
    channel.queue_delete(queues.BEAT_LEASE_QUEUE)


def _declare_queue(channel: Any, queue_type: str) -> None:
    try:
        channel.queue_declare(queues.BEAT_STATE_QUEUE, durable=True, auto_delete=False,
                              arguments=queue_arguments(queue_type))
    except amqp.exceptions.PreconditionFailed:
        pass  # it exists with other arguments (another queue type): beat uses it as it is


def _read_and_put_back(channel: Any) -> None:
    message = channel.basic_get(queues.BEAT_STATE_QUEUE, no_ack=False)
    if message is not None:
        channel.basic_reject(message.delivery_tag, requeue=True)


def _probe_publish(channel: Any) -> None:
    channel.confirm_select()
    channel.basic_publish_confirm(amqp.Message(b"{}", content_type="application/json"), queues.BEAT_STATE_EXCHANGE,
                                  PROBE_KEY, confirm_timeout=IO_TIMEOUT_S)
