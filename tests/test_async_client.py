"""The asyncio client against a real broker: the sync client's message, confirms in flight, bounded failures.

Broker outages are simulated by two fake endpoints (a closed port, and a socket
that accepts but never answers), never by stopping the shared broker.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from service import async_client, queues
from service import headers as h
from service.async_client import AsyncPublisher
from service.client import Publisher, TaskRequest, apublish
from service.errors import BrokerRefused, BrokerUnavailable, InvalidTaskInput, PublishError
from service.settings import load
from service.status import status
from service.topology import declare_on
from tests.helpers import ADMIN_USER, AMQP_HOST, AMQP_PORT, REPO


def run(coro):
    """Run a coroutine in a fresh event loop (each test gets its own, so its own default publisher)."""
    return asyncio.run(coro)


async def _publish(*args, **kwargs) -> str:
    async with AsyncPublisher() as p:
        return await p.publish(*args, **kwargs)


def _fields(message) -> tuple:
    """What a consumer sees of a message, less its send time, message_id and an empty reply_to.

    aiormq gives every message a random message_id (it finds a returned message by
    it); pamqp never sends an empty string property (the sync client sends reply_to "").
    """
    headers = {k: v for k, v in message.headers.items() if k != h.ENQUEUED_AT}
    properties = {k: v for k, v in message.properties.items()
                  if k not in ("application_headers", "message_id") and not (k == "reply_to" and v == "")}
    body = message.body.encode() if isinstance(message.body, str) else bytes(message.body)
    return headers, properties, body, message.delivery_info["routing_key"]


@pytest.mark.parametrize("countdown", [None, 5])
def test_the_message_is_the_sync_clients(vhost, topology, countdown):
    request = {"args": [1, "two"], "kwargs": {"k": [None, 1.5]}, "priority": "high", "countdown": countdown}
    with Publisher() as p:
        p.publish("reports.export", task_id="same-id", **request)
    run(_publish("reports.export", task_id="same-id", **request))
    queue = f"{queues.TASK_EXCHANGE}.wait.8s" if countdown else "bulk"
    sync, aio = vhost.drain(queue)
    assert _fields(aio) == _fields(sync)
    assert sync.properties["reply_to"] == "" and "reply_to" not in aio.properties
    assert len(aio.properties["message_id"]) == 32 and "message_id" not in sync.properties
    assert 0 <= aio.headers[h.ENQUEUED_AT] - sync.headers[h.ENQUEUED_AT] < 2  # a double, not pamqp's 32-bit float
    assert aio.properties["delivery_mode"] == 2 and aio.properties["priority"] == queues.PRIORITIES["high"]
    if countdown:
        assert aio.headers[queues.WAIT_HEADER] == "8s" and aio.properties["expiration"] == "5000"


def test_priorities_and_queues(vhost, topology):
    async def main() -> list[str]:
        async with AsyncPublisher() as p:
            return [await p.publish("test.record", [name], priority=name) for name in queues.PRIORITIES] + [
                await p.publish("test.record", ["to bulk"], queue="bulk", priority=3)]

    ids = run(main())
    got = {m.headers["id"]: m.properties["priority"] for m in vhost.drain("default")}
    assert got == {i: queues.PRIORITIES[n] for i, n in zip(ids, queues.PRIORITIES, strict=False)}
    [bulk] = vhost.drain("bulk")
    assert bulk.headers["id"] == ids[-1] and bulk.properties["priority"] == 3


def test_the_quorum_profile_routes_high_priorities_to_the_high_lane(vhost, kit_env, monkeypatch):
    monkeypatch.setenv("KIT_QUEUE_TYPE", "quorum")
    declare_on(load())
    async def main() -> tuple[str, str]:
        async with AsyncPublisher() as p:
            return await p.publish("test.record", priority="critical"), await p.publish("test.record")

    high, normal = run(main())
    assert [m.headers["id"] for m in vhost.drain("default.high")] == [high]
    assert [m.headers["id"] for m in vhost.drain("default")] == [normal]


def test_256_concurrent_apublish_are_all_confirmed_and_queued(vhost, topology):
    async def main() -> list[str]:
        ids = await asyncio.gather(*(apublish("test.record", [n]) for n in range(256)))
        await async_client.aclose_default()
        return ids

    started = time.monotonic()
    ids = run(main())
    assert time.monotonic() - started < 10
    assert len(set(ids)) == 256
    assert sorted(m.headers["id"] for m in vhost.drain("default")) == sorted(ids)


def test_publish_many_validates_everything_first(vhost, topology):
    good = [TaskRequest("test.record", [n]) for n in range(3)]

    async def main() -> AsyncPublisher:
        p = AsyncPublisher()
        with pytest.raises(InvalidTaskInput, match="priority"):
            await p.publish_many([*good, TaskRequest("test.record", priority="urgent!")])
        with pytest.raises(InvalidTaskInput, match="JSON"):
            await p.publish("test.record", [object()])
        assert p._conn is None  # nothing was even connected
        ids = await p.publish_many(good)
        await p.close()
        return ids

    ids = run(main())
    assert [m.headers["id"] for m in vhost.drain("default")] == ids


def test_a_confirmed_publish_marks_the_task_queued(vhost, topology, result_backend):
    async def main() -> str:
        async with AsyncPublisher() as p:
            task_id = await p.publish("test.record", ["x"])
            assert await asyncio.to_thread(p._marker.flush, 5)
            return task_id

    task_id = run(main())
    found = status(task_id)
    assert (found.state, found.name) == ("queued", "test.record")


def test_the_task_sent_event_is_sent_off_the_callers_path(vhost, topology):
    conn = vhost.connection()
    channel = conn.channel()
    channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
    channel.queue_declare("events")
    channel.queue_bind("events", "celeryev", "task.#")
    conn.close()

    async def main() -> str:
        async with AsyncPublisher() as p:
            task_id = await p.publish("test.record", ["x"])
            await p._events.wait()  # the events go out in the background
            return task_id

    task_id = run(main())
    [event] = vhost.drain("events")
    assert '"task-sent"' in event.body and task_id in event.body


def test_a_dropped_connection_is_reopened(vhost, topology):
    async def main() -> None:
        async with AsyncPublisher() as p:
            await p.publish("test.record", ["before"])
            await asyncio.to_thread(vhost.drop_connections)
            await p.publish("test.record", ["after"])

    run(main())
    assert [m.headers["argsrepr"] for m in vhost.drain("default")] == ["['before']", "['after']"]


def test_an_unroutable_task_raises_publish_error_at_the_deadline(vhost, topology, monkeypatch):
    conn = vhost.connection()
    conn.channel().queue_delete("default")
    conn.channel().queue_delete(queues.UNROUTABLE_QUEUE)  # so nothing takes it: the broker returns it
    conn.close()
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "1")
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"returned 1 message\(s\) unroutable .* \(for 1s\)"):
        run(_publish("test.record", ["x"]))
    assert 1 <= time.monotonic() - started < 3


async def _channel_replaced(publisher: AsyncPublisher, publishing: asyncio.Future, timeout: float = 4) -> None:
    """Wait until ``publisher`` opened a second channel (it replaces one only after a nack or a return, at most
    once per async_client._REFRESH_INTERVAL_S) while ``publishing`` is still unconfirmed; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline, first = loop.time() + timeout, None
    while True:
        assert not publishing.done(), "confirmed before the channel was replaced"
        current = publisher._channel
        if first is None:
            first = current
        elif current is not None and current is not first:
            return
        if loop.time() > deadline:
            raise AssertionError(f"the publisher did not replace its channel within {timeout:g}s")
        await asyncio.sleep(0.01)


