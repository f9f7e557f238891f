"""Declare the topology of ``service.queues`` on a broker, and find drift.

Declaring is idempotent. RabbitMQ cannot change the arguments of an existing
queue, nor the ``alternate-exchange`` of an existing exchange: it answers
PRECONDITION_FAILED, which is turned here into a TopologyConflict that names
the queue or exchange, the argument, both values and the fix.
A user without the rights to declare gets a BrokerRefused naming the right.
``connect`` (from service.connection) opens the connection these work on;
``declare_on(settings)`` connects, declares and closes in one call.

Each function works on one profile of ``service.queues.topology`` (KIT_QUEUE_TYPE:
classic or quorum; default classic). A queue of the other type is drift whose
fix is ``python -m service topology migrate``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

import amqp
from kombu import Connection

from service import queues
from service.connection import connect, permission_refused
from service.errors import KitError
from service.settings import Settings

__all__ = [
    "Drift", "TopologyConflict", "connect", "declare", "declare_on", "exchange_fix", "missing", "type_fix", "verify",
]

#: What a declare needs: configure on the exchange or queue declared.
_DECLARE_RIGHTS = {"exchange": "configure", "queue": "configure"}
#: What a binding needs: write on the queue, read on the exchange.
_BIND_RIGHTS = {"queue": "write", "exchange": "read"}
#: Creating an exchange with an alternate exchange also needs (RabbitMQ 3.10, checked when it is
#: created, not when an existing one is declared again) read on it and write on the alternate one.
_ALTERNATE_RIGHTS = {"exchange": "write"}
#: The fix when a worker may not declare: least privilege means the broker's definitions hold the topology.
_DECLARE_ADVICE = (
    "Workers that run as a least-privilege user (kit-worker) need KIT_DECLARE_TOPOLOGY=false: the topology "
    "then comes from the broker's definitions (`python -m service broker provision`, or `python -m service "
    "topology declare` run as the kit's admin). Otherwise grant the user configure rights on the kit's "
    "exchanges and queues (rabbitmqctl set_permissions)."
)

# RabbitMQ's wording, e.g. "PRECONDITION_FAILED - inequivalent arg 'x-max-priority'
# for queue 'default' in vhost '/': received '3' but current is '10'"; a side that
# is unset reads "none", and some versions say "the value '3' of type 'long'".
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'"
    r".*?received (?:(?:the value )?'(?P<wanted>[^']*)'|(?P<wanted_none>none))"
    r".*?current is (?:(?:the value )?'(?P<live>[^']*)'|(?P<live_none>none))"
)


@dataclass(frozen=True)
class Drift:
    """One difference between the live broker and the code."""

    kind: str  # "exchange" or "queue"
    name: str
    problem: str  # "missing" or "arguments"
    argument: str = ""
    live: str = ""
    wanted: str = ""
    vhost: str = ""  # where it was found, for the fix (empty: unknown)

    def describe(self) -> str:
        """One line for humans."""
        if self.problem == "missing":
            return f"{self.kind} {self.name!r} is missing (run `python -m service topology declare`)"
        if self.argument == "x-queue-type":
            return type_fix(self)
        text = f"{self.kind} {self.name!r}: {self.argument} is {self.live} on the broker, the code wants {self.wanted}"
        if self.kind == "exchange":
            text += f". {exchange_fix(self.name, self.vhost)}"
        return text


def _type_name(value: str) -> str:
    return "classic" if value in ("unset", "classic") else value


def type_fix(drift: Drift) -> str:
    """What to do about a queue of the other type than KIT_QUEUE_TYPE's profile (RabbitMQ cannot convert one)."""
    live, wanted = _type_name(drift.live), _type_name(drift.wanted)
    return (
        f"queue {drift.name!r} is a {live} queue on the broker, but KIT_QUEUE_TYPE={wanted} wants a {wanted} "
        f"queue. RabbitMQ cannot change a queue's type: move the whole topology with its messages by `python -m "
        f"service topology migrate --to {wanted} --dry-run`, then without --dry-run (stop the workers first), "
        f"or set KIT_QUEUE_TYPE={live} if the broker is right"
    )


class TopologyConflict(KitError):
    """A live queue or exchange was declared with other arguments than the code wants."""

    def __init__(self, drift: Drift) -> None:
        self.drift = drift
        if drift.argument == "x-queue-type":
            super().__init__(type_fix(drift) + ".")
            return
        super().__init__(
            f"{drift.kind} {drift.name!r} already exists on the broker with "
            f"{drift.argument}={drift.live}, but service/queues.py wants "
            f"{drift.argument}={drift.wanted}. RabbitMQ cannot change a {drift.kind}'s "
            f"arguments in place. To fix it: stop the workers of this {drift.kind}, move "
            f"or drain its messages, delete it (rabbitmqctl delete_{drift.kind} "
            f"{drift.name} -p <vhost>; queues only, exchanges via the management UI), "
            "then run `python -m service topology declare`."
        )


