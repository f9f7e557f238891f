"""Celery's task-sent events for the asyncio client: unconfirmed, batched, off the caller's path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq

from service.aio.wire import Properties
from service.publishing import Outgoing
from service.task_message import EVENT_EXCHANGE, sent_event, sent_event_fields

__all__ = ["SentEvents"]

#: Events per message at most (the sync client's batches are as big: service.publishing.events).
EVENTS_PER_MESSAGE = 100
#: Events waiting beyond this are dropped: telemetry must not grow without bound.
MAX_PENDING = 10_000
#: Seconds without events after the event channel failed (e.g. no event exchange yet).
PAUSE_S = 1.0


class SentEvents:
    """Sends the task-sent event of each confirmed task on its own channel of the publisher's connection.

    ``add`` never blocks and never raises; one background task sends what has
    piled up. Without a connection at that moment, or while the event exchange
    is missing, events are dropped (like the sync client's).
    """

    def __init__(self, connection: Callable[[], aio_pika.abc.AbstractConnection | None], timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self._pending: list[tuple[str, Outgoing]] = []
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._channel_conn: Any = None
        self._task: asyncio.Task | None = None
        self._paused_until = 0.0
        self._broken = False

    def add(self, task_id: str, message: Outgoing) -> None:
        """Queue the event of a confirmed task (built later, in the background)."""
        if self._broken:
            return
        if len(self._pending) < MAX_PENDING:
            self._pending.append((task_id, message))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def wait(self) -> None:
        """Until what was added so far is sent or dropped (tests)."""
        if self._task is not None:
            await asyncio.wait([self._task], timeout=self._timeout + 1)

    def cancel(self) -> tuple[Any, ...]:
        """Stop sending; returns what must stay referenced until the connection is closed."""
        if self._task is not None:
            self._task.cancel()
        kept, self._channel, self._pending = (self._channel, self._task), None, []
        return kept

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            if loop.time() < self._paused_until:
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    underlay = await self._open()
                    for start in range(0, len(batch) if underlay is not None else 0, EVENTS_PER_MESSAGE):
                        # A JSON list of events per message, as Celery's own buffered events: one broker
                        # message for up to EVENTS_PER_MESSAGE tasks (Flower and the exporter read both).
                        chunk = batch[start:start + EVENTS_PER_MESSAGE]
                        template = sent_event(*chunk[0])
                        body = json.dumps([sent_event_fields(task_id, message) for task_id, message in chunk])
                        await underlay.basic_publish(
                            body.encode(), exchange=template.exchange, routing_key=template.routing_key,
                            properties=Properties(headers=template.headers, **template.properties))
            except aiormq.exceptions.ChannelPreconditionFailed:
                self._broken = True  # an incompatible event exchange: stop trying
            except Exception:  # noqa: BLE001 - telemetry must never fail a publish
                self._channel, self._paused_until = None, loop.time() + PAUSE_S

    async def _open(self) -> Any:
        conn = self._connection()
        if conn is None or conn.is_closed:
            return None
        if self._channel is None or self._channel.is_closed or self._channel_conn is not conn:
            self._channel = None
            channel = conn.channel(publisher_confirms=False)
            await channel.initialize()
            # Passive: the publisher user may not declare anything; workers create the event exchange.
            await (await channel.get_underlay_channel()).exchange_declare(
                exchange=EVENT_EXCHANGE, exchange_type="topic", durable=True, passive=True)
            self._channel, self._channel_conn = channel, conn
        return await self._channel.get_underlay_channel()