def test_a_returned_task_is_sent_again_until_its_queue_exists(vhost, topology, monkeypatch):
    conn = vhost.connection()
    conn.channel().queue_delete("default")
    conn.channel().queue_delete(queues.UNROUTABLE_QUEUE)
    conn.close()
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "5")

    async def main() -> list[str]:
        async with AsyncPublisher() as p:
            publishing = asyncio.gather(*(p.publish("test.record", [n]) for n in range(8)))
            # Returned for longer than a channel lives after a return: the publisher replaced its channel.
            await _channel_replaced(p, publishing)
            await asyncio.to_thread(declare_on, load())
            return await publishing

    ids = run(main())
    assert sorted(m.headers["id"] for m in vhost.drain("default")) == sorted(ids)  # each exactly once
    assert vhost.depth(queues.UNROUTABLE_QUEUE) == 0


def test_a_nacked_task_is_sent_again_until_it_fits_or_the_deadline(vhost, topology, monkeypatch):
    conn = vhost.connection()
    channel = conn.channel()
    channel.queue_delete("default")
    channel.queue_declare("default", durable=True, auto_delete=False,
                          arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    channel.queue_bind("default", queues.TASK_EXCHANGE, "default")
    conn.close()
    run(_publish("test.record", ["fills the queue"]))
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "1")
    with pytest.raises(BrokerUnavailable, match=r"within 1s: the broker refused \(nack\) 1 message\(s\)"):
        run(_publish("test.record", ["nacked"]))
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "5")

    async def main() -> str:
        async with AsyncPublisher() as p:
            publishing = asyncio.ensure_future(p.publish("test.record", ["fits later"]))
            await _channel_replaced(p, publishing)  # nacked for longer than a channel lives after a nack
            assert [m.headers["argsrepr"] for m in await asyncio.to_thread(vhost.drain, "default")] == [
                "['fills the queue']"]
            return await publishing

    task_id = run(main())
    assert [m.headers["id"] for m in vhost.drain("default")] == [task_id]