def exchange_fix(name: str, vhost: str = "") -> str:
    """How to replace an exchange declared with other arguments (it holds no messages, its queues do)."""
    shown = vhost or "<vhost>"
    path = quote(vhost, safe="") if vhost else "<vhost>"
    return (
        f"RabbitMQ cannot change an exchange's arguments in place, and every declare of {name!r} with the kit's "
        "arguments fails until they match. An exchange holds no messages (its queues do): delete it and declare "
        f"it again at once, as the kit's admin: `rabbitmqadmin -V {shown} delete exchange name={name} && python -m "
        f"service topology declare` (or DELETE /api/exchanges/{path}/{name} on the management API). "
        "`topology declare` creates it with the right arguments and binds its queues again; they keep their "
        f"messages. In between, publishes to {name!r} fail (the kit's client raises, nothing is queued) and "
        "RabbitMQ drops what a queue dead-letters into it (for tasks: retries whose wait ends), so run it while "
        "the tasks.wait.* queues are empty"
    )


def _exchange_conflict(drift: Drift) -> TopologyConflict:
    """TopologyConflict for an exchange, whose fix is not a queue's (no messages to drain)."""
    conflict = TopologyConflict(drift)
    conflict.args = (
        f"exchange {drift.name!r} already exists on the broker with {drift.argument}={drift.live}, but "
        f"service/queues.py wants {drift.argument}={drift.wanted}. {exchange_fix(drift.name, drift.vhost)}.",
    )
    return conflict


def _conflict_from(error: amqp.exceptions.PreconditionFailed, kind: str, name: str, vhost: str = "") -> Drift:
    text = str(error)
    match = _INEQUIVALENT.search(text)
    if not match:
        return Drift(kind, name, "arguments", "?", text, "as in service/queues.py", vhost=vhost)
    return Drift(
        kind,
        name,
        "arguments",
        argument=match["arg"],
        live="unset" if match["live_none"] else match["live"],
        wanted="unset" if match["wanted_none"] else match["wanted"],
        vhost=vhost,
    )


def _of_other_type(conn: Connection, name: str, profile: queues.Topology) -> str | None:
    """The other profile's queue type when queue ``name`` matches that profile exactly, else None.

    RabbitMQ names only the first argument that differs, which for a queue of
    the other type is seldom ``x-queue-type``; this declare (the queue exists,
    so it only compares) tells a queue of the wrong type from one with a
    wrong argument.
    """
    for queue_type in queues.QUEUE_TYPES:
        if queue_type == profile.queue_type:
            continue
        twin = next((q for q in queues.topology(queue_type).all_queues if q.name == name), None)
        if twin is None:
            continue
        channel = conn.channel()
        try:
            _declare_queue(channel, twin)
            return queue_type
        except amqp.exceptions.PreconditionFailed:
            continue
        finally:
            _close_quietly(channel)
    return None


def _queue_drift(conn: Connection, error: amqp.exceptions.PreconditionFailed, queue: queues.Queue,
                 profile: queues.Topology) -> Drift:
    """The Drift a PRECONDITION_FAILED on ``queue`` means: its type, or the argument RabbitMQ named."""
    other = _of_other_type(conn, queue.name, profile)
    if other is not None:
        return Drift("queue", queue.name, "arguments", "x-queue-type", live=other, wanted=profile.queue_type,
                     vhost=_vhost(conn))
    return _conflict_from(error, "queue", queue.name)


def _vhost(conn: Connection) -> str:
    return str(getattr(conn, "virtual_host", "") or "")


def _declare_exchange(channel, exchange: queues.Exchange, passive: bool = False) -> None:
    channel.exchange_declare(
        exchange.name,
        exchange.type,
        durable=True,
        auto_delete=False,
        arguments=dict(exchange.arguments),
        passive=passive,
    )


def _declare_queue(channel, queue: queues.Queue, passive: bool = False) -> None:
    channel.queue_declare(
        queue.name,
        durable=True,
        exclusive=False,
        auto_delete=False,
        arguments=dict(queue.arguments),
        passive=passive,
    )


