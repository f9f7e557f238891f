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

Two profiles (KIT_QUEUE_TYPE, ``topology(queue_type)``) share these names:
``classic`` for one node, and ``quorum`` for a cluster, where every queue is
replicated, every dead-lettering hop is at-least-once and each work queue has
a high lane (``<queue>.high``) that stands in for message priority.

Why this module is over 400 lines (about 425): it is the one source of every
exchange, queue, argument, routing rule and priority of both profiles, which
compose, the local stack, the broker definitions, the workers, the client and
the tests all read; split, the names would again live in two places.
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

#: Queue types of the topology (KIT_QUEUE_TYPE). ``classic`` is for one broker
#: node; ``quorum`` for a cluster: every queue replicated on a majority of nodes.
QUEUE_TYPES: tuple[str, ...] = ("classic", "quorum")
DEFAULT_QUEUE_TYPE = "classic"
#: On the quorum profile each work queue has a high lane, ``<queue>.high``, that
#: workers consume beside it: quorum queues on RabbitMQ 3.x ignore message
#: priority, so a task of HIGH_LANE_PRIORITY or more is routed there instead and
#: overtakes the work queue's backlog.
HIGH_LANE_SUFFIX = ".high"
HIGH_LANE_PRIORITY = PRIORITIES["high"]
#: x-delivery-limit of the quorum work queues: the broker dead-letters a message
#: returned this many times (reason ``delivery_limit``). A backstop behind the
#: worker's own poison-message limit (KIT_MAX_WORKER_LOST, which must be lower),
#: and RabbitMQ 4's default for quorum queues.
DELIVERY_LIMIT = 20

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
    kind: str = "work"  # work | lane | dead | wait

    @property
    def queue_type(self) -> str:
        """``classic`` or ``quorum``, from the arguments."""
        return str(self.arguments.get("x-queue-type", "classic"))


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


#: ``topology migrate``'s lock: an exclusive queue on the migrating connection, so
#: two migrations never run at once (the broker drops it when that connection goes).
MIGRATION_LOCK_QUEUE = "kit.topology.migrate.lock"
#: Suffix of the queue that holds a queue's messages while ``topology migrate``
#: re-creates that queue with the other type (RabbitMQ cannot change a queue's type).
MIGRATING_SUFFIX = ".migrating"


def holding_queue_name(queue: str) -> str:
    """The queue that holds ``queue``'s messages while ``topology migrate`` re-creates it."""
    return f"{queue}{MIGRATING_SUFFIX}"


def migration_exchange_name(queue: str) -> str:
    """The fanout exchange, bound to ``queue`` alone, that ``topology migrate`` puts messages back through."""
    return f"kit.migrate.{queue}"


#: Beat's schedule lease: an exclusive, auto-delete queue. The beat whose
#: connection declared it schedules; it vanishes when that connection closes
#: (service.beat.lease).
BEAT_LEASE_QUEUE = "kit.beat.lease"
#: Beat's schedule state on the broker: a durable queue holding one message (the
#: last run of every entry), published through its own direct exchange, so a
#: beat that takes the lease goes on where the last one stopped (service.beat.state).
BEAT_STATE_QUEUE = "kit.beat.state"
BEAT_STATE_EXCHANGE = "kit.beat"


def wait_tier_name(seconds: int) -> str:
    """Name of a delay tier, used in the wait queue's name and WAIT_HEADER."""
    return f"{seconds}s"


def high_lane_name(work_queue: str) -> str:
    """Name of a work queue's high lane (quorum profile)."""
    return f"{work_queue}{HIGH_LANE_SUFFIX}"


def _quorum(arguments: dict[str, Any], dead_letters: bool) -> dict[str, Any]:
    """``arguments`` of a quorum queue; one that dead-letters does it at-least-once."""
    arguments = {"x-queue-type": "quorum", **arguments}
    if dead_letters:
        # The broker keeps a dead letter until the target queue has confirmed it;
        # RabbitMQ needs overflow reject-publish for that strategy.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def _work_queue(name: str, queue_type: str = DEFAULT_QUEUE_TYPE, lane_of: str = "") -> Queue:
    work = lane_of or name
    # A message the broker rejects (or the worker gives up on without publishing
    # its own dead letter) still reaches the DLQ of the work queue.
    arguments: dict[str, Any] = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE, "x-dead-letter-routing-key": work}
    if queue_type == "quorum":
        arguments = _quorum({**arguments, "x-delivery-limit": DELIVERY_LIMIT}, dead_letters=True)
    else:
        arguments = {"x-max-priority": MAX_PRIORITY, **arguments}
    return Queue(name=name, exchange=TASK_EXCHANGE, binding_key=name, arguments=_frozen(arguments),
                 kind="lane" if lane_of else "work")


def _dead_letter_queue(work_queue: str, queue_type: str = DEFAULT_QUEUE_TYPE) -> Queue:
    return Queue(
        name=dead_letter_queue_name(work_queue),
        exchange=DEAD_LETTER_EXCHANGE,
        binding_key=work_queue,
        arguments=_frozen(_quorum({}, dead_letters=False) if queue_type == "quorum" else {}),
        kind="dead",
    )


