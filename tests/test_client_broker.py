"""The client against a real broker: confirms, reconnects, and clear failures."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from service.client import Publisher, publish
from service.errors import BrokerUnavailable, PublishError
from service.settings import load
from tests.helpers import rabbitmqctl


def test_publish_returns_after_the_message_is_queued(vhost, topology):
    task_id = publish("reports.export", kwargs={"report": "r", "rows": []}, priority="low")
    [message] = vhost.drain("bulk")
    assert message.headers["id"] == task_id
    assert message.properties["priority"] == 0
    assert message.properties["delivery_mode"] == 2


def test_publish_without_topology_fails_clearly(vhost, kit_env):
    with Publisher() as p, pytest.raises(PublishError, match="topology declare"):
        p.publish("test.record", ["x"])


def test_unroutable_message_is_not_silently_dropped(vhost, topology):
    conn = vhost.connection()
    conn.channel().queue_delete("default")
    conn.close()
    with Publisher() as p:
        task_id = p.publish("test.record", ["x"])  # the task exchange's alternate exchange takes it
    [parked] = vhost.drain("unroutable.dead")
    assert parked.headers["id"] == task_id and parked.delivery_info["routing_key"] == "default"


def test_a_dropped_connection_is_reopened(vhost, topology):
    with Publisher() as p:
        p.publish("test.record", ["before"])
        vhost.drop_connections()
        p.publish("test.record", ["after"])
    assert [m.headers["argsrepr"] for m in vhost.drain("default")] == ["['before']", "['after']"]


def _assert_bounded_failure(monkeypatch, url: str, bound: float) -> BrokerUnavailable:
    monkeypatch.setenv("KIT_BROKER_URL", url)
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "2")
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "1")
    started = time.monotonic()
    with Publisher(load()) as p, pytest.raises(BrokerUnavailable) as info:
        p.publish("test.record", ["x"])
    assert time.monotonic() - started < bound
    return info.value


def test_nothing_listening_fails_within_the_deadline(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = _assert_bounded_failure(monkeypatch, f"pyamqp://guest:guest@127.0.0.1:{port}//", bound=5)
    assert "did not accept 1 message(s) within 2s" in str(error)
    assert "guest:***@" in str(error)  # no password in the message


def test_a_broker_that_never_answers_fails_within_the_deadline(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept_and_stay_silent():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    try:
        _assert_bounded_failure(monkeypatch, f"pyamqp://guest:guest@127.0.0.1:{server.getsockname()[1]}//", bound=6)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_publishing_while_the_broker_is_stopped_fails_clearly_then_recovers(vhost, topology, monkeypatch):
    """Stops the real broker's app for a moment: the test restores it in all cases."""
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "3")
    with Publisher(load()) as p:
        p.publish("test.record", ["before"])
        rabbitmqctl("stop_app")
        try:
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="did not accept"):
                p.publish("test.record", ["during"])
            assert time.monotonic() - started < 8
        finally:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
        p.publish("test.record", ["after"])  # the same publisher reconnects
    assert [m.headers["argsrepr"] for m in vhost.drain("default")] == ["['before']", "['after']"]