def test_sync_users_never_import_aio_pika():
    code = "import sys, service.client; assert 'aio_pika' not in sys.modules; service.client.apublish"
    subprocess.run([sys.executable, "-c", code + "; assert 'aio_pika' in sys.modules"], check=True, cwd=REPO)


def test_without_topology_publish_error_names_the_fix(vhost, kit_env):
    with pytest.raises(PublishError, match="topology declare"):
        run(_publish("test.record", ["x"]))


@pytest.mark.parametrize(("url", "says"), [
    ("pyamqp://{user}:{wrong_password}@{host}:{port}/{vhost}", "refused the login"),
    ("pyamqp://{user}:{password}@{host}:{port}/no-such-vhost", "vhost 'no-such-vhost' does not exist"),
    ("amqps://{user}:{password}@{host}:{port}/{vhost}", "does not speak TLS"),
])
def test_what_cannot_heal_is_broker_refused_at_once(vhost, kit_env, monkeypatch, url, says):
    good = vhost.url.split("://", 1)[1]
    password = good.split("@", 1)[0].split(":", 1)[1]
    wrong_password = "not-" + password  # made up per run
    monkeypatch.setenv("KIT_BROKER_URL", url.format(user=ADMIN_USER, password=password, host=AMQP_HOST,
                                                    port=AMQP_PORT, vhost=vhost.name, wrong_password=wrong_password))
    started = time.monotonic()
    with pytest.raises(BrokerRefused, match=says) as info:
        run(_publish("test.record", ["x"]))
    assert time.monotonic() - started < 1.5
    assert f":{wrong_password}@" not in str(info.value) and f":{password}@" not in str(info.value)


def test_a_dead_node_is_skipped_for_the_next(vhost, topology, monkeypatch, closed_port):
    dead = vhost.url.replace(f"@{AMQP_HOST}:{AMQP_PORT}/", f"@127.0.0.1:{closed_port}/")
    monkeypatch.setenv("KIT_BROKER_URL", f"{dead};{vhost.url}")
    run(_publish("test.record", ["x"]))
    assert vhost.depth("default") == 1


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A local port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("endpoint", ["closed_port", "silent_port", "both"])
def test_the_loop_never_stalls_while_publishes_wait_for_their_deadline(monkeypatch, request, endpoint):
    ports = [request.getfixturevalue(n) for n in (["closed_port", "silent_port"] if endpoint == "both" else [endpoint])]
    monkeypatch.setenv("KIT_BROKER_URL", ";".join(f"pyamqp://guest:guest@127.0.0.1:{p}//" for p in ports))
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "1.5")
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "0.5")

    async def main() -> tuple[float, list[tuple[BaseException, float]]]:
        loop, lag, stop = asyncio.get_running_loop(), [0.0], asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.01)
                lag[0] = max(lag[0], loop.time() - before - 0.01)

        async def one(p: AsyncPublisher, n: int) -> tuple[BaseException, float]:
            started = loop.time()
            try:
                await p.publish("test.record", [n])
            except Exception as exc:  # noqa: BLE001 - checked by the test
                return exc, loop.time() - started
            raise AssertionError("published to nowhere")

        tick = asyncio.create_task(ticker())
        async with AsyncPublisher() as p:
            ended = await asyncio.gather(*(one(p, n) for n in range(32)))
        stop.set()
        await tick
        return lag[0], ended

    # The collector off while it is measured: a full collection of the test run's heap stalls any loop,
    # and what is claimed is that the client never does.
    gc.collect()
    gc.disable()
    try:
        lag, ended = run(main())
    finally:
        gc.enable()
    # A blocking connect to the silent port would stall the loop for KIT_CONNECT_TIMEOUT (0.5 s); a bound of
    # half that catches it and leaves room for a loaded machine's scheduling (two cores, a busy suite).
    assert lag < 0.25, f"the event loop stalled for {lag * 1000:.0f} ms"
    for error, took in ended:
        assert type(error) is BrokerUnavailable, error
        assert "did not accept 1 message(s) within 1.5s" in str(error) and "guest:***@" in str(error)
        assert 1.5 <= took < 2.5, took  # the deadline, plus a loaded machine's slack


def test_one_default_publisher_per_event_loop_and_process(monkeypatch):
    async def default() -> AsyncPublisher:
        return async_client._default()

    loop = asyncio.new_event_loop()
    try:
        first = loop.run_until_complete(default())
        assert loop.run_until_complete(default()) is first
        assert run(default()) is not first  # another loop
        pid = os.fork()
        if pid == 0:  # the child: the same loop object, another process
            os._exit(0 if loop.run_until_complete(default()) is not first else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        loop.close()