def _wait_queue(seconds: int, queue_type: str = DEFAULT_QUEUE_TYPE) -> Queue:
    tier = wait_tier_name(seconds)
    arguments: dict[str, Any] = {
        "x-message-ttl": seconds * 1000,
        # No x-dead-letter-routing-key: an expired message keeps the routing
        # key it was published with, which is its work queue's name.
        "x-dead-letter-exchange": TASK_EXCHANGE,
    }
    return Queue(
        name=f"{TASK_EXCHANGE}.wait.{tier}",
        exchange=RETRY_EXCHANGE,
        binding_arguments=_frozen({"x-match": "all", WAIT_HEADER: tier}),
        arguments=_frozen(_quorum(arguments, dead_letters=True) if queue_type == "quorum" else arguments),
        kind="wait",
    )


def _unroutable_queue(queue_type: str = DEFAULT_QUEUE_TYPE) -> Queue:
    return Queue(
        name=UNROUTABLE_QUEUE,
        exchange=UNROUTABLE_EXCHANGE,  # fanout: the binding key is ignored
        arguments=_frozen(_quorum({}, dead_letters=False) if queue_type == "quorum" else {}),
        kind="dead",
    )


#: Work queues, most urgent first. Workers consume these and nothing else.
WORK_QUEUE_NAMES: tuple[str, ...] = ("urgent", "default", "bulk")
DEFAULT_QUEUE = "default"



@dataclass(frozen=True)
class Topology:
    """Every queue of one profile (KIT_QUEUE_TYPE), with the arguments it must be declared with.

    The names are the same on both profiles, except that only ``quorum`` has
    the high lanes. Get one with ``topology(queue_type)``.
    """

    queue_type: str
    work_queues: tuple[Queue, ...]
    lanes: tuple[Queue, ...]
    dead_letter_queues: tuple[Queue, ...]
    wait_queues: tuple[Queue, ...]

    @property
    def all_queues(self) -> tuple[Queue, ...]:
        """Work queues, lanes, dead-letter queues and wait queues, in the order they are declared."""
        return self.work_queues + self.lanes + self.dead_letter_queues + self.wait_queues

    def consumed(self, work_queue_names: tuple[str, ...] | list[str]) -> list[str]:
        """The queues a worker of ``work_queue_names`` consumes: each work queue, then its lane (quorum)."""
        names: list[str] = []
        for name in work_queue_names:
            work_queue(name)  # raises for a name that is no work queue
            names.append(name)
            if self.lanes:
                names.append(high_lane_name(name))
        return names

    def routing_key(self, work_queue_name: str, priority: int) -> str:
        """The routing key (in TASK_EXCHANGE) of a task for ``work_queue_name`` at ``priority``.

        The work queue's name, except on the quorum profile for HIGH_LANE_PRIORITY
        or more: its high lane's name.
        """
        if self.lanes and priority >= HIGH_LANE_PRIORITY:
            return high_lane_name(work_queue_name)
        return work_queue_name


def _topology(queue_type: str) -> Topology:
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"unknown queue type {queue_type!r}; use one of {', '.join(QUEUE_TYPES)}")
    lanes = () if queue_type == "classic" else tuple(
        _work_queue(high_lane_name(n), queue_type, lane_of=n) for n in WORK_QUEUE_NAMES)
    return Topology(
        queue_type=queue_type,
        work_queues=tuple(_work_queue(n, queue_type) for n in WORK_QUEUE_NAMES),
        lanes=lanes,
        dead_letter_queues=tuple(_dead_letter_queue(n, queue_type) for n in WORK_QUEUE_NAMES)
        + (_unroutable_queue(queue_type),),
        wait_queues=tuple(_wait_queue(s, queue_type) for s in WAIT_TIERS_S),
    )


_TOPOLOGIES: MappingProxyType[str, Topology] = MappingProxyType({t: _topology(t) for t in QUEUE_TYPES})


def topology(queue_type: str = DEFAULT_QUEUE_TYPE) -> Topology:
    """The topology of a profile; raises ValueError naming the profiles for another ``queue_type``."""
    if queue_type not in _TOPOLOGIES:
        raise ValueError(f"unknown queue type {queue_type!r}; use one of {', '.join(QUEUE_TYPES)}")
    return _TOPOLOGIES[queue_type]


# The classic profile's queues, by kind (names are the same on both profiles).
_CLASSIC = _TOPOLOGIES[DEFAULT_QUEUE_TYPE]
WORK_QUEUES: tuple[Queue, ...] = _CLASSIC.work_queues
#: The queue of unroutable task messages (see UNROUTABLE_QUEUE).
UNROUTABLE: Queue = _CLASSIC.dead_letter_queues[-1]
#: Every queue the dlq tools work on: each work queue's dead-letter queue, in
#: the order of the work queues, then UNROUTABLE_QUEUE.
DEAD_LETTER_QUEUES: tuple[Queue, ...] = _CLASSIC.dead_letter_queues
DEAD_LETTER_QUEUE_NAMES: tuple[str, ...] = tuple(q.name for q in DEAD_LETTER_QUEUES)
WAIT_QUEUES: tuple[Queue, ...] = _CLASSIC.wait_queues
ALL_QUEUES: tuple[Queue, ...] = _CLASSIC.all_queues

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
        "notifications.*": "urgent",
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


def work_queue_of_key(routing_key: str) -> str | None:
    """The work queue a task's routing key belongs to (its name, or its high lane's); None for another key."""
    name = routing_key.removesuffix(HIGH_LANE_SUFFIX)
    return name if name in WORK_QUEUE_NAMES else None


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