def declare(conn: Connection, profile: queues.Topology | None = None) -> None:
    """Declare every exchange, queue and binding of ``profile`` (default: classic). Safe to run any number of times.

    Raises TopologyConflict when a live queue or exchange has other arguments
    (or is of the other queue type), BrokerRefused when the user may not
    declare (403: it lacks configure rights).
    """
    profile = profile or queues.topology()
    channel = conn.channel()
    try:
        for exchange in queues.EXCHANGE_DEFINITIONS:
            try:
                _declare_exchange(channel, exchange)
            except amqp.exceptions.PreconditionFailed as exc:
                raise _exchange_conflict(_conflict_from(exc, "exchange", exchange.name, _vhost(conn))) from None
            except amqp.exceptions.AccessRefused as exc:
                alternate = exchange.arguments.get("alternate-exchange")
                if alternate and f"exchange '{alternate}'" in str(exc):
                    raise permission_refused(
                        exc, f"creating exchange {exchange.name!r} with alternate-exchange {alternate!r}",
                        _ALTERNATE_RIGHTS, _DECLARE_ADVICE,
                    ) from None
                if alternate:
                    raise permission_refused(
                        exc, f"declaring the topology (creating {exchange.name!r} with its alternate exchange "
                        "also needs read on it)", _DECLARE_RIGHTS, _DECLARE_ADVICE,
                    ) from None
                raise
        for queue in profile.all_queues:
            try:
                _declare_queue(channel, queue)
            except amqp.exceptions.PreconditionFailed as exc:
                _close_quietly(channel)
                raise TopologyConflict(_queue_drift(conn, exc, queue, profile)) from None
            try:
                channel.queue_bind(
                    queue.name,
                    queue.exchange,
                    routing_key=queue.binding_key,
                    arguments=dict(queue.binding_arguments),
                )
            except amqp.exceptions.AccessRefused as exc:
                raise permission_refused(exc, "declaring the topology", _BIND_RIGHTS, _DECLARE_ADVICE) from None
    except amqp.exceptions.AccessRefused as exc:
        raise permission_refused(exc, "declaring the topology", _DECLARE_RIGHTS, _DECLARE_ADVICE) from None
    finally:
        _close_quietly(channel)


def declare_on(settings: Settings) -> None:
    """Connect with ``settings``, declare the whole topology of its KIT_QUEUE_TYPE (``declare``) and close."""
    conn = connect(settings)
    try:
        declare(conn, queues.topology(settings.queue_type))
    finally:
        conn.release()


def verify(conn: Connection, profile: queues.Topology | None = None) -> list[Drift]:
    """Compare the live broker with ``profile`` (default: classic), creating nothing.

    Returns the differences found (empty when the broker matches); a queue of
    the other type is a Drift of argument ``x-queue-type``. A channel error
    closes the channel, so each check gets a fresh one.
    """
    profile = profile or queues.topology()
    drift: list[Drift] = []
    checks: list[tuple[str, str, object]] = [("exchange", x.name, x) for x in queues.EXCHANGE_DEFINITIONS]
    checks += [("queue", q.name, q) for q in profile.all_queues]
    for kind, name, spec in checks:
        channel = conn.channel()
        try:
            if kind == "exchange":
                _declare_exchange(channel, spec, passive=True)
                # The exchange exists: a non-passive declare now only compares
                # (type, durability and alternate-exchange).
                _declare_exchange(channel, spec)
            else:
                _declare_queue(channel, spec, passive=True)
                _declare_queue(channel, spec)
        except amqp.exceptions.NotFound:
            drift.append(Drift(kind, name, "missing"))
        except amqp.exceptions.PreconditionFailed as exc:
            if kind == "queue":
                drift.append(_queue_drift(conn, exc, spec, profile))
            else:
                drift.append(_conflict_from(exc, kind, name, _vhost(conn)))
        except amqp.exceptions.AccessRefused as exc:
            # RabbitMQ wants configure rights even for a declare that changes nothing.
            raise permission_refused(
                exc, "`topology verify` (it compares arguments by declaring)", _DECLARE_RIGHTS,
                "Run it as a user with configure rights, such as the kit's admin.",
            ) from None
        finally:
            _close_quietly(channel)
    return drift


def missing(conn: Connection, names: Iterable[str] | None = None,
            profile: queues.Topology | None = None) -> list[Drift]:
    """The exchanges and queues of ``profile`` (default: classic) that do not exist, by passive declares only.

    Needs no right at all, so a least-privilege worker can run it. ``names``
    limits the queues checked (default: every queue); every exchange is checked.
    """
    profile = profile or queues.topology()
    wanted = {q.name for q in profile.all_queues} if names is None else set(names)
    checks: list[tuple[str, str, object]] = [("exchange", x.name, x) for x in queues.EXCHANGE_DEFINITIONS]
    checks += [("queue", q.name, q) for q in profile.all_queues if q.name in wanted]
    absent: list[Drift] = []
    for kind, name, spec in checks:
        channel = conn.channel()
        try:
            if kind == "exchange":
                _declare_exchange(channel, spec, passive=True)
            else:
                _declare_queue(channel, spec, passive=True)
        except amqp.exceptions.NotFound:
            absent.append(Drift(kind, name, "missing"))
        finally:
            _close_quietly(channel)
    return absent


def _close_quietly(channel) -> None:
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - the channel may already be closed by the broker
        pass
