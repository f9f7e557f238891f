"""The broker topology: the one place that names every exchange and queue.

Flow of a message::

    publish --> TASK_EXCHANGE (direct, key = queue name) --> work queue
    work queue --(worker: transient error)--> RETRY_EXCHANGE (headers, WAIT_HEADER)
        --> wait queue for that delay (TTL) --expires--> TASK_EXCHANGE --> work queue
    work queue --(worker: gives up, or broker rejects)--> DEAD_LETTER_EXCHANGE
        (direct, key = queue name) --> the work queue's dead-letter queue
    TASK_EXCHANGE, a routing key no work queue is bound to --> its alternate
        exchange UNROUTABLE_EXCHANGE (fanout) --> UNROUTABLE_QUEUE

Waiting for a retry happens in the broker, in the wait queues, never in a
worker's memory. Nothing published to TASK_EXCHANGE is dropped: what no work
queue takes (a routing key that is not a work queue's name, from a plain Celery
app or a deleted queue) is parked in UNROUTABLE_QUEUE, which the dlq tools
show. Nothing here talks to the broker: ``service.topology`` declares and
verifies these definitions, Celery's configuration and the client read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: Direct exchange that every task is published to; the routing key is the queue name.
TASK_EXCHANGE = "tasks"
#: Headers exchange that routes a waiting message to the wait queue of its delay tier.
RETRY_EXCHANGE = "tasks.retry"
#: Direct exchange that dead letters go through; the routing key is the source queue.
DEAD_LETTER_EXCHANGE = "tasks.dead"
#: Fanout exchange that is TASK_EXCHANGE's alternate exchange (RabbitMQ's
#: ``alternate-exchange`` argument): it gets every message TASK_EXCHANGE cannot
#: route, with the routing key it was published with.
UNROUTABLE_EXCHANGE = "tasks.unroutable"
#: The queue of UNROUTABLE_EXCHANGE: unroutable task messages wait here for an
#: operator (``dlq list --queue unroutable``); nobody consumes it.
UNROUTABLE_QUEUE = "unroutable.dead"

#: Header that selects the wait queue in RETRY_EXCHANGE (value: a tier name like "8s").
WAIT_HEADER = "kit-wait"

#: Named priorities the client exposes. RabbitMQ serves higher numbers first.
#: A message published without a priority counts as 0 (as low as "low").
PRIORITIES: MappingProxyType[str, int] = MappingProxyType(
    {"low": 0, "normal": 1, "high": 2, "critical": 3}
)
#: x-max-priority of every work queue: a handful of levels, as RabbitMQ recommends.
MAX_PRIORITY = max(PRIORITIES.values())
DEFAULT_PRIORITY = "normal"

#: Delay tiers of the wait queues, in seconds. A wait lasts between the delay
#: asked for and the ceiling of the smallest tier that holds it.
WAIT_TIERS_S: tuple[int, ...] = tuple(2**n for n in range(13))  # 1 s .. 4096 s (68 min)


@dataclass(frozen=True)
class Queue:
    """A durable classic queue and the arguments it must be declared with."""

    name: str
    arguments: MappingProxyType[str, Any]
    exchange: str
    binding_key: str = ""
    binding_arguments: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    kind: str = "work"  # work | dead | wait


@dataclass(frozen=True)
class Exchange:
    """A durable exchange and the arguments it must be declared with.

    RabbitMQ compares ``alternate-exchange`` when an exchange is declared again:
    a declare with another value (or none) fails with PRECONDITION_FAILED.
    """

    name: str
    type: str
    arguments: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _frozen(mapping: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(dict(mapping))


def dead_letter_queue_name(work_queue: str) -> str:
    """Name of the dead-letter queue that belongs to ``work_queue``."""
    return f"{work_queue}.dead"


def lock_queue_name(dead_letter_queue: str) -> str:
    """Exclusive queue whose existence means a replay or purge holds ``dead_letter_queue``."""
    return f"{dead_letter_queue}.lock"


def wait_tier_name(seconds: int) -> str:
    """Name of a delay tier, used in the wait queue's name and WAIT_HEADER."""
    return f"{seconds}s"


