"""Moving every message of a queue, confirmed then acked, and deleting the queue once it is empty.

A window of up to WINDOW deliveries (the consumer's prefetch) is republished
and confirmed, then acked with one ``basic.ack``: a kill loses nothing and
duplicates at most one window. A move ends when the queue reports no ready
message; every wait for a delivery has a deadline (QUIET_S, then STALL_S).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import amqp
from kombu import Connection

from service.migration.plan import MigrationError, close_quietly, counts
from service.publishing import ConfirmedChannel, Outgoing

#: Messages per confirmed window, and the consumer's prefetch: a kill duplicates at most this many.
WINDOW = 500
#: Seconds to wait for the next delivery before asking the queue whether it is empty.
QUIET_S = 0.5
#: Seconds a queue may report ready messages without delivering any before the move gives up.
STALL_S = 30.0
#: A progress line every this many messages moved.
REPORT_EVERY = 2000
#: Seconds between emptying a queue no binding feeds and checking it before it is deleted, so
#: that messages routed to it just before its binding went have arrived.
SETTLE_S = 0.2
#: How long a consumer a queue still counts may take to go before it is someone else's.
CONSUMER_GONE_S = 5.0
#: Times an emptied queue is checked (and emptied again) before its delete gives up.
DELETE_ATTEMPTS = 5


@dataclass(frozen=True)
class Step:
    """One thing the migration did, for a progress line."""

    queue: str
    text: str

    def describe(self) -> str:
        """``<queue>: <what happened>``."""
        return f"{self.queue}: {self.text}"


Route = Callable[[amqp.Message], Outgoing]


class Mover:
    """Moves messages out of queues over ``conn``, each window confirmed by ``publisher`` before it is acked."""

    def __init__(self, conn: Connection, publisher: ConfirmedChannel, report: Callable[[Step], None]) -> None:
        self.conn, self.publisher, self.report = conn, publisher, report

    def move(self, source: str, route: Route, where: str) -> int:
        """Move every message of ``source``, those that arrive meanwhile too, as ``route`` says; the count moved.

        ``where`` ("into default.migrating") is for the progress lines. Done when
        the queue reports no ready message with no consumer of ours on it (a
        basic.cancel returns only after the deliveries sent before it). Raises
        MigrationError when the queue reports messages it does not deliver for
        STALL_S (another consumer has them), the publisher's errors when the
        broker refuses or does not confirm; what is not acked stays in ``source``.
        """
        moved = 0
        last_progress = time.monotonic()
        while True:
            left = counts(self.conn, source)
            if left is None or left[0] == 0:
                return moved
            if time.monotonic() - last_progress > STALL_S:
                raise MigrationError(
                    f"queue {source!r} reports {left[0]} message(s) but delivered none for {STALL_S:g}s "
                    f"({left[1]} consumer(s)); nothing is lost: stop its consumers and run the migration again")
            round_moved = self._round(source, route, where, moved)
            if round_moved:
                moved += round_moved
                last_progress = time.monotonic()

    def _round(self, source: str, route: Route, where: str, before: int) -> int:
        """Consume ``source`` until it reports no ready message or nothing comes for QUIET_S; the count moved."""
        channel = self.conn.channel()
        channel.auto_decode = False  # bodies stay bytes, exactly as stored
        channel.basic_qos(0, WINDOW, False)
        received: list[amqp.Message] = []
        moved = 0
        try:
            tag = channel.basic_consume(source, no_ack=False, callback=received.append)
            while self._collect(channel, received):
                forwarded = self._forward(channel, received, route)
                moved += forwarded
                if (before + moved) // REPORT_EVERY > (before + moved - forwarded) // REPORT_EVERY:
                    self.report(Step(source, f"{before + moved} moved {where} so far"))
                left = counts(self.conn, source)
                if left is None or left[0] == 0:
                    break
            channel.basic_cancel(tag)  # the deliveries sent before it are in ``received`` now
            return moved + self._forward(channel, received, route)
        finally:
            close_quietly(channel)  # requeues whatever is not acked

    def _forward(self, channel: Any, received: list[amqp.Message], route: Route) -> int:
        """Publish ``received`` as ``route`` says, wait for the confirms, then ack them all; the count."""
        if not received:
            return 0
        count = len(received)
        self.publisher.publish_many([route(m) for m in received], window=count)
        channel.basic_ack(received[-1].delivery_tag, multiple=True)
        received.clear()
        return count

    @staticmethod
    def _collect(channel: Any, received: list[amqp.Message]) -> bool:
        """Wait up to QUIET_S for deliveries, then only for a short pause or a full window; False if none came."""
        end = time.monotonic() + QUIET_S
        while len(received) < WINDOW and (left := end - time.monotonic()) > 0:
            try:
                channel.connection.drain_events(timeout=min(left, 0.05) if received else left)
            except TimeoutError:
                if received:
                    break
        return bool(received)

    @staticmethod
    def settle() -> None:
        """Wait SETTLE_S, for messages routed to a queue just before its binding went to reach it."""
        time.sleep(SETTLE_S)

    def _counts_once_own_consumer_gone(self, name: str) -> tuple[int, int] | None:
        """``counts`` of ``name``, after waiting up to CONSUMER_GONE_S for a consumer to go.

        A quorum queue counts a consumer for a moment after its cancel (seen on a
        loaded machine): the move's own consumer, just cancelled, is not another one.
        """
        deadline = time.monotonic() + CONSUMER_GONE_S
        while True:
            left = counts(self.conn, name)
            if left is None or not left[1] or time.monotonic() >= deadline:
                return left
            time.sleep(0.1)

    def delete_empty(self, name: str, queue_type: str, route: Route, where: str) -> None:
        """Delete queue ``name``, which no binding feeds any more (``settle`` was called since), once it is empty.

        What still reached it is moved as ``route`` says first. Quorum queues
        refuse queue.delete's if-empty and if-unused flags (540, which closes
        the connection), so for them a check just before is the guard.
        """
        for attempt in range(DELETE_ATTEMPTS):
            if attempt:
                self.settle()
            late = self.move(name, route, where)
            if late:
                self.report(Step(name, f"{late} more moved {where} (they arrived during the move)"))
            left = self._counts_once_own_consumer_gone(name)
            if left is None:
                return
            if left[1]:
                raise MigrationError(f"queue {name!r} has {left[1]} consumer(s) again; nothing is lost: stop its "
                                     "consumers and run the migration again")
            if left[0]:
                continue
            channel = self.conn.channel()
            try:
                if queue_type == "quorum":
                    channel.queue_delete(name)
                else:
                    channel.queue_delete(name, if_unused=True, if_empty=True)
                return
            except amqp.exceptions.PreconditionFailed:
                continue  # a message or a consumer came in between: look again
            finally:
                close_quietly(channel)
        raise MigrationError(f"queue {name!r} keeps getting messages or consumers, though no binding feeds it; "
                             "nothing is lost: stop what uses it and run the migration again")
