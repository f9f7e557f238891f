"""Confirmed, mandatory publishing over one reused connection.

``ConfirmedChannel`` is what both the thin client and the worker use to put a
message on the broker. A ``publish`` returns only once RabbitMQ confirmed the
message; an unroutable message (no queue bound) is returned by the broker and
raises PublishError instead of vanishing. A dropped connection is reopened
within the publish deadline; a message whose confirm never arrived is sent
again, so a publish is at-least-once. A message the broker nacks or returns
(as a quorum queue does while it elects a leader) is sent again, on a fresh
channel, until the deadline; one still returned then raises PublishError,
one still nacked BrokerUnavailable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import amqp
from kombu import Connection

from service.connection import open_connection
from service.errors import BrokerRefused, BrokerUnavailable, PublishError
from service.settings import Settings, redact_url

# Failures after which the connection is thrown away and opened again.
_CONNECTION_ERRORS = (
    OSError,  # includes socket.timeout, ConnectionError
    amqp.exceptions.ConnectionError,
    amqp.exceptions.RecoverableConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.IrrecoverableChannelError,
)


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: body and properties as AMQP wants them."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]


#: AMQP properties a republished message keeps. Not ``user_id`` (RabbitMQ refuses a
#: message whose user_id is not the publishing user) and not ``expiration``.
REPUBLISHED_PROPERTIES = (
    "content_type", "content_encoding", "priority", "correlation_id", "reply_to",
    "message_id", "timestamp", "type", "app_id",
)


def republished_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """The properties to republish a delivered message with: kept ones, made persistent."""
    kept = {k: v for k, v in properties.items() if k in REPUBLISHED_PROPERTIES and v is not None}
    kept["delivery_mode"] = 2
    return kept


class _Nacked(Exception):
    """The broker refused (basic.nack) or returned (basic.return) some messages of a window: not queued."""

    def __init__(self, refused: list[Outgoing], why: str, returned: bool = False) -> None:
        super().__init__(why)
        self.refused = refused
        self.returned = returned  # returned unroutable, not nacked


class ConfirmedChannel:
    """A connection plus a channel in confirm mode, reopened when it breaks.

    Thread-safe: publishes are serialised by a lock. Not fork-safe by itself:
    the client keeps one per process.
    """

    def __init__(self, settings: Settings, *, deadline_s: float | None = None) -> None:
        self._settings = settings
        self._deadline_s = deadline_s if deadline_s is not None else settings.publish_timeout
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._channel: amqp.Channel | None = None
        self._returned: list[tuple[Any, ...]] = []
        self._next_tag = 1
        self._event_channel: amqp.Channel | None = None
        self._events_broken = False

    # -- connection management -------------------------------------------------

    def _open(self, remaining: float) -> amqp.Channel:
        if self._channel is not None:
            return self._channel
        # One attempt per node (the last good one first): the publish loop retries within
        # its own deadline. A refused login, a missing vhost or TLS raises BrokerRefused.
        conn = open_connection(self._settings, min(self._settings.connect_timeout, max(remaining, 0.1)),
                               heartbeat=0)
        channel = conn.channel()
        channel.confirm_select()
        channel.events["basic_return"].add(self._on_return)
        self._conn, self._channel = conn, channel
        self._next_tag = 1  # RabbitMQ numbers confirms per channel from 1
        return channel

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        headers = getattr(message, "headers", None) or {}
        self._returned.append(
            (getattr(exc, "reply_code", 312), getattr(exc, "reply_text", str(exc)), exchange, routing_key,
             (exchange, routing_key, bytes(getattr(message, "body", b"") or b""), headers.get("id")))
        )

    def _returned_of(self, batch: list[Outgoing]) -> tuple[list[Outgoing], str]:
        """The messages of ``batch`` the broker returned unroutable, and why (in words)."""
        if not self._returned:
            return [], ""
        keys = [r[4] for r in self._returned]
        returned = []
        for message in batch:
            key = (message.exchange, message.routing_key, bytes(message.body), (message.headers or {}).get("id"))
            if key in keys:
                keys.remove(key)
                returned.append(message)
        code, text, exchange, routing_key, _ = self._returned[0]
        why = (f"the broker returned {len(self._returned)} message(s) unroutable (exchange {exchange!r}, routing "
               f"key {routing_key!r}: {code} {text}): their queue does not exist (run `python -m service topology "
               "verify`) or, on a cluster, has no leader yet")
        return returned or list(batch), why

    def _drop(self) -> None:
        self._event_channel = None
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.collect()
            except Exception:  # noqa: BLE001 - the socket may be gone already
                pass

    def close(self) -> None:
        """Close the connection; the next publish opens a new one."""
        with self._lock:
            self._event_channel = None
            conn, self._conn, self._channel = self._conn, None, None
            if conn is not None:
                try:
                    conn.release()
                except Exception:  # noqa: BLE001
                    pass

    # -- publishing --------------------------------------------------------------

    def publish_events(self, events: Iterable[Outgoing]) -> None:
        """Best effort, unconfirmed: publish monitoring events (Celery's task-sent).

        Uses its own channel on the same connection, so confirms of task
        messages are not mixed with them. Never raises: events are telemetry.
        """
        if self._events_broken:
            return
        with self._lock:
            try:
                if self._channel is None:
                    return
                if self._event_channel is None:
                    channel = self._conn.channel()
                    for name in {e.exchange for e in events}:
                        # Passive: the publisher user may not declare (configure) anything;
                        # workers and the broker's definitions create the event exchange.
                        channel.exchange_declare(name, "topic", durable=True, auto_delete=False, passive=True)
                    self._event_channel = channel
                for event in events:
                    self._event_channel.basic_publish(
                        amqp.Message(event.body, application_headers=event.headers, **event.properties),
                        event.exchange, event.routing_key,
                    )
            except amqp.exceptions.PreconditionFailed:
                self._events_broken = True  # an incompatible event exchange: stop trying
                self._event_channel = None
            except Exception:  # noqa: BLE001 - telemetry must never fail a publish
                self._event_channel = None

    def publish(self, message: Outgoing) -> None:
        """Publish one message and wait for the broker's confirm.

        Raises BrokerUnavailable when the broker cannot be reached or does not
        confirm within the deadline, PublishError when it refuses the message.
        """
        self.publish_many((message,))

    def publish_many(self, messages: Iterable[Outgoing], *, window: int = 256) -> int:
        """Publish messages in windows, waiting for all confirms of each window.

        Returns the number published. On a broken connection the unconfirmed
        window is sent again on a new connection (at-least-once).
        """
        count = 0
        batch: list[Outgoing] = []
        with self._lock:
            for message in messages:
                batch.append(message)
                if len(batch) >= window:
                    self._publish_window(batch)
                    count += len(batch)
                    batch = []
            if batch:
                self._publish_window(batch)
                count += len(batch)
        return count

    def _publish_window(self, batch: list[Outgoing]) -> None:
        deadline = time.monotonic() + self._deadline_s
        last_error: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if isinstance(last_error, _Nacked) and last_error.returned:
                    raise PublishError(f"{last_error} (for {self._deadline_s:g}s). Nothing of it is queued.")
                raise BrokerUnavailable(
                    f"the broker at {redact_url(self._settings.broker_url)} did not accept "
                    f"{len(batch)} message(s) within {self._deadline_s:g}s: {last_error}. "
                    "None of them is confirmed; check that RabbitMQ runs (a quorum queue needs a majority of its "
                    "nodes) and is not in a memory "
                    "or disk alarm, then publish again."
                ) from None
            try:
                channel = self._open(remaining)
                self._send_and_confirm(channel, batch, remaining)
                return
            except _Nacked as exc:
                # Not queued (a quorum queue between leaders, a node going down, a broker short of
                # resources): publish exactly those again, on a fresh channel, until the deadline.
                last_error = exc
                batch = exc.refused
                self._drop()
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
            except (PublishError, BrokerRefused):
                raise  # refused by the broker (_open sorts out what cannot heal): retrying cannot help
            except amqp.exceptions.AccessRefused as exc:
                self._drop()  # a permission, not a transient failure
                raise PublishError(
                    f"the broker refused access to {redact_url(self._settings.broker_url)}: {exc}. "
                    "Check the user and password of KIT_BROKER_URL and that user's permissions "
                    "(`python -m service broker`)."
                ) from None
            except amqp.exceptions.NotFound as exc:
                self._drop()
                raise PublishError(
                    f"the broker has no such exchange ({exc}); run `python -m service topology declare`"
                ) from None
            except _CONNECTION_ERRORS as exc:
                last_error = exc
                self._drop()
                # Back off a little so a broker that refuses connections is not hammered.
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))

    def _send_and_confirm(self, channel: amqp.Channel, batch: list[Outgoing], timeout: float) -> None:
        """Publish ``batch`` and wait for its confirms; _Nacked with the messages that were not queued."""
        self._returned.clear()
        nacked: list[Outgoing] = []
        if len(batch) == 1:
            try:
                self._basic_publish(channel, batch[0], confirm_timeout=timeout)
            except amqp.exceptions.MessageNacked:
                nacked = list(batch)
            finally:
                self._next_tag += 1
        else:
            nacked = self._publish_window_and_wait(channel, batch, timeout)
        returned, why = self._returned_of(batch)
        refused = nacked + [m for m in returned if all(m is not n for n in nacked)]
        if refused:
            raise _Nacked(refused, why or f"the broker refused (nack) {len(nacked)} message(s): not queued",
                          returned=bool(returned) and not nacked)

    def _publish_window_and_wait(self, channel: amqp.Channel, batch: list[Outgoing],
                                 timeout: float) -> list[Outgoing]:
        """Publish a window and wait for every confirm; the messages the broker nacked."""
        first_tag = self._next_tag
        last_tag = first_tag + len(batch) - 1
        confirmed: set[int] = set()
        nacked: list[int] = []

        def record(tag: int, multiple: bool, refused: bool) -> None:
            tags = range(first_tag, tag + 1) if multiple else (tag,)
            for t in tags:
                if first_tag <= t <= last_tag and t not in confirmed:
                    confirmed.add(t)
                    if refused:
                        nacked.append(t)

        # py-amqp drains incoming frames inside basic_publish too, so confirms can
        # arrive at any point: listen on the channel's events, not in one wait().
        def on_ack(tag: int, multiple: bool) -> None:
            record(tag, multiple, refused=False)

        def on_nack(tag: int, multiple: bool) -> None:
            record(tag, multiple, refused=True)

        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)
        try:
            for message in batch:
                self._basic_publish(channel, message)
                self._next_tag += 1
            end = time.monotonic() + timeout
            while len(confirmed) < len(batch):
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no confirm from the broker in time")
                channel.connection.drain_events(timeout=left)
        finally:
            channel.events["basic_ack"].discard(on_ack)
            channel.events["basic_nack"].discard(on_nack)
        return [batch[tag - first_tag] for tag in sorted(nacked)]

    @staticmethod
    def _basic_publish(channel: amqp.Channel, message: Outgoing, confirm_timeout: float | None = None) -> None:
        msg = amqp.Message(message.body, application_headers=message.headers, **message.properties)
        if confirm_timeout is None:
            channel.basic_publish(msg, message.exchange, message.routing_key, mandatory=True)
        else:
            channel.basic_publish_confirm(
                msg, message.exchange, message.routing_key, mandatory=True, confirm_timeout=confirm_timeout
            )