def _work_queue(name: str) -> Queue:
    return Queue(
        name=name,
        exchange=TASK_EXCHANGE,
        binding_key=name,
        arguments=_frozen(
            {
                "x-max-priority": MAX_PRIORITY,
                # A message the broker rejects (or the worker gives up on without
                # publishing its own dead letter) still reaches the DLQ.
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": name,
            }
        ),
    )


def _dead_letter_queue(work_queue: str) -> Queue:
    return Queue(
        name=dead_letter_queue_name(work_queue),
        exchange=DEAD_LETTER_EXCHANGE,
        binding_key=work_queue,
        arguments=_frozen({}),
        kind="dead",
    )


def _wait_queue(seconds: int) -> Queue:
    tier = wait_tier_name(seconds)
    return Queue(
        name=f"{TASK_EXCHANGE}.wait.{tier}",
        exchange=RETRY_EXCHANGE,
        binding_arguments=_frozen({"x-match": "all", WAIT_HEADER: tier}),
        arguments=_frozen(
            {
                "x-message-ttl": seconds * 1000,
                # No x-dead-letter-routing-key: an expired message keeps the routing
                # key it was published with, which is its work queue's name.
                "x-dead-letter-exchange": TASK_EXCHANGE,
            }
        ),
        kind="wait",
    )


#: Work queues, most urgent first. Workers consume these and nothing else.
WORK_QUEUE_NAMES: tuple[str, ...] = ("urgent", "default", "bulk")
DEFAULT_QUEUE = "default"

WORK_QUEUES: tuple[Queue, ...] = tuple(_work_queue(n) for n in WORK_QUEUE_NAMES)
#: The queue of unroutable task messages (see UNROUTABLE_QUEUE).
UNROUTABLE: Queue = Queue(
    name=UNROUTABLE_QUEUE,
    exchange=UNROUTABLE_EXCHANGE,  # fanout: the binding key is ignored
    arguments=_frozen({}),
    kind="dead",
)
#: Every queue the dlq tools work on: each work queue's dead-letter queue, in
#: the order of the work queues, then UNROUTABLE_QUEUE.
DEAD_LETTER_QUEUES: tuple[Queue, ...] = tuple(_dead_letter_queue(n) for n in WORK_QUEUE_NAMES) + (UNROUTABLE,)
DEAD_LETTER_QUEUE_NAMES: tuple[str, ...] = tuple(q.name for q in DEAD_LETTER_QUEUES)
WAIT_QUEUES: tuple[Queue, ...] = tuple(_wait_queue(s) for s in WAIT_TIERS_S)
ALL_QUEUES: tuple[Queue, ...] = WORK_QUEUES + DEAD_LETTER_QUEUES + WAIT_QUEUES

#: Every exchange of the kit, with its arguments. TASK_EXCHANGE's alternate
#: exchange catches what no work queue is bound for.
EXCHANGE_DEFINITIONS: tuple[Exchange, ...] = (
    Exchange(TASK_EXCHANGE, "direct", _frozen({"alternate-exchange": UNROUTABLE_EXCHANGE})),
    Exchange(RETRY_EXCHANGE, "headers"),
    Exchange(DEAD_LETTER_EXCHANGE, "direct"),
    Exchange(UNROUTABLE_EXCHANGE, "fanout"),
)
#: Exchange name -> AMQP exchange type (arguments: ``exchange(name).arguments``).
EXCHANGES: MappingProxyType[str, str] = MappingProxyType({x.name: x.type for x in EXCHANGE_DEFINITIONS})

