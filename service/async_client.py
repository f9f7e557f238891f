"""The asyncio publishing client: ``await apublish(...)`` from a web app's event loop.

The same tasks, validation, message, routing, priorities, countdown and errors
as ``service.client.publish``, on aio-pika: nothing here blocks the loop, and
every wait (connecting, each confirm, closing) has a deadline::

    from service.client import apublish
    task_id = await apublish("emails.send", kwargs={"to": "a@example.com"}, priority="high")

An ``AsyncPublisher`` keeps one connection and one confirm-mode channel, opened
on first use and reopened after it drops. Concurrent publishes share them:
each awaits only its own confirm, so many are in flight at once. A message the
broker nacks or returns (not queued) is sent again until KIT_PUBLISH_TIMEOUT.
A publisher belongs to the event loop it first published on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aio_pika
import aiormq

from service import queues
from service.aio.connect import CLOSE_TIMEOUT_S, NoAnswer, connect, reply_text, ssl_context
from service.aio.events import SentEvents
from service.aio.wire import Properties
from service.errors import BrokerRefused, BrokerUnavailable, KitError, PublishError
from service.monitoring import sentry
from service.publishing import Outgoing
from service.settings import Settings, load, redact_url
from service.status.marks import QueuedMarker
from service.task_message import TaskRequest, build_message

__all__ = ["AsyncPublisher", "aclose_default", "apublish"]

#: A channel is replaced after a nack or return at most this often (each replacement is a new connection).
_REFRESH_INTERVAL_S = 1.0


class AsyncPublisher:
    """A reusable asyncio publisher: one connection, one confirm channel, many publishes in flight.

    Open on first use, reopened after it drops; fork-safe (a child opens its
    own). Close it with ``await close()`` or ``async with``.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings or load()
        self._profile = queues.topology(self._settings.queue_type)
        sentry.init("client", self._settings)  # once per process; never over the host app's own init
        self._ssl = ssl_context(self._settings.broker_ssl) if self._settings.broker_ssl else None
        self._marker = QueuedMarker(self._settings)  # marks each confirmed task "queued" (status)
        self._reset(None)

    def _reset(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._pid, self._loop = os.getpid(), loop
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._opened_at = 0.0
        self._opening: asyncio.Task | None = None
        self._closing: dict[asyncio.Task, aio_pika.abc.AbstractConnection] = {}
        self._events = SentEvents(lambda: self._conn, self._settings.connect_timeout)

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            self._reset(loop)  # a forked child: the parent's connection is not ours to use or close
        elif self._loop is not loop:
            if self._conn is not None and self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("this AsyncPublisher belongs to another event loop; create one per loop "
                                   "(apublish does)")
            self._reset(loop)
        return loop

    # -- publishing ----------------------------------------------------------------

    async def publish(
        self, name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
        priority: str | int = queues.DEFAULT_PRIORITY, queue: str | None = None,
        countdown: float | None = None, task_id: str | None = None,
    ) -> str:
        """Publish one task and return its id once the broker confirmed it.

        Raises InvalidTaskInput (nothing sent), BrokerUnavailable, BrokerRefused or PublishError.
        """
        task_id, message = self._build(TaskRequest(name, args, kwargs, priority, queue, countdown, task_id))
        await self._send(message)
        self._confirmed(task_id, message)
        return task_id

    async def publish_many(self, requests: Iterable[TaskRequest], *, window: int = 512) -> list[str]:
        """Publish many tasks concurrently (``window`` in flight); their ids once all are confirmed.

        Every request is validated before the first is sent, so bad input sends
        nothing. When some fail, the others are still awaited, then the first
        failure is raised, saying how many were not confirmed.
        """
        built = [self._build(r) for r in requests]
        gate = asyncio.Semaphore(window)

        async def one(task_id: str, message: Outgoing) -> None:
            async with gate:
                await self._send(message)
            self._confirmed(task_id, message)

        results = await asyncio.gather(*(one(t, m) for t, m in built), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            first = errors[0]
            if not isinstance(first, KitError):
                raise first
            raise type(first)(f"{len(errors)} of {len(built)} task(s) not confirmed; the first: {first}") from None
        return [task_id for task_id, _ in built]

    def _build(self, request: TaskRequest) -> tuple[str, Outgoing]:
        return build_message(request, self._settings.max_payload_bytes, self._settings.longest_wait, self._profile)

    async def _send(self, message: Outgoing) -> None:
        """Publish one message until confirmed or KIT_PUBLISH_TIMEOUT; a nack or return sends it again."""
        loop = self._bind()
        deadline = loop.time() + self._settings.publish_timeout
        properties = Properties(headers=message.headers, **message.properties)
        last: BaseException | None = None
        while loop.time() < deadline:
            channel, pause = None, 0.0
            try:
                async with asyncio.timeout_at(deadline):
                    channel = await self._confirm_channel(loop, deadline)
                    underlay = await channel.get_underlay_channel()
                    await underlay.basic_publish(message.body, exchange=message.exchange,
                                                 routing_key=message.routing_key, properties=properties,
                                                 mandatory=True)
                return
            except TimeoutError:
                last = TimeoutError("no confirm from the broker in time") if channel else last or NoAnswer()
            except (aiormq.exceptions.DeliveryError, aiormq.exceptions.PublishError) as exc:
                # Not queued (returned unroutable, or nacked: a quorum queue between leaders, a broker
                # short of resources): exactly this message again, on a fresh channel at most once a second.
                last, pause = exc, 0.1
                if loop.time() - self._opened_at > _REFRESH_INTERVAL_S:
                    self._drop(channel, later=True)  # the others in flight on it still get their confirms
            except BrokerRefused:
                raise
            except (aiormq.exceptions.ChannelNotFoundEntity, aiormq.exceptions.ChannelAccessRefused) as exc:
                self._drop(channel)
                if f"'{message.exchange}'" in reply_text(exc):  # this message's exchange, not another's on the channel
                    raise _refused(exc) from None
                last, pause = exc, 0.1
            except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
                last, pause = exc, 0.2  # a little backoff: a broker refusing connections is not hammered
                self._drop(channel)
            await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
        raise self._gave_up(last)

    def _gave_up(self, last: BaseException | None) -> KitError:
        timeout = self._settings.publish_timeout
        if isinstance(last, aiormq.exceptions.PublishError):
            frame = last.frame
            return PublishError(
                f"the broker returned 1 message(s) unroutable (exchange {frame.exchange!r}, routing key "
                f"{frame.routing_key!r}: {frame.reply_code} {frame.reply_text}): their queue does not exist (run "
                f"`python -m service topology verify`) or, on a cluster, has no leader yet (for {timeout:g}s). "
                "Nothing of it is queued.")
        why = ("the broker refused (nack) 1 message(s): not queued" if isinstance(last, aiormq.exceptions.DeliveryError)
               else reply_text(last) if last else "no answer from the broker in time")
        return BrokerUnavailable(
            f"the broker at {redact_url(self._settings.broker_url)} did not accept 1 message(s) within "
            f"{timeout:g}s: {why}. None of them is confirmed; check that RabbitMQ runs (a quorum queue needs a "
            "majority of its nodes) and is not in a memory or disk alarm, then publish again.")

    def _confirmed(self, task_id: str, message: Outgoing) -> None:
        self._marker.add(task_id, message.headers["task"])
        if self._settings.send_sent_events:
            self._events.add(task_id, message)

    # -- the connection ------------------------------------------------------------

    async def _confirm_channel(self, loop: asyncio.AbstractEventLoop, deadline: float) -> aio_pika.abc.AbstractChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        if self._opening is None or self._opening.done():  # one attempt at a time, shared by every waiter
            self._opening = loop.create_task(self._open(loop, deadline))
            self._opening.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._opening)

    async def _open(self, loop: asyncio.AbstractEventLoop, deadline: float) -> aio_pika.abc.AbstractChannel:
        self._drop(self._channel)
        end = loop.time() + min(self._settings.connect_timeout, max(deadline - loop.time(), 0.1))
        conn = await connect(self._settings, self._ssl, end)
        try:
            async with asyncio.timeout_at(max(end, loop.time() + 0.5)):
                channel = conn.channel(publisher_confirms=True, on_return_raises=True)
                await channel.initialize()
        except BaseException as exc:
            self._close_later(conn, 0)
            if isinstance(exc, TimeoutError):
                raise NoAnswer("the broker did not open a channel in time") from None
            raise
        self._conn, self._channel, self._opened_at = conn, channel, loop.time()
        return channel

    def _drop(self, channel: aio_pika.abc.AbstractChannel | None, *, later: bool = False) -> None:
        """Stop using ``channel``'s connection (if still the current one); close it now or once its confirms are in."""
        if channel is None or channel is not self._channel:
            return
        conn, channel, self._conn, self._channel = self._conn, self._channel, None, None
        if conn is not None:
            self._close_later(conn, self._settings.publish_timeout if later else 0, channel)

    def _close_later(self, conn: aio_pika.abc.AbstractConnection, delay: float, channels: object = None) -> None:
        async def close() -> None:
            nonlocal channels  # kept until the connection is closed (see close())
            try:
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
                channels = None

        task = asyncio.get_running_loop().create_task(close())
        self._closing[task] = conn
        task.add_done_callback(lambda t: self._closing.pop(t, None))

    async def close(self) -> None:
        """Close the connection (within a few seconds at most); the next publish opens a new one."""
        if self._pid != os.getpid() or self._loop is not asyncio.get_running_loop():
            self._reset(None)  # another process's or loop's connection: not ours to close
            return
        # The channels stay referenced until their connection is closed: one collected before
        # schedules aio-pika's close callback on a loop that may be gone by then.
        channels = (self._channel, self._events.cancel())
        conns = [c for c in (self._conn, *self._closing.values()) if c is not None]
        tasks = [t for t in (self._opening, *self._closing) if t is not None]
        for task in tasks:
            task.cancel()  # a delayed close is done here, at once (a task cancelled unstarted runs nothing)
        self._reset(self._loop)
        closes = [asyncio.wait_for(c.close(), CLOSE_TIMEOUT_S) for c in conns]
        await asyncio.gather(*closes, return_exceptions=True)
        del channels
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _refused(exc: BaseException) -> PublishError:
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return PublishError(f"the broker refused access: {reply_text(exc)}. Check the user of KIT_BROKER_URL "
                            "and its permissions (`python -m service broker`).")
    return PublishError(f"the broker has no such exchange ({reply_text(exc)}); run `python -m service topology "
                        "declare`")


_defaults: dict[int, tuple[weakref.ref[asyncio.AbstractEventLoop], AsyncPublisher]] = {}
_defaults_pid = 0
_defaults_lock = threading.Lock()


def _default() -> AsyncPublisher:
    """This process's and this event loop's AsyncPublisher (a forked child or a new loop gets its own)."""
    global _defaults_pid
    loop = asyncio.get_running_loop()
    with _defaults_lock:
        if _defaults_pid != os.getpid():
            _defaults.clear()
            _defaults_pid = os.getpid()
        entry = _defaults.get(id(loop))
        if entry is not None and entry[0]() is loop:
            return entry[1]
        for key, (ref, _) in list(_defaults.items()):
            if (old := ref()) is None or old.is_closed():
                del _defaults[key]
        publisher = AsyncPublisher()
        _defaults[id(loop)] = (weakref.ref(loop), publisher)
        return publisher


async def apublish(
    name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
    priority: str | int = queues.DEFAULT_PRIORITY, queue: str | None = None,
    countdown: float | None = None, task_id: str | None = None,
) -> str:
    """``publish`` for asyncio: the task's id once the broker confirmed it, never blocking the loop.

    Uses a publisher per process and event loop, configured from the environment.
    """
    return await _default().publish(name, args, kwargs, priority=priority, queue=queue, countdown=countdown,
                                    task_id=task_id)


async def aclose_default() -> None:
    """Close this event loop's default publisher (``apublish``'s), e.g. at a web app's shutdown."""
    with _defaults_lock:
        entry = _defaults.pop(id(asyncio.get_running_loop()), None)
    if entry is not None:
        await entry[1].close()
