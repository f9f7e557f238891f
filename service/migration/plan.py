"""What a migration would do, queue by queue: the type of each queue now and after, and the messages that move.

The broker is read by passive declares and by declares that only compare (a
queue that exists is never changed by a declare with its own arguments), as
``topology verify`` does, so planning changes nothing: it is the dry run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import amqp
from kombu import Connection

from service import queues
from service.errors import KitError
from service.topology import verify


class MigrationError(KitError):
    """The migration cannot start or go on; what was moved is safe and a rerun goes on from there."""


@dataclass(frozen=True)
class QueuePlan:
    """What the migration does to one queue: its type now and after, and the messages that move."""

    name: str
    kind: str  # work | lane | dead | wait
    live_type: str | None  # None: the queue does not exist
    target_type: str | None  # None: the queue goes (a high lane, on the way back to classic)
    messages: int = 0
    consumers: int = 0
    held: int = 0  # in its holding queue, left by an interrupted migration
    holding_type: str | None = None  # None: it has no holding queue
    holding_consumers: int = 0

    @property
    def action(self) -> str:
        """``convert``, ``create``, ``drain`` (into its work queue, then deleted) or ``keep``."""
        if self.target_type is None:
            return "drain"
        if self.live_type is None:
            return "create"
        return "keep" if self.live_type == self.target_type else "convert"

    @property
    def changes(self) -> bool:
        """True when the migration touches this queue (or its holding queue)."""
        return self.action != "keep" or self.holding_type is not None

    @property
    def moving(self) -> int:
        """The messages this queue's migration moves (those of its holding queue included)."""
        return self.held + (self.messages if self.action in ("convert", "drain") else 0)

    @property
    def busy(self) -> int:
        """How many consumers would lose the queue (or its holding queue) under them."""
        return (self.consumers if self.action in ("convert", "drain") else 0) + self.holding_consumers

    def describe(self) -> str:
        """One line: name, type now and after, messages that move, what happens."""
        now, after = self.live_type or "-", self.target_type or "-"
        holding = queues.holding_queue_name(self.name)
        what = {"convert": f"re-create as {after}, messages through {holding}", "create": "create",
                "keep": "keep", "drain": f"move into {queues.work_queue_of_key(self.name)}, then delete"}[self.action]
        if self.holding_type is not None:
            what += f"; {self.held} left in {holding} by an interrupted run go back"
        if self.busy:
            what += f"; REFUSED: {self.busy} consumer(s)"
        return f"{self.name:22} {now:8} -> {after:8} {self.moving:>7} message(s)  {what}"


@dataclass(frozen=True)
class Plan:
    """Every queue of the kit, in the order the migration takes them."""

    target: str
    queues: tuple[QueuePlan, ...]

    @property
    def moving(self) -> int:
        """How many messages move in all."""
        return sum(q.moving for q in self.queues)

    @property
    def changes(self) -> bool:
        """False when every queue is of the target type already and no holding queue is left."""
        return any(q.changes for q in self.queues)

    def summary(self) -> str:
        """One line: what the migration moves and changes."""
        changed = sum(q.changes for q in self.queues)
        return (f"{self.moving} message(s) to move, {changed} of {len(self.queues)} queue(s) to change, "
                f"to {self.target} queues")


def close_quietly(channel: Any) -> None:
    """Close ``channel``; one the broker closed already is fine."""
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - the broker may have closed it already
        pass