# Celery's own names (fixed by Celery and kombu, not chosen here). The broker
# users' permissions (service.broker) allow exactly these besides the kit's.
#: Topic exchange of Celery's task and worker events (celery-exporter, Flower).
EVENT_EXCHANGE = "celeryev"
EVENT_EXCHANGE_TYPE = "topic"
#: Prefix of the auto-delete queues that receive events: celeryev.<uuid>.
EVENT_QUEUE_PREFIX = "celeryev."
#: Fanout exchange of remote control and inspect broadcasts.
PIDBOX_EXCHANGE = "celery.pidbox"
#: Direct exchange their replies go through.
PIDBOX_REPLY_EXCHANGE = "reply.celery.pidbox"
#: Suffix of a worker's control queue (<node>.celery.pidbox) and, after "reply",
#: of a reply queue (<uuid>.reply.celery.pidbox).
PIDBOX_QUEUE_SUFFIX = ".celery.pidbox"

#: Which work queue a task goes to when the publisher names none. Keys are task
#: names or prefixes ending in "*"; unlisted tasks go to DEFAULT_QUEUE.
TASK_ROUTES: MappingProxyType[str, str] = MappingProxyType(
    {
        "emails.*": "urgent",
        "webhooks.*": "default",
        "reports.*": "bulk",
        "maintenance.*": "bulk",
    }
)


def queue_for_task(task_name: str) -> str:
    """The work queue a task is routed to by TASK_ROUTES."""
    if task_name in TASK_ROUTES:
        return TASK_ROUTES[task_name]
    for pattern, queue in TASK_ROUTES.items():
        if pattern.endswith("*") and task_name.startswith(pattern[:-1]):
            return queue
    return DEFAULT_QUEUE


def wait_tier_for(delay_s: float) -> int:
    """The smallest wait tier that holds ``delay_s``.

    Raises ValueError when the delay is longer than the longest tier.
    """
    for seconds in WAIT_TIERS_S:
        if delay_s <= seconds:
            return seconds
    raise ValueError(
        f"a delay of {delay_s:g}s is longer than the longest wait tier "
        f"({WAIT_TIERS_S[-1]}s); schedule it with Celery beat instead"
    )


def wait_step(delay_s: float, longest_s: int = WAIT_TIERS_S[-1]) -> tuple[int, float]:
    """The wait tier and the seconds of the next broker wait towards a delay of ``delay_s``.

    A delay up to ``longest_s`` (a tier, KIT_LONGEST_WAIT) is waited in one go;
    a longer one waits ``longest_s`` now and again when the worker sees that
    its ``eta`` is still ahead, until it is due.
    """
    step = min(max(float(delay_s), 0.001), float(longest_s))
    return wait_tier_for(step), step


def resolve_priority(priority: str | int) -> int:
    """Turn a priority name (or a number in range) into the AMQP priority.

    Raises ValueError with the accepted values when it is neither.
    """
    if isinstance(priority, bool):
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    if isinstance(priority, int):
        if 0 <= priority <= MAX_PRIORITY:
            return priority
        raise ValueError(
            f"priority {priority} is out of range 0..{MAX_PRIORITY}; "
            f"use one of {', '.join(PRIORITIES)}"
        )
    if isinstance(priority, str) and priority.lower() in PRIORITIES:
        return PRIORITIES[priority.lower()]
    raise ValueError(f"unknown priority {priority!r}; use one of {', '.join(PRIORITIES)}")


def exchange(name: str) -> Exchange:
    """The exchange called ``name``, with its arguments.

    Raises ValueError listing the kit's exchanges when there is none by that name.
    """
    for candidate in EXCHANGE_DEFINITIONS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown exchange {name!r}; the kit's exchanges are {', '.join(EXCHANGES)}")


def work_queue(name: str) -> Queue:
    """The work queue called ``name``.

    Raises ValueError listing the work queues when there is none by that name.
    """
    for queue in WORK_QUEUES:
        if queue.name == name:
            return queue
    hint = ""
    if any(q.name == name for q in ALL_QUEUES):
        hint = " (dead-letter and wait queues are never published to or consumed directly)"
    raise ValueError(
        f"unknown work queue {name!r}{hint}; the work queues are {', '.join(WORK_QUEUE_NAMES)}"
    )
