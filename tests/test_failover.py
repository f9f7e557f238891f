"""Several broker nodes in KIT_BROKER_URL: one deadline for them all, and no password in any message.

Silent nodes are loopback sockets that listen and never answer (a broker
that hangs, or a black-holed address), so no RabbitMQ is needed.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from service.client import Publisher
from service.connection import connect, user_and_vhost
from service.errors import BrokerUnavailable
from service.settings import load, redact_url

#: Made up for each run: it must appear in no message.
PASSWORD = uuid.uuid4().hex


@pytest.fixture
def silent_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """KIT_BROKER_URL with three nodes that accept TCP connections and never speak AMQP."""
    sockets = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        sockets.append(s)
    password = PASSWORD
    url = ";".join(f"pyamqp://kit-worker:{password}@127.0.0.1:{s.getsockname()[1]}/kit" for s in sockets)
    monkeypatch.setenv("KIT_BROKER_URL", url)
    yield url
    for s in sockets:
        s.close()


def test_connecting_to_three_silent_nodes_takes_the_connect_timeout_not_three(silent_nodes, monkeypatch):
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        connect(load())
    took = time.monotonic() - start
    assert took < 3.5, f"{took:.1f}s for KIT_CONNECT_TIMEOUT=2"
    assert "within 2s (KIT_CONNECT_TIMEOUT)" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_a_publish_to_three_silent_nodes_fails_within_its_deadline_unconfirmed(silent_nodes, monkeypatch):
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", "2")
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised, Publisher() as publisher:
        publisher.publish("emails.send", ["to@example.com"])
    took = time.monotonic() - start
    assert took < 3.5, f"{took:.1f}s for KIT_PUBLISH_TIMEOUT=2"
    assert "None of them is confirmed" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_the_vhost_and_user_of_a_node_list_are_node_1s_and_carry_no_other_url(silent_nodes):
    settings = load()
    user, vhost = user_and_vhost(settings.broker_url)
    assert (user, vhost) == ("kit-worker", "kit")
    assert redact_url(settings.broker_url).count(":***@") == 3