def counts(conn: Connection, name: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of queue ``name``; None when it does not exist."""
    channel = conn.channel()
    try:
        _, messages, consumers = channel.queue_declare(name, passive=True)
        return messages, consumers
    except amqp.exceptions.NotFound:
        return None
    finally:
        close_quietly(channel)


def accepts(conn: Connection, name: str, arguments: dict[str, Any]) -> bool:
    """True when the existing queue ``name`` has ``arguments`` (a declare that only compares).

    Creates the queue with them when it does not exist.
    """
    channel = conn.channel()
    try:
        channel.queue_declare(name, durable=True, exclusive=False, auto_delete=False, arguments=arguments)
        return True
    except amqp.exceptions.PreconditionFailed:
        return False
    finally:
        close_quietly(channel)


def spec(queue_type: str, name: str) -> queues.Queue | None:
    """The queue called ``name`` in the profile ``queue_type``; None when that profile has none."""
    return next((q for q in queues.topology(queue_type).all_queues if q.name == name), None)


#: Arguments a holding queue keeps of its queue's: the type and the dead-lettering, not the TTL,
#: priorities or delivery limit. A task published into it meanwhile (it takes its queue's
#: binding) expires or is rejected as it would in its queue; a moved one has no expiration.
_HOLDING_KEEPS = ("x-queue-type", "x-dead-letter-exchange", "x-dead-letter-routing-key", "x-dead-letter-strategy",
                  "x-overflow")


def holding_arguments(queue_type: str, queue: str) -> dict[str, Any] | None:
    """Arguments of the holding queue of ``queue`` in the profile ``queue_type``; None when it has no such queue."""
    wanted = spec(queue_type, queue)
    return None if wanted is None else {k: v for k, v in wanted.arguments.items() if k in _HOLDING_KEEPS}


def _live_type(conn: Connection, name: str, holding_of: str = "") -> str:
    """The profile whose arguments the existing queue ``name`` (the holding queue of ``holding_of``) has.

    Raises MigrationError when it has neither profile's.
    """
    for queue_type in queues.QUEUE_TYPES:
        wanted = spec(queue_type, name)
        arguments = (holding_arguments(queue_type, holding_of) if holding_of
                     else dict(wanted.arguments) if wanted else None)
        if arguments is not None and accepts(conn, name, arguments):
            return queue_type
    raise MigrationError(
        f"queue {name!r} has the arguments of neither the classic nor the quorum profile (`python -m service "
        "topology verify` names the difference); fix it before migrating")


def in_order(profile: queues.Topology) -> list[tuple[str, str, str | None]]:
    """(name, kind, target type or None) of every queue, in the order the migration takes them.

    unroutable.dead first (what the task exchange cannot route lands there),
    lanes before their work queues (which fill them), and last the other
    profile's lanes, emptied into work queues that are already of the target type.
    """
    dead = profile.dead_letter_queues
    ordered = ([q for q in dead if q.name == queues.UNROUTABLE_QUEUE]
               + [q for q in dead if q.name != queues.UNROUTABLE_QUEUE]
               + list(profile.lanes) + list(profile.work_queues) + list(profile.wait_queues))
    result: list[tuple[str, str, str | None]] = [(q.name, q.kind, profile.queue_type) for q in ordered]
    for other in queues.QUEUE_TYPES:
        if other != profile.queue_type:
            result += [(q.name, "lane", None) for q in queues.topology(other).lanes
                       if all(q.name != name for name, _, _ in result)]
    return result


def profile_of(target: str) -> queues.Topology:
    """The profile ``target`` names; MigrationError naming the profiles for another."""
    try:
        return queues.topology(target)
    except ValueError as exc:
        raise MigrationError(str(exc)) from None


def _another_migration_runs(conn: Connection) -> bool:
    channel = conn.channel()
    try:
        channel.queue_declare(queues.MIGRATION_LOCK_QUEUE, passive=True)
    except amqp.exceptions.ResourceLocked:
        return True  # exclusive to another connection
    except amqp.exceptions.NotFound:
        return False
    finally:
        close_quietly(channel)
    return False  # ours


def plan(conn: Connection, target: str) -> Plan:
    """What a migration to ``target`` (classic or quorum) would do, queue by queue. Changes nothing.

    Raises MigrationError when another migration runs, an exchange is missing
    or has other arguments, or a queue has the arguments of neither profile.
    """
    profile = profile_of(target)
    if _another_migration_runs(conn):
        raise MigrationError("another `topology migrate` is running on this vhost; wait for it to end (its lock "
                             "is released when it ends or its process dies)")
    # The exchanges do not change, and the migration ends with a declare that needs them as the code wants.
    exchanges = [d for d in verify(conn, profile) if d.kind == "exchange"]
    if exchanges:
        raise MigrationError("; ".join(d.describe() for d in exchanges))
    planned = []
    for name, kind, target_type in in_order(profile):
        live = counts(conn, name)
        holding = counts(conn, queues.holding_queue_name(name))
        if live is None and holding is None and target_type is None:
            continue  # a lane that is gone already
        planned.append(QueuePlan(
            name, kind, None if live is None else _live_type(conn, name), target_type,
            messages=live[0] if live else 0,
            consumers=live[1] if live else 0, held=holding[0] if holding else 0,
            holding_consumers=holding[1] if holding else 0,
            holding_type=None if holding is None else _live_type(conn, queues.holding_queue_name(name), name)))
    return Plan(target, tuple(planned))


def require_idle(current: Plan) -> None:
    """Raise MigrationError naming every queue that has consumers and would be deleted under them."""
    busy = [q for q in current.queues if q.busy]
    if busy:
        named = ", ".join(f"{q.name!r} has {q.busy}" for q in busy)
        raise MigrationError(f"cannot migrate while queues have consumers ({named}); stop the workers (and any "
                             "`dlq` command) first. Nothing was changed")
