"""Declare the topology of ``service.queues`` on a broker, and find drift.

Declaring is idempotent. RabbitMQ cannot change the arguments of an existing
queue: it answers PRECONDITION_FAILED, which is turned here into a
TopologyConflict that names the queue, the argument, both values and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import amqp
from kombu import Connection

from service import queues
from service.errors import BrokerUnavailable, TopologyConflict
from service.settings import Settings, redact_url

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

    def describe(self) -> str:
        """One line for humans."""
        if self.problem == "missing":
            return f"{self.kind} {self.name!r} is missing (run `python -m service topology declare`)"
        return (
            f"{self.kind} {self.name!r}: {self.argument} is {self.live} on the broker, "
            f"the code wants {self.wanted}"
        )


def connect(settings: Settings) -> Connection:
    """Open a kombu connection to the broker, or raise BrokerUnavailable."""
    conn = Connection(settings.broker_url, connect_timeout=settings.connect_timeout, ssl=settings.broker_ssl or False)
    try:
        conn.connect()
    except Exception as exc:  # noqa: BLE001 - every failure here means "broker not reachable"
        conn.release()
        raise BrokerUnavailable(
            f"cannot connect to the broker at {redact_url(settings.broker_url)}: {exc}. "
            "Check that RabbitMQ runs and KIT_BROKER_URL (host, port, vhost, user) is right."
        ) from None
    return conn


def _conflict_from(error: amqp.exceptions.PreconditionFailed, kind: str, name: str) -> Drift:
    text = str(error)
    match = _INEQUIVALENT.search(text)
    if not match:
        return Drift(kind, name, "arguments", "?", text, "as in service/queues.py")
    return Drift(
        kind,
        name,
        "arguments",
        argument=match["arg"],
        live="unset" if match["live_none"] else match["live"],
        wanted="unset" if match["wanted_none"] else match["wanted"],
    )


def _declare_exchange(channel, name: str, kind: str, passive: bool = False) -> None:
    channel.exchange_declare(name, kind, durable=True, auto_delete=False, passive=passive)


def _declare_queue(channel, queue: queues.Queue, passive: bool = False) -> None:
    channel.queue_declare(
        queue.name,
        durable=True,
        exclusive=False,
        auto_delete=False,
        arguments=dict(queue.arguments),
        passive=passive,
    )


def declare(conn: Connection) -> None:
    """Declare every exchange, queue and binding. Safe to run any number of times.

    Raises TopologyConflict when a live queue or exchange has other arguments.
    """
    channel = conn.channel()
    try:
        for name, kind in queues.EXCHANGES.items():
            try:
                _declare_exchange(channel, name, kind)
            except amqp.exceptions.PreconditionFailed as exc:
                raise TopologyConflict(_conflict_from(exc, "exchange", name)) from None
        for queue in queues.ALL_QUEUES:
            try:
                _declare_queue(channel, queue)
            except amqp.exceptions.PreconditionFailed as exc:
                raise TopologyConflict(_conflict_from(exc, "queue", queue.name)) from None
            channel.queue_bind(
                queue.name,
                queue.exchange,
                routing_key=queue.binding_key,
                arguments=dict(queue.binding_arguments),
            )
    finally:
        _close_quietly(channel)


def verify(conn: Connection) -> list[Drift]:
    """Compare the live broker with the code, creating nothing.

    Returns the differences found (empty when the broker matches). A channel
    error closes the channel, so each check gets a fresh one.
    """
    drift: list[Drift] = []
    checks = [("exchange", name, kind) for name, kind in queues.EXCHANGES.items()]
    checks += [("queue", q.name, q) for q in queues.ALL_QUEUES]
    for kind, name, spec in checks:
        channel = conn.channel()
        try:
            if kind == "exchange":
                _declare_exchange(channel, name, spec, passive=True)
                # The exchange exists: a non-passive declare now only compares.
                _declare_exchange(channel, name, spec)
            else:
                _declare_queue(channel, spec, passive=True)
                _declare_queue(channel, spec)
        except amqp.exceptions.NotFound:
            drift.append(Drift(kind, name, "missing"))
        except amqp.exceptions.PreconditionFailed as exc:
            drift.append(_conflict_from(exc, kind, name))
        finally:
            _close_quietly(channel)
    return drift


def _close_quietly(channel) -> None:
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - the channel may already be closed by the broker
        pass
