"""``migrate``: every queue of the kit, with its messages, to the other profile.

Under the migration lock it plans again, refuses (changing nothing) while a
queue that would be deleted has consumers, re-creates the queues in phases
(``_recreate``), empties the lanes the target profile has not (``_drain_lanes``)
and ends with ``service.topology.declare`` of the target profile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu import Connection

from service import queues
from service.deadletters import hold, release
from service.migration.messages import held_message, restored_message
from service.migration.mover import Mover, Step
from service.migration.plan import (
    MigrationError,
    QueuePlan,
    accepts,
    close_quietly,
    counts,
    holding_arguments,
    plan,
    profile_of,
    require_idle,
    spec,
)
from service.publishing import ConfirmedChannel
from service.settings import Settings
from service.topology import declare


@dataclass
class Outcome:
    """What a migration did: messages put into each new queue, and unroutable.dead before and after."""

    moved: dict[str, int] = field(default_factory=dict)
    unroutable_before: int = 0
    unroutable_after: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Messages put into new queues in all."""
        return sum(self.moved.values())


def _declare_bound(conn: Connection, queue: queues.Queue, *, bind: bool = True) -> None:
    """Declare ``queue`` as its profile wants it and (with ``bind``) bind it as ``service.topology.declare`` does.

    A dead-letter or wait queue is also bound to its migration exchange, the
    way back for messages whose routing key its own binding would not take.
    """
    channel = conn.channel()
    try:
        channel.queue_declare(queue.name, durable=True, exclusive=False, auto_delete=False,
                              arguments=dict(queue.arguments))
        if bind:
            channel.queue_bind(queue.name, queue.exchange, routing_key=queue.binding_key,
                               arguments=dict(queue.binding_arguments))
        if queue.kind in ("dead", "wait"):
            exchange = queues.migration_exchange_name(queue.name)
            channel.exchange_declare(exchange, "fanout", durable=True, auto_delete=False)
            channel.queue_bind(queue.name, exchange)
    finally:
        close_quietly(channel)


def _rebind(conn: Connection, binding: queues.Queue, add: str | None, remove: str | None) -> None:
    """Bind queue ``add`` as ``binding`` is bound, then unbind queue ``remove`` from it.

    In that order, every message published meanwhile reaches one of them (in
    the instant between, both: at least once, never lost).
    """
    channel = conn.channel()
    try:
        for name, bind in ((add, channel.queue_bind), (remove, channel.queue_unbind)):
            if name is not None:
                bind(name, binding.exchange, routing_key=binding.binding_key,
                     arguments=dict(binding.binding_arguments))
    finally:
        close_quietly(channel)


def _holding(item: QueuePlan) -> str:
    return queues.holding_queue_name(item.name)


def _target(item: QueuePlan, profile: queues.Topology) -> queues.Queue:
    target = spec(profile.queue_type, item.name)
    assert target is not None
    return target


def _recreate(conn: Connection, mover: Mover, items: list[QueuePlan], profile: queues.Topology,
              outcome: Outcome) -> None:
    """Re-create (or create) each queue of ``items``, its messages waiting in its holding queue meanwhile.

    Its binding (the same on both profiles) feeds the holding queue while the
    queue is re-created, so publishers that keep running lose nothing and the
    moves end even while they publish. Every binding moves in one phase,
    followed by one settle (SETTLE_S) for all.
    """
    holdings = {item.name: item.holding_type for item in items if item.holding_type is not None}
    for item in items:  # 1. the holding queues take the bindings
        if item.action == "convert":
            if item.name not in holdings:
                holdings[item.name] = profile.queue_type
                accepts(conn, _holding(item), holding_arguments(profile.queue_type, item.name) or {})  # declares it
            _rebind(conn, _target(item, profile), add=_holding(item), remove=item.name)
    if any(item.action == "convert" for item in items):
        mover.settle()
    for item in items:  # 2. each queue is emptied into its holding queue, deleted and declared again
        holding = _holding(item)
        if item.action == "convert":
            assert item.live_type is not None
            moved = mover.move(item.name, lambda m, holding=holding: held_message(m, holding), f"into {holding}")
            mover.report(Step(item.name, f"{moved} message(s) moved into {holding}"))
            mover.delete_empty(item.name, item.live_type, lambda m, holding=holding: held_message(m, holding),
                               f"into {holding}")
        # Bound at once only without a holding queue: both bound, a task published would reach both.
        _declare_bound(conn, _target(item, profile), bind=item.name not in holdings)
        if item.action in ("convert", "create"):
            mover.report(Step(item.name, f"declared as a {profile.queue_type} queue"))
    for item in items:  # 3. the new queues take the bindings back ...
        if item.name in holdings:
            _rebind(conn, _target(item, profile), add=item.name, remove=_holding(item))
    if holdings:
        mover.settle()
    for item in items:  # ... and the messages
        outcome.moved[item.name] = 0
        holding_type = holdings.get(item.name)
        if holding_type is None:
            continue
        target, holding = _target(item, profile), _holding(item)
        moved = mover.move(holding, lambda m, target=target: restored_message(m, target, profile), f"into {item.name}")
        mover.delete_empty(holding, holding_type, lambda m, target=target: restored_message(m, target, profile),
                           f"into {item.name}")
        mover.report(Step(item.name, f"{moved} message(s) moved back from {holding}; {holding} deleted"))
        outcome.moved[item.name] = moved


