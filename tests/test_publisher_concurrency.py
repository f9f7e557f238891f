"""One Publisher shared by many threads, on the real broker: overlapping confirms, each caller told about its own.

A caller returns only once the broker confirmed its own task; a nack, a
return or a dropped connection fails or resends exactly the messages it hit.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter

import pytest

from service.client import Publisher
from service.errors import BrokerUnavailable, PublishError
from service.publishing import ConfirmedChannel, Outgoing
from service.publishing import inflight as inflight_mod
from service.settings import load

THREADS = 16


def _in_threads(count: int, work) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(index: int) -> None:
        start.wait()
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a publishing thread hung"
    return errors


def test_threads_sharing_a_publisher_keep_many_messages_in_flight(vhost, topology, monkeypatch):
    most = [0]
    real_add = inflight_mod.Inflight.add

    def counting_add(self, message, waiter):
        most[0] = max(most[0], len(self) + 1)
        return real_add(self, message, waiter)

    monkeypatch.setattr(inflight_mod.Inflight, "add", counting_add)
    ids: list[str] = []
    with Publisher() as publisher:
        errors = _in_threads(THREADS, lambda i: ids.extend(
            publisher.publish("test.record", [i, n]) for n in range(50)))
    assert not errors
    assert most[0] > 1, "the threads' messages never overlapped: confirms were awaited one at a time"
    queued = [m.headers["id"] for m in vhost.drain("default")]
    assert sorted(queued) == sorted(ids) and len(set(ids)) == THREADS * 50


def test_a_connection_dropped_under_concurrent_publishing_loses_no_confirmed_task(vhost, topology):
    confirmed: list[str] = []
    dropped = threading.Event()

    def work(index: int) -> None:
        for n in range(60):
            confirmed.append(publisher.publish("test.record", [index, n]))
            if index == 0 and n == 20:
                vhost.drop_connections()
                dropped.set()

    with Publisher() as publisher:
        errors = _in_threads(8, work)
    assert not errors and dropped.is_set()
    queued = Counter(m.headers["id"] for m in vhost.drain("default"))
    assert set(confirmed) <= set(queued), "a confirmed task is missing"
    assert len(confirmed) == 8 * 60  # every call returned; resent ones may be there twice (at-least-once)


def _tiny_queue(vhost) -> None:
    """A queue that holds one message and nacks more (reject-publish), bound to its own exchange."""
    conn = vhost.connection()
    channel = conn.channel()
    channel.exchange_declare("tiny", "direct", durable=True, auto_delete=False)
    channel.queue_declare("tiny", durable=True, auto_delete=False,
                          arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    channel.queue_bind("tiny", "tiny", "tiny")
    conn.close()


def _message(exchange: str, routing_key: str, marker: str) -> Outgoing:
    return Outgoing(exchange, routing_key, f'["{marker}"]'.encode(), {"id": marker},
                    {"content_type": "application/json", "delivery_mode": 2})


def test_a_nack_fails_only_the_message_it_refused(vhost, topology, kit_env):
    _tiny_queue(vhost)
    channel = ConfirmedChannel(load(), deadline_s=1.5)
    try:
        channel.publish(_message("tiny", "tiny", "first"))  # fills the queue
        outcomes: dict[str, str] = {}

        def work(index: int) -> None:
            name = f"m{index}"
            try:
                if index == 0:
                    channel.publish(_message("tiny", "tiny", name))  # nacked until the deadline
                else:
                    channel.publish(_message("tasks", "default", name))
                outcomes[name] = "ok"
            except BrokerUnavailable as exc:
                outcomes[name] = f"unavailable: {exc}"

        assert not _in_threads(6, work)
    finally:
        channel.close()
    refused = outcomes.pop("m0")
    assert refused.startswith("unavailable: ") and "(nack)" in refused, refused
    assert all(v == "ok" for v in outcomes.values()), outcomes
    assert sorted(m.headers["id"] for m in vhost.drain("default")) == ["m1", "m2", "m3", "m4", "m5"]
    assert [m.headers["id"] for m in vhost.drain("tiny")] == ["first"]


def test_a_return_fails_only_the_unroutable_message(vhost, topology, kit_env):
    conn = vhost.connection()
    conn.channel().exchange_declare("nowhere", "direct", durable=True, auto_delete=False)  # no queue bound
    conn.close()
    channel = ConfirmedChannel(load(), deadline_s=1.0)
    outcomes: dict[str, str] = {}

    def work(index: int) -> None:
        name = f"m{index}"
        try:
            channel.publish(_message("nowhere" if index == 0 else "tasks", "default", name))
            outcomes[name] = "ok"
        except PublishError as exc:
            outcomes[name] = str(exc)

    try:
        assert not _in_threads(6, work)
    finally:
        channel.close()
    assert "returned it unroutable" in outcomes.pop("m0")
    assert set(outcomes.values()) == {"ok"}
    assert sorted(m.headers["id"] for m in vhost.drain("default")) == ["m1", "m2", "m3", "m4", "m5"]


def test_a_missing_exchange_fails_its_caller_and_the_others_are_resent(vhost, topology, kit_env):
    channel = ConfirmedChannel(load(), deadline_s=3)
    outcomes: dict[str, str] = {}

    def work(index: int) -> None:
        name = f"m{index}"
        try:
            for n in range(10):
                channel.publish(_message("no-such-exchange" if index == 0 else "tasks", "default", f"{name}-{n}"))
            outcomes[name] = "ok"
        except PublishError as exc:
            outcomes[name] = str(exc)

    try:
        assert not _in_threads(4, work)
    finally:
        channel.close()
    assert "no such exchange" in outcomes.pop("m0")
    assert set(outcomes.values()) == {"ok"}
    queued = {m.headers["id"] for m in vhost.drain("default")}
    assert {f"m{i}-{n}" for i in (1, 2, 3) for n in range(10)} <= queued


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(vhost, topology):
    with Publisher() as publisher:
        publisher.publish("test.record", ["parent-before"])
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: publish with the inherited publisher, report, exit without cleanup
            status = 1
            try:
                publisher.publish("test.record", ["child"])
                status = 0
            finally:
                os.write(write, bytes([status]))
                os._exit(0)
        os.close(write)
        child_status = os.read(read, 1)
        os.waitpid(pid, 0)
        os.close(read)
        publisher.publish("test.record", ["parent-after"])  # the parent's connection still works
    assert child_status == b"\x00"
    assert sorted(m.headers["argsrepr"] for m in vhost.drain("default")) == [
        "['child']", "['parent-after']", "['parent-before']"]


def test_task_sent_events_are_batched_into_few_messages(vhost, topology):
    conn = vhost.connection()
    channel = conn.channel()
    channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
    channel.queue_declare("events-tap", auto_delete=False)
    channel.queue_bind("events-tap", "celeryev", "#")
    conn.close()
    with Publisher() as publisher:
        ids = [publisher.publish("test.record", [n]) for n in range(250)]
    messages = vhost.drain("events-tap")
    bodies = [json.loads(m.body) for m in messages]
    events = [event for body in bodies for event in (body if isinstance(body, list) else [body])]
    assert sorted(e["uuid"] for e in events) == sorted(ids) and {e["type"] for e in events} == {"task-sent"}
    assert len(messages) <= 10, f"{len(messages)} event messages for 250 tasks: not batched"


def test_a_message_that_cannot_be_encoded_fails_only_its_caller(vhost, topology, kit_env):
    channel = ConfirmedChannel(load(), deadline_s=3)
    bad = Outgoing("tasks", "default", b"[]", {"id": "bad"}, {"priority": 300, "delivery_mode": 2})  # not an octet
    outcomes: dict[str, str] = {}

    def work(index: int) -> None:
        try:
            for n in range(10):
                channel.publish(bad if index == 0 else _message("tasks", "default", f"m{index}-{n}"))
            outcomes[f"m{index}"] = "ok"
        except PublishError as exc:
            outcomes[f"m{index}"] = str(exc)

    try:
        assert not _in_threads(4, work)
        channel.publish(_message("tasks", "default", "after"))  # the channel's tags still match the broker's
    finally:
        channel.close()
    assert "cannot be sent as AMQP" in outcomes.pop("m0")
    assert set(outcomes.values()) == {"ok"}
    queued = [m.headers["id"] for m in vhost.drain("default")]
    assert sorted(queued) == sorted([f"m{i}-{n}" for i in (1, 2, 3) for n in range(10)] + ["after"])


def test_a_failing_window_says_how_many_before_it_are_queued(vhost, topology, kit_env):
    channel = ConfirmedChannel(load(), deadline_s=2)
    messages = [_message("tasks", "default", f"m{n}") for n in range(3)] + [_message("no-such-exchange", "x", "bad")]
    try:
        with pytest.raises(PublishError, match="no such exchange") as info:
            channel.publish_many(messages, window=2)
    finally:
        channel.close()
    assert info.value.confirmed == 2  # the first window; the second failed as a whole
    queued = [m.headers["id"] for m in vhost.drain("default")]
    assert queued[:2] == ["m0", "m1"] and set(queued) <= {"m0", "m1", "m2"}
