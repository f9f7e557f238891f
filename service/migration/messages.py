"""What a migrated message keeps, and the way it takes back into its new queue.

A message keeps its body, headers, properties (not ``user_id``, which RabbitMQ
checks against the publisher, and not the broker's ``x-delivery-count``: it
starts afresh in its new queue) and the routing key it was delivered with:
the worker sends a retry back by it, a wait queue dead-letters by it, and the
dlq tools show it for ``unroutable.dead``. In a holding queue a message has no
``expiration`` (it would expire there with nowhere to go); the value waits in
a header and comes back with it, in a wait queue cut to the time left until the
message is due (its ``kit-enqueued-at``), so a retry waits no longer than it
had left, or one wait step more for a delay longer than ``KIT_LONGEST_WAIT``.

Lanes: on the quorum profile a work queue's task of priority ``high`` or more
goes into its high lane, and a waiting retry's routing key names that lane; on
the classic profile (no lanes) both name the work queue.
"""

from __future__ import annotations

import time
from typing import Any

import amqp

from service import headers as h
from service import queues
from service.publishing import Outgoing, republished_properties

#: Headers the broker owns that a message does not take into its new queue.
BROKER_HEADERS = ("x-delivery-count",)


def restored_expiration(expiration: str, message_headers: dict[str, Any], wait: bool, now: float) -> str:
    """The ``expiration`` a message gets back: its own; in a wait queue at most the time left until it is due.

    ``message_headers`` are the message's (``kit-enqueued-at`` is its due time,
    epoch seconds), ``wait`` tells a wait queue, ``now`` is epoch seconds. Never
    below 1 ms: a message overdue expires at once and goes back to its work queue.
    """
    due = message_headers.get(h.ENQUEUED_AT)
    if not wait or isinstance(due, bool) or not isinstance(due, (int, float)) or not expiration.isdigit():
        return expiration
    return str(max(1, min(int(expiration), int((due - now) * 1000))))


def _parts(message: amqp.Message) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The headers (without the broker's), the properties to republish and the priority of a delivery."""
    headers = {k: v for k, v in (message.properties.get("application_headers") or {}).items()
               if k not in BROKER_HEADERS}
    priority = message.properties.get("priority")
    priority = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
    return headers, republished_properties(message.properties), priority


def held_message(message: amqp.Message, holding: str) -> Outgoing:
    """The copy of ``message`` that waits in queue ``holding``: no expiration; routing key and expiration in headers.

    Published through the default exchange: it reaches ``holding`` and nothing else.
    """
    headers, properties, _ = _parts(message)
    headers.setdefault(h.MIGRATING_ROUTING_KEY, str(message.delivery_info.get("routing_key") or ""))
    if message.properties.get("expiration"):
        headers.setdefault(h.MIGRATING_EXPIRATION, str(message.properties["expiration"]))
    return Outgoing("", holding, bytes(message.body), headers, properties)


def restored_message(message: amqp.Message, queue: queues.Queue, profile: queues.Topology) -> Outgoing:
    """The copy of ``message`` (from a holding queue, or a lane that goes) that goes into ``queue`` of ``profile``.

    It lands in ``queue`` only (on quorum a work queue's high task in its lane),
    with its routing key and expiration back: work queue tasks through the
    default exchange (their routing key is then the queue's name, as the
    client's is); dead letters through tasks.dead and unroutable ones through
    tasks.unroutable, so the dlq tools read them as before; the rest through
    ``queues.migration_exchange_name(queue)``, a fanout bound to ``queue`` alone.
    """
    headers, properties, priority = _parts(message)
    key = headers.pop(h.MIGRATING_ROUTING_KEY, None)
    key = str(message.delivery_info.get("routing_key") or "" if key is None else key)
    expiration = headers.pop(h.MIGRATING_EXPIRATION, None) or message.properties.get("expiration")
    if expiration:
        properties["expiration"] = restored_expiration(str(expiration), headers, queue.kind == "wait", time.time())
    body = bytes(message.body)
    work = queues.work_queue_of_key(queue.name) if queue.kind in ("work", "lane") else None
    if work is not None:
        target = profile.routing_key(work, priority) if queue.kind == "work" else queue.name
        return Outgoing("", target, body, headers, properties)
    if queue.name == queues.UNROUTABLE_QUEUE:
        return Outgoing(queues.UNROUTABLE_EXCHANGE, key, body, headers, properties)
    if queue.kind == "dead" and queues.dead_letter_queue_name(key) == queue.name:
        return Outgoing(queues.DEAD_LETTER_EXCHANGE, key, body, headers, properties)
    if queue.kind == "wait" and (waits_for := queues.work_queue_of_key(key)):
        key = profile.routing_key(waits_for, priority)
    return Outgoing(queues.migration_exchange_name(queue.name), key, body, headers, properties)