def _drain_lanes(conn: Connection, mover: Mover, items: list[QueuePlan], profile: queues.Topology,
                 outcome: Outcome) -> None:
    """Empty each lane of ``items`` (the target profile has none) into its work queue, then delete it.

    Meanwhile the work queue takes the lane's binding, so tasks published to the
    lane reach it; it gives the binding up once the lane is gone.
    """
    if not items:
        return
    pairs = []
    for item in items:
        work = spec(profile.queue_type, queues.work_queue_of_key(item.name) or "")
        lane = spec(item.live_type or "", item.name)
        assert work is not None and lane is not None and item.live_type is not None
        _rebind(conn, lane, add=work.name, remove=item.name)
        pairs.append((item, work, lane))
    mover.settle()
    for item, work, lane in pairs:
        moved = 0
        for source, queue_type in ((item.name, item.live_type), (_holding(item), item.holding_type)):
            if queue_type is not None:
                moved += mover.move(source, lambda m, work=work: restored_message(m, work, profile),
                                    f"into {work.name}")
                mover.delete_empty(source, queue_type, lambda m, work=work: restored_message(m, work, profile),
                                   f"into {work.name}")
        _rebind(conn, lane, add=None, remove=work.name)
        mover.report(Step(item.name, f"{moved} message(s) moved into {work.name}; deleted"))
        outcome.moved[item.name] = moved


def _clean_up(conn: Connection, profile: queues.Topology) -> None:
    """Delete the migration exchanges, and the lane bindings of work queues whose lanes went."""
    channel = conn.channel()
    try:
        for queue in profile.all_queues:
            channel.exchange_delete(queues.migration_exchange_name(queue.name))
        gone = [] if profile.lanes else [lane for other in queues.QUEUE_TYPES for lane in queues.topology(other).lanes]
        for lane in gone:
            channel.queue_unbind(queues.work_queue_of_key(lane.name), lane.exchange, routing_key=lane.binding_key)
    finally:
        close_quietly(channel)


def _take_lock(conn: Connection) -> Any:
    channel = conn.channel()
    try:
        channel.queue_declare(queues.MIGRATION_LOCK_QUEUE, exclusive=True, auto_delete=True)
    except amqp.exceptions.ResourceLocked:
        raise MigrationError("another `topology migrate` is running on this vhost; wait for it to end (its lock "
                             "is released when it ends or its process dies)") from None
    return channel


def _ready(conn: Connection, name: str) -> int:
    found = counts(conn, name)
    return found[0] if found else 0


def migrate(conn: Connection, settings: Settings, target: str, *,
            progress: Callable[[Step], None] | None = None) -> Outcome:
    """Move every queue of the kit, with its messages, to the ``target`` profile (classic or quorum).

    ``conn`` is a connection as the kit's admin; the copies are published with
    ``settings`` on a connection of their own. ``progress`` gets each Step as it
    happens. Raises MigrationError (changing nothing) when a queue that would
    be deleted has consumers, another migration runs or a replay holds a
    dead-letter queue; MigrationError or the broker's errors when it cannot go
    on part-way: nothing is lost, and a rerun finishes the job.
    """
    started = time.monotonic()
    profile = profile_of(target)
    report = progress or (lambda step: None)
    lock = _take_lock(conn)
    dead_locks: list[tuple[Any, str]] = []
    publisher = ConfirmedChannel(settings)
    try:
        for name in queues.DEAD_LETTER_QUEUE_NAMES:
            dead_locks.append((hold(conn, name), name))
        current = plan(conn, target)
        require_idle(current)
        outcome = Outcome(unroutable_before=_ready(conn, queues.UNROUTABLE_QUEUE))
        mover = Mover(conn, publisher, report)
        changing = [item for item in current.queues if item.changes]
        _recreate(conn, mover, [item for item in changing if item.action != "drain"], profile, outcome)
        _drain_lanes(conn, mover, [item for item in changing if item.action == "drain"], profile, outcome)
        declare(conn, profile)
        _clean_up(conn, profile)
        outcome.unroutable_after = _ready(conn, queues.UNROUTABLE_QUEUE)
        outcome.seconds = time.monotonic() - started
        return outcome
    finally:
        publisher.close()
        for channel, name in dead_locks:
            release(channel, name)
        try:
            lock.queue_delete(queues.MIGRATION_LOCK_QUEUE)
        except Exception:  # noqa: BLE001 - a lost connection has released the lock already
            pass
        close_quietly(lock)
