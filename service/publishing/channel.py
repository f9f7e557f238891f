"""Confirmed, mandatory publishing over one reused connection, shared by many threads.

``ConfirmedChannel`` is what the thin client, the worker and the tools use to
put a message on the broker. A ``publish`` returns only once RabbitMQ confirmed
that message; an unroutable message (no queue bound) is returned by the broker
and raises PublishError instead of vanishing.

Many threads may publish at once: each writes its message (a short lock) and
then waits for its own confirm while the others write theirs, so their confirms
overlap on the one channel instead of queueing behind each other. One waiting
thread at a time reads the broker's answers for everybody (the "drainer"); the
others sleep until their message is settled or the drainer's turn passes to them.

What a caller gets back is about its own messages only:

- a dropped connection is reopened within the publish deadline and the
  messages whose confirm never arrived are sent again (at-least-once);
- a message the broker nacks or returns (as a quorum queue does while it elects
  a leader) is sent again, on a fresh connection, until the deadline; one still
  returned then raises PublishError, one still nacked or unconfirmed BrokerUnavailable;
- a message to an exchange that does not exist, or that the user may not write
  to, raises PublishError at once.

Fork-safe: a process forked from one that used the channel opens its own
connection and never touches its parent's socket.

Why this module is over 400 lines (about 430): opening and dropping the
connection, writing, and the drainer's reading all follow one lock discipline
(the io lock, then the book lock) and one rule of who may touch the socket;
they are one class so that discipline can be read, and checked, in one place.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import amqp
from kombu import Connection

from service.connection import open_connection
from service.errors import BrokerRefused, BrokerUnavailable, PublishError
from service.publishing import transport
from service.publishing.inflight import ACKED, LOST, NACKED, RETURNED, Inflight, Pending, Waiter, return_key
from service.publishing.message import Outgoing
from service.settings import Settings, redact_url

# Failures after which the connection is thrown away and opened again.
_CONNECTION_ERRORS = (
    OSError,  # includes socket.timeout, ConnectionError
    amqp.exceptions.ConnectionError,
    amqp.exceptions.RecoverableConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.IrrecoverableChannelError,
)
#: Longest a drainer waits for the socket before it looks again at the connection and its deadline.
_DRAIN_SLICE_S = 0.05
#: Longest a read of a frame the socket already announced may take (the rest of a partial frame).
_FRAME_READ_S = 1.0
#: Longest a waiting thread sleeps before it looks again whether it should drain.
_WAIT_SLICE_S = 0.2
#: Pause before a nacked or returned message is sent again (a quorum queue electing a leader).
_REFUSED_PAUSE_S = 0.1
#: A connection whose messages are refused is replaced once it is older than this (seconds).
_REFRESH_AFTER_S = 1.0
#: Pause before a connection that failed is opened again, so a broker that refuses is not hammered.
_RECONNECT_PAUSE_S = 0.2
#: The exchange a channel error names ("NOT_FOUND - no exchange 'x' ...", "access to exchange 'x' ... refused").
_EXCHANGE_IN_ERROR = re.compile(r"exchange '([^']*)'")


class ConfirmedChannel:
    """A connection plus a channel in confirm mode, reopened when it breaks, shared by many threads.

    ``publish`` and ``publish_many`` may be called from any number of threads at
    once; each returns once the broker confirmed its own messages, or raises.
    """

    def __init__(self, settings: Settings, *, deadline_s: float | None = None) -> None:
        self._settings = settings
        self._deadline_s = deadline_s if deadline_s is not None else settings.publish_timeout
        self._reset_state()

    def _reset_state(self) -> None:
        self._pid = os.getpid()
        self._io = threading.Lock()  # every write and read on the connection
        self._book = threading.Lock()  # the in-flight book, and who drains
        self._inflight = Inflight()
        self._draining = False
        self._waiting: set[Waiter] = set()  # callers asleep until settled or their turn to drain
        self._conn: Connection | None = None
        self._amqp: amqp.Connection | None = None  # the py-amqp connection under kombu's (never kombu's property)
        self._channel: amqp.Channel | None = None
        self._event_channel: amqp.Channel | None = None
        self._events_off = False  # until the next connection: the event exchange is missing
        self._events_broken = False  # for good: an incompatible event exchange
        self._generation = 0  # bumped on every new connection
        self._opened_at = 0.0

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connection (closing only this process's descriptor)."""
        if self._pid == os.getpid():
            return
        transport_conn = self._amqp
        self._reset_state()
        sock = transport.socket_of(transport_conn)
        if sock is not None:
            try:
                descriptor = sock.detach()  # the socket object no longer owns it: nothing closes it twice
                if descriptor >= 0:
                    os.close(descriptor)
            except OSError:
                pass

    # -- connection management (the io lock held) ------------------------------------

    def _open_locked(self, remaining: float) -> None:
        if self._channel is not None:
            return
        # One attempt per node (the last good one first): the publish loop retries within
        # its own deadline. A refused login, a missing vhost or TLS raises BrokerRefused.
        conn = open_connection(self._settings, min(self._settings.connect_timeout, max(remaining, 0.1)),
                               heartbeat=0)
        try:
            transport_conn = conn.connection
            channel = conn.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            transport.no_reads_while_publishing(transport_conn)
        except BaseException:
            transport.close_quietly(conn)
            raise
        self._conn, self._amqp, self._channel = conn, transport_conn, channel
        self._opened_at = time.monotonic()
        self._generation += 1
        self._events_off = False

    def _drop_locked(self, why: str, error: BaseException | None = None) -> None:
        """Throw the connection away; every message still in flight on it is lost (its caller resends it)."""
        conn, transport_conn = self._conn, self._amqp
        self._conn, self._amqp, self._channel, self._event_channel = None, None, None, None
        with self._book:
            self._inflight.lose_all(why, error)
        if conn is not None:
            sock = transport.socket_of(transport_conn)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a drainer waiting on it
                except OSError:
                    pass
            transport.close_quietly(conn)

    def close(self) -> None:
        """Close the connection; the next publish opens a new one."""
        self._after_fork()
        with self._io:
            conn = self._conn
            self._conn, self._amqp, self._channel, self._event_channel = None, None, None, None
            with self._book:
                self._inflight.lose_all("the publisher was closed")
            if conn is not None:
                try:
                    conn.release()
                except Exception:  # noqa: BLE001 - the socket may be gone already
                    pass

    # -- broker answers (called while a thread drains, the io lock held) ---------------

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, nacked=False)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, nacked=True)

    def _settle(self, tag: int, multiple: bool, nacked: bool) -> None:
        with self._book:
            self._inflight.settle(tag, multiple, nacked)

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        headers = getattr(message, "headers", None) or {}
        code, text = getattr(exc, "reply_code", 312), getattr(exc, "reply_text", str(exc))
        why = (f"the broker returned it unroutable (exchange {exchange!r}, routing key {routing_key!r}: {code} "
               f"{text}): its queue does not exist (run `python -m service topology verify`) or, on a cluster, "
               "has no leader yet")
        key = return_key(exchange, routing_key, headers.get("id"), getattr(message, "body", b"") or b"")
        with self._book:
            self._inflight.returned(key, why)

    # -- publishing -----------------------------------------------------------------------

    def publish(self, message: Outgoing) -> None:
        """Publish one message and wait for the broker's confirm.

        Raises BrokerUnavailable when the broker cannot be reached or does not
        confirm within the deadline, PublishError when it refuses the message.
        """
        self._deliver([message])

    def publish_many(self, messages: Iterable[Outgoing], *, window: int = 256) -> int:
        """Publish messages a window at a time, each window's confirms awaited together.

        Returns the number published. Messages whose confirm never came (a
        broken connection) are sent again (at-least-once).
        """
        count = 0
        batch: list[Outgoing] = []
        for message in messages:
            batch.append(message)
            if len(batch) >= window:
                self._deliver(batch)
                count, batch = count + len(batch), []
        if batch:
            self._deliver(batch)
            count += len(batch)
        return count

    def publish_events(self, events: Iterable[Outgoing]) -> None:
        """Best effort, unconfirmed: publish monitoring events (Celery's task-sent) if connected. Never raises."""
        self._after_fork()
        with self._io:
            if self._conn is None:
                return
            events = list(events)
            try:
                channel = self._event_channel_locked(events)
                with transport.one_write(self._amqp):
                    self._write_events_locked(channel, events)
            except Exception as exc:  # noqa: BLE001 - the send itself failed: the next publish reconnects
                self._drop_locked(f"the connection broke: {exc}", exc)

    def _deliver(self, messages: list[Outgoing]) -> None:
        self._after_fork()
        deadline = time.monotonic() + self._deadline_s
        todo, last_error = list(messages), None
        waiter = Waiter()
        while todo:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._deadline_error(todo, last_error)
            generation = None
            try:
                with self._io:
                    self._open_locked(remaining)
                    generation = self._generation
                    with transport.one_write(self._amqp):  # a window leaves in one send
                        entries = self._write_locked(todo, waiter)
            except (PublishError, BrokerRefused):
                raise  # refused by the broker (open_connection sorts out what cannot heal)
            except _CONNECTION_ERRORS as exc:
                last_error = exc
                with self._io:
                    if generation is None or generation == self._generation:
                        self._drop_locked(f"the connection broke: {exc}", exc)
                _pause(_RECONNECT_PAUSE_S, deadline)
                continue
            if not self._await(waiter, deadline):
                last_error = TimeoutError("no confirm from the broker in time")
                with self._io:
                    if generation == self._generation:
                        self._drop_locked("an earlier message got no confirm in time")
                raise self._deadline_error(todo, last_error)
            todo, refused = [], False
            for entry in entries:
                if entry.outcome == ACKED:
                    continue
                if entry.outcome == LOST and entry.error is not None:
                    self._raise_if_refused(entry)
                todo.append(entry.message)
                last_error = _Unsettled(entry)
                refused = refused or entry.outcome in (NACKED, RETURNED)
            if refused:
                # A channel that saw its queue's leader go keeps being refused on RabbitMQ 3.10: send
                # again on a fresh connection (at most once a second; others in flight on it are resent).
                with self._io:
                    if generation == self._generation and time.monotonic() - self._opened_at > _REFRESH_AFTER_S:
                        self._drop_locked("the broker refused messages on this channel: opening a fresh one")
                _pause(_REFUSED_PAUSE_S, deadline)

    def _write_locked(self, messages: list[Outgoing], waiter: Waiter) -> list[Pending]:
        channel = self._channel
        entries = []
        for message in messages:
            with self._book:
                entry = self._inflight.add(message, waiter)  # before the write: its ack may come at once
            entries.append(entry)
            msg = amqp.Message(message.body, application_headers=message.headers, **message.properties)
            channel.basic_publish(msg, message.exchange, message.routing_key, mandatory=True)
        return entries

    def _event_channel_locked(self, events: list[Outgoing]) -> amqp.Channel | None:
        """The channel events go out on (opened on first use), or None when events are off."""
        if not events or self._events_broken or self._events_off:
            return None
        if self._event_channel is not None:
            return self._event_channel
        try:
            # Its own channel, so event frames never mix with the confirms of task messages.
            channel = self._conn.channel()
            for name in {e.exchange for e in events}:
                # Passive: the publisher user may not declare (configure) anything;
                # workers and the broker's definitions create the event exchange.
                channel.exchange_declare(name, "topic", durable=True, auto_delete=False, passive=True)
        except amqp.exceptions.ChannelError as exc:
            named = _EXCHANGE_IN_ERROR.search(str(getattr(exc, "reply_text", "") or exc))
            if named is None or named.group(1) not in {e.exchange for e in events}:
                # The task channel's close, read while waiting for the event channel: its messages are lost.
                self._drop_locked(f"the channel closed: {exc}", exc)
            elif isinstance(exc, amqp.exceptions.PreconditionFailed):
                self._events_broken = True  # an incompatible event exchange
            else:
                self._events_off = True  # no event exchange yet: look again on the next connection
            return None
        except Exception:  # noqa: BLE001 - telemetry must never fail a publish
            return None
        self._event_channel = channel
        return channel

    def _write_events_locked(self, channel: amqp.Channel | None, events: list[Outgoing]) -> None:
        """Best effort, unconfirmed: write the events on their channel."""
        if channel is None or channel is not self._event_channel:
            return
        try:
            for event in events:
                channel.basic_publish(
                    amqp.Message(event.body, application_headers=event.headers, **event.properties),
                    event.exchange, event.routing_key,
                )
        except Exception:  # noqa: BLE001 - telemetry must never fail a publish
            self._event_channel = None

    # -- waiting for the broker ------------------------------------------------------------

    def _await(self, waiter: Waiter, deadline: float) -> bool:
        """Wait until every message of ``waiter`` is settled (True) or the deadline passed (False).

        A caller that finds nobody reading becomes the drainer and reads the
        broker's answers for everybody until its own messages are settled, then
        wakes one caller still waiting to take over. The others sleep on their
        own event: a confirm wakes only the caller it is for.
        """
        while True:
            with self._book:
                if waiter.unsettled == 0:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiting.discard(waiter)
                    return False
                drain = not self._draining
                if drain:
                    self._draining = True
                    self._waiting.discard(waiter)
                else:
                    waiter.event.clear()
                    self._waiting.add(waiter)
            if not drain:
                waiter.event.wait(min(left, _WAIT_SLICE_S))
                continue
            try:
                while waiter.unsettled and time.monotonic() < deadline:
                    self._drain_once(max(0.0, min(deadline - time.monotonic(), _DRAIN_SLICE_S)))
            finally:
                with self._book:
                    self._draining = False
                    successor = next((w for w in self._waiting if w.unsettled), None)
                    if successor is not None:
                        successor.event.set()  # its turn to drain

    def _drain_once(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the broker to say something, then read all it sent."""
        transport_conn, generation = self._amqp, self._generation  # a stale pair is caught under the lock below
        sock = transport.socket_of(transport_conn)
        if sock is None:
            time.sleep(min(wait_s, 0.01))  # dropped: its entries are settled as lost
            return
        if not transport.readable(sock, wait_s):  # the io lock is free meanwhile: others write
            return
        with self._io:
            if generation != self._generation or self._amqp is None:
                return
            try:
                # One method (with its content); more waiting is read on the next pass without waiting.
                self._amqp.drain_events(timeout=_FRAME_READ_S)
            except TimeoutError:
                pass
            except _CONNECTION_ERRORS as exc:
                self._drop_locked(f"the connection broke: {exc}", exc)

    # -- errors ----------------------------------------------------------------------------

    def _raise_if_refused(self, entry: Pending) -> None:
        """A channel closed for this message's exchange (missing, or not writable): PublishError."""
        error = entry.error
        if not isinstance(error, (amqp.exceptions.NotFound, amqp.exceptions.AccessRefused)):
            return
        named = _EXCHANGE_IN_ERROR.search(str(getattr(error, "reply_text", "") or error))
        if named is not None and named.group(1) != entry.message.exchange:
            return  # another caller's exchange: this message is only sent again
        if isinstance(error, amqp.exceptions.AccessRefused):
            raise PublishError(
                f"the broker refused access to {redact_url(self._settings.broker_url)}: {error}. "
                "Check the user and password of KIT_BROKER_URL and that user's permissions "
                "(`python -m service broker`)."
            ) from None
        raise PublishError(
            f"the broker has no such exchange ({error}); run `python -m service topology declare`"
        ) from None

    def _deadline_error(self, todo: list[Outgoing], last_error: BaseException | None) -> Exception:
        if isinstance(last_error, _Unsettled) and last_error.outcome == RETURNED:
            return PublishError(f"{last_error} (for {self._deadline_s:g}s). Nothing of it is queued.")
        return BrokerUnavailable(
            f"the broker at {redact_url(self._settings.broker_url)} did not accept "
            f"{len(todo)} message(s) within {self._deadline_s:g}s: {last_error}. "
            "None of them is confirmed; check that RabbitMQ runs (a quorum queue needs a majority of its "
            "nodes) and is not in a memory or disk alarm, then publish again."
        )


class _Unsettled(Exception):
    """Why the last attempt at a message did not get it queued (nack, return or a lost connection)."""

    def __init__(self, entry: Pending) -> None:
        super().__init__(entry.detail)
        self.outcome = entry.outcome


def _pause(seconds: float, deadline: float) -> None:
    time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))
