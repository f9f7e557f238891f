"""Confirmed, mandatory publishing over one reused connection, shared by many threads.

``ConfirmedChannel`` is what the thin client, the worker and the tools use to
put a message on the broker. A ``publish`` returns only once RabbitMQ confirmed
that message; an unroutable message (no queue bound) is returned by the broker
and raises PublishError instead of vanishing.

Many threads may publish at once, and their confirms overlap on the one
channel instead of queueing behind each other. A caller puts its messages in
the outbox and takes whichever turn is free: the writer's (it sends every
batch waiting in the outbox in one send, so under load one thread writes for
many) or the drainer's (it reads the broker's answers for everybody). The
others sleep until their own messages are settled or a turn passes to them.
Writers hold the io lock; on plain TCP the drainer reads beside them, on TLS
under the same lock.

What a caller gets back is about its own messages only:

- a dropped connection is reopened within the publish deadline and the
  messages whose confirm never arrived are sent again (at-least-once);
- a message the broker nacks or returns (as a quorum queue does while it elects
  a leader) is sent again, on a fresh connection, until the deadline; one still
  returned then raises PublishError, one still nacked or unconfirmed BrokerUnavailable;
- a message to an exchange that does not exist, or that the user may not write
  to, raises PublishError at once, and so does one py-amqp cannot encode (a
  priority over 255, a header value it has no type for), for that caller only.

Fork-safe: a process forked from one that used the channel opens its own
connection and never touches its parent's socket.

Why this module is over 400 lines (about 520): opening and dropping the
connection, writing, and the drainer's reading all follow one lock discipline
(the io lock, then the book lock) and one rule of who may touch the socket;
they are one class so that discipline can be read, and checked, in one place;
the book-keeping itself (tags, outcomes, waiters) is ``inflight``, the socket tricks ``transport``.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
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
#: Longest a waiting thread sleeps before it looks again whether it should drain.
_WAIT_SLICE_S = 0.2
#: Pause before a nacked or returned message is sent again (a quorum queue electing a leader).
_REFUSED_PAUSE_S = 0.1
#: A connection whose messages are refused is replaced once it is older than this (seconds).
_REFRESH_AFTER_S = 1.0
#: Pause before a connection that failed is opened again, so a broker that refuses is not hammered.
_RECONNECT_PAUSE_S = 0.2
#: What py-amqp raises for a message it cannot encode (before writing any of it).
_UNENCODABLE = (struct.error, ValueError, TypeError, amqp.exceptions.FrameSyntaxError)
#: The exchange a channel error names ("NOT_FOUND - no exchange 'x' ...", "access to exchange 'x' ... refused").
_EXCHANGE_IN_ERROR = re.compile(r"exchange '([^']*)'")


class ConfirmedChannel:
    """A connection plus a channel in confirm mode, reopened when it breaks, shared by many threads.

    ``publish`` and ``publish_many`` may be called from any number of threads at
    once; each returns once the broker confirmed its own messages, or raises.
    """

    def __init__(self, settings: Settings, *, deadline_s: float | None = None,
                 event_exchange: str | None = None) -> None:
        self._settings = settings
        self._deadline_s = deadline_s if deadline_s is not None else settings.publish_timeout
        self._event_exchange = event_exchange  # where ``publish_events`` sends (looked up on each connection)
        self._reset_state()

    def _reset_state(self) -> None:
        self._pid = os.getpid()
        self._io = threading.Lock()  # every write and read on the connection
        self._book = threading.Lock()  # the in-flight book, and who drains
        self._inflight = Inflight()
        self._draining = False
        self._waiting: set[Waiter] = set()  # callers asleep until settled or their turn to drain or write
        self._outbox: list[_Batch] = []  # batches waiting for the writer
        self._writing = False
        self._conn: Connection | None = None
        self._amqp: amqp.Connection | None = None  # the py-amqp connection under kombu's (never kombu's property)
        self._channel: amqp.Channel | None = None
        self._event_channel: amqp.Channel | None = None  # None: events are off on this connection
        self._generation = 0  # bumped on every new connection
        self._current: tuple[amqp.Connection | None, int] = (None, 0)  # what the drainer reads, set at once
        self._opened_at = 0.0
        self._read_under_io = False

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

    # -- connection management (called with the io lock held) -------------------------

    def _open_locked(self, remaining: float) -> None:
        if self._channel is not None:
            return
        # One attempt per node (the last good one first): the publish loop retries within
        # its own deadline. A refused login, a missing vhost or TLS raises BrokerRefused.
        conn = open_connection(self._settings, min(self._settings.connect_timeout, max(remaining, 0.1)),
                               heartbeat=0)
        try:
            transport_conn = conn.connection
            sock = transport.socket_of(transport_conn)
            sock.settimeout(min(self._settings.connect_timeout, max(remaining, 0.1)))  # the set-up's RPCs
            book = Inflight()  # this connection's own: a late answer on an old one never settles a new entry
            channel = conn.channel()
            channel.confirm_select()
            channel.auto_decode = False  # a returned body is compared as the bytes that were sent
            channel.events["basic_ack"].add(functools.partial(self._settle, book, nacked=False))
            channel.events["basic_nack"].add(functools.partial(self._settle, book, nacked=True))
            channel.events["basic_return"].add(functools.partial(self._on_return, book))
            transport.no_revive(channel)
            event_channel = self._open_event_channel(conn)  # the last call that reads: before the drainer may
            transport.no_reads_while_publishing(transport_conn)
            transport.read_ahead(transport_conn)
            # A write or a read that takes longer than a whole publish may is a dead connection, not a wait.
            sock.settimeout(max(self._deadline_s, 1.0))
        except BaseException:
            transport.close_quietly(conn)
            raise
        with self._book:
            self._inflight = book
        self._conn, self._amqp, self._channel, self._event_channel = conn, transport_conn, channel, event_channel
        # TLS: OpenSSL forbids reading and writing one connection from two threads at once.
        self._read_under_io = hasattr(sock, "pending")
        self._opened_at = time.monotonic()
        self._generation += 1
        self._current = (transport_conn, self._generation)

    def _open_event_channel(self, conn: Connection) -> amqp.Channel | None:
        """The channel events go out on, when there is an event exchange to send to (else events are off).

        Its own channel, so event frames never mix with the confirms of task
        messages. The exchange is declared passively: the publisher user may not
        declare (configure) anything; workers and the broker's definitions create it.
        """
        if self._event_exchange is None:
            return None
        try:
            channel = conn.channel()
            channel.exchange_declare(self._event_exchange, "topic", durable=True, auto_delete=False, passive=True)
        except amqp.exceptions.ChannelError:
            return None  # missing or incompatible: no events on this connection (telemetry only)
        transport.no_revive(channel)
        return channel

    def _drop_locked(self, why: str, error: BaseException | None = None) -> None:
        """Throw the connection away; every message still in flight on it is lost (its caller resends it)."""
        conn, transport_conn = self._conn, self._amqp
        self._conn, self._amqp, self._channel, self._event_channel = None, None, None, None
        self._current = (None, self._generation)
        with self._book:
            self._inflight.lose_all(why, error)
        if conn is not None:
            sock = transport.socket_of(transport_conn)
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes a drainer waiting on it (TLS kept)
                except OSError:
                    pass
            transport.close_quietly(conn)
            if sock is not None:
                sock.close()  # py-amqp's own close gives up on a TLS socket it cannot unwrap

    def close(self) -> None:
        """Close the connection; the next publish opens a new one."""
        self._after_fork()
        with self._io:
            # No closing handshake: it would read the socket while a drainer may be reading it.
            self._drop_locked("the publisher was closed")

    # -- broker answers (called by the drainer, for the connection they came on) ---------

    def _settle(self, book: Inflight, tag: int, multiple: bool, *, nacked: bool) -> None:
        with self._book:
            book.settle(tag, multiple, nacked)

    def _on_return(self, book: Inflight, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        headers = getattr(message, "headers", None) or {}
        code, text = getattr(exc, "reply_code", 312), getattr(exc, "reply_text", str(exc))
        why = (f"the broker returned it unroutable (exchange {exchange!r}, routing key {routing_key!r}: {code} "
               f"{text}): its queue does not exist (run `python -m service topology verify`) or, on a cluster, "
               "has no leader yet")
        key = return_key(exchange, routing_key, headers.get("id"), getattr(message, "body", b"") or b"")
        with self._book:
            book.returned(key, why)

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
        broken connection) are sent again (at-least-once). When a window fails,
        the error raised carries ``confirmed``: how many messages before it the
        broker confirmed (they are queued).
        """
        count = 0
        batch: list[Outgoing] = []
        try:
            for message in messages:
                batch.append(message)
                if len(batch) >= window:
                    self._deliver(batch)
                    count, batch = count + len(batch), []
            if batch:
                self._deliver(batch)
                count += len(batch)
        except (PublishError, BrokerUnavailable, BrokerRefused) as exc:
            exc.confirmed = count
            raise
        return count

    def publish_events(self, events: Iterable[Outgoing]) -> None:
        """Best effort, unconfirmed: send monitoring events (Celery's task-sent) if connected. Never raises.

        Sent on the event channel of the current connection, to the exchange it
        was opened for (``event_exchange``); without one the events are dropped.
        """
        self._after_fork()
        with self._io:
            channel = self._event_channel
            if channel is None:
                return
            try:
                with transport.one_write(self._amqp):
                    for event in events:
                        channel.basic_publish(
                            amqp.Message(event.body, application_headers=event.headers, **event.properties),
                            event.exchange, event.routing_key,
                        )
            except Exception as exc:  # noqa: BLE001 - the send itself failed: the next publish reconnects
                self._drop_locked(f"the connection broke: {exc}", exc)

    def _deliver(self, messages: list[Outgoing]) -> None:
        self._after_fork()
        deadline = time.monotonic() + self._deadline_s
        todo, last_error = list(messages), None
        waiter = Waiter()
        while todo:
            if deadline - time.monotonic() <= 0:
                raise self._deadline_error(todo, last_error)
            batch = _Batch(todo, waiter)
            with self._book:
                waiter.unsettled += len(todo)
                self._outbox.append(batch)
            if not self._await(batch, deadline):
                last_error = TimeoutError("no confirm from the broker in time")
                with self._book:
                    if batch in self._outbox:  # never written: no writer may send it after we gave up
                        self._outbox.remove(batch)
                with self._io:
                    if batch.generation == self._generation:
                        self._drop_locked("an earlier message got no confirm in time")
                raise self._deadline_error(todo, last_error)
            if isinstance(batch.error, (PublishError, BrokerRefused)):
                raise batch.error  # refused by the broker (open_connection sorts out what cannot heal)
            todo, refused = [], False
            for entry in batch.entries:
                if entry.outcome == ACKED:
                    continue
                if entry.outcome == LOST and entry.error is not None:
                    self._raise_if_refused(entry)
                todo.append(entry.message)
                last_error = entry.error if batch.error is not None else _Unsettled(entry)
                refused = refused or entry.outcome in (NACKED, RETURNED)
            if batch.error is not None and todo:
                _pause(_RECONNECT_PAUSE_S, deadline)  # a broker that refuses connections is not hammered
            elif refused:
                # A channel that saw its queue's leader go keeps being refused on RabbitMQ 3.10: send
                # again on a fresh connection (at most once a second; others in flight on it are resent).
                with self._io:
                    if (batch.generation == self._generation
                            and time.monotonic() - self._opened_at > _REFRESH_AFTER_S):
                        self._drop_locked("the broker refused messages on this channel: opening a fresh one")
                _pause(_REFUSED_PAUSE_S, deadline)

    def _write_outbox(self, deadline: float) -> None:
        """As the writer: send every batch waiting in the outbox, in one send.

        Batches of callers that queued while a pass was being written go in the
        next writer's pass: the writer does one pass, so its own publish is not
        held up by other callers' work, then hands the turn on.
        """
        try:
            with self._book:
                batches, self._outbox = self._outbox, []
            if batches:
                self._write_batches(batches, deadline)
        finally:
            with self._book:
                self._writing = False
                if self._outbox or not self._draining:  # the next pass, or nobody reading what was written
                    successor = next((w for w in self._waiting if w.unsettled), None)
                    if successor is not None:
                        successor.wake()

    def _write_batches(self, batches: list[_Batch], deadline: float) -> None:
        generation = None
        try:
            with self._io:
                self._open_locked(max(deadline - time.monotonic(), 0.1))
                generation = self._generation
                with transport.one_write(self._amqp):  # every batch of this pass leaves in one send
                    for batch in batches:
                        batch.generation = generation
                        self._write_batch_locked(batch)
        except Exception as exc:  # noqa: BLE001 - each caller is told, and decides (raise, resend)
            with self._io:
                # Whatever failed after messages were registered: tags and writes no longer match.
                if generation is None or generation == self._generation:
                    self._drop_locked(f"the connection broke: {exc}", exc)
            with self._book:
                for batch in batches:
                    batch.error = batch.error or exc
                    for message in batch.messages[len(batch.entries):]:  # never written
                        entry = Pending(message, 0, batch.waiter)
                        batch.entries.append(entry)
                        entry.settle(LOST, f"not sent: {exc}", exc)

    def _write_batch_locked(self, batch: _Batch) -> None:
        """Register and write one caller's messages; one that cannot be encoded fails that caller only."""
        channel = self._channel
        for message in batch.messages:
            with self._book:
                entry = self._inflight.add(message, batch.waiter)
                batch.entries.append(entry)
            msg = amqp.Message(message.body, application_headers=message.headers, **message.properties)
            try:
                channel.basic_publish(msg, message.exchange, message.routing_key, mandatory=True)
            except _UNENCODABLE as exc:
                # py-amqp encodes a message before writing any of it: nothing of it left, so its tag is
                # given back, and the caller is told what is wrong with it.
                error = PublishError(f"the message cannot be sent as AMQP ({type(exc).__name__}: {exc}); "
                                     "check its headers and properties")
                with self._book:
                    self._inflight.withdraw(entry)
                    batch.error = error
                    entry.settle(LOST, str(error), error)

    # -- waiting for the broker ------------------------------------------------------------

    def _await(self, batch: _Batch, deadline: float) -> bool:
        """Wait until every message of ``batch`` is written and settled (True) or the deadline passed (False).

        A caller takes whichever turn is free: the writer's when batches wait
        in the outbox and nobody writes, else the drainer's when nobody reads
        (it reads the broker's answers for everybody until its own messages are
        settled, then wakes one caller still waiting to take over). The others
        sleep on their own ``Waiter``: a confirm wakes only the caller it is for.
        """
        waiter, woke = batch.waiter, False
        while True:
            with self._book:
                waiter.rearm(woke)
                woke = False
                if waiter.unsettled == 0:
                    self._waiting.discard(waiter)
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiting.discard(waiter)
                    return False
                role = "sleep"
                if self._outbox and not self._writing:
                    self._writing, role = True, "write"
                elif not self._draining and batch.generation is not None:  # written: its answers are due
                    self._draining, role = True, "drain"
                if role == "sleep":
                    self._waiting.add(waiter)
                else:
                    self._waiting.discard(waiter)
            if role == "write":
                self._write_outbox(deadline)
            elif role == "drain":
                try:
                    while waiter.unsettled and time.monotonic() < deadline:
                        self._drain_once(max(0.0, min(deadline - time.monotonic(), _DRAIN_SLICE_S)))
                finally:
                    with self._book:
                        self._draining = False
                        successor = next((w for w in self._waiting if w.unsettled), None)
                        if successor is not None:
                            successor.wake()  # its turn to drain
            else:
                woke = waiter.sleep(min(left, _WAIT_SLICE_S))

    def _drain_once(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the broker to say something, then read one method of it.

        Only the drainer reads. On plain TCP it reads without the io lock:
        writers never read (``transport.no_reads_while_publishing``), so
        writing and reading go on side by side. On TLS it reads under the lock
        (OpenSSL forbids a read beside a write). The io lock is also taken to
        drop a broken connection.
        """
        transport_conn, generation = self._current
        sock = transport.socket_of(transport_conn)
        if sock is None:
            time.sleep(min(wait_s, 0.01))  # dropped: its entries are settled as lost
            return
        if not transport.readable(sock, wait_s, transport_conn):
            return
        try:
            if self._read_under_io:
                with self._io:
                    if self._current[1] == generation:
                        transport_conn.drain_events()
            else:
                transport_conn.drain_events()  # the socket's own timeout bounds the rest of a frame
        except TimeoutError:
            pass
        except Exception as exc:  # noqa: BLE001 - sorted out below: every caller learns it through its entries
            with self._io:
                if generation != self._generation or self._amqp is None:
                    return  # an old connection's: already dropped
                events = self._event_channel
                if (isinstance(exc, amqp.exceptions.ChannelError) and events is not None and not events.is_open
                        and self._channel is not None and self._channel.is_open):
                    self._event_channel = None  # only the event channel closed (e.g. no right to write events)
                    return
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


@dataclass(eq=False)
class _Batch:
    """One caller's messages on their way: written by whichever caller is the writer, then settled.

    ``entries`` are the messages as written (or as lost, when the write failed
    with ``error``); ``generation`` is the connection they were written on.
    """

    messages: list[Outgoing]
    waiter: Waiter
    entries: list[Pending] = field(default_factory=list)
    generation: int | None = None
    error: BaseException | None = None


class _Unsettled(Exception):
    """Why the last attempt at a message did not get it queued (nack, return or a lost connection)."""

    def __init__(self, entry: Pending) -> None:
        super().__init__(entry.detail)
        self.outcome = entry.outcome


def _pause(seconds: float, deadline: float) -> None:
    time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))
