"""The local test broker: its address and admin, its management API, and throwaway vhosts.

Each test (and benchmark) gets its own vhost (created through the management
API), so runs never see each other's messages and the suite can run twice in a
row. The broker is the one of KIT_TEST_AMQP_HOST/PORT, KIT_TEST_MANAGEMENT_URL
and KIT_TEST_ADMIN_USER/PASSWORD (default: the local broker's guest user).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import amqp

from harness.waiting import wait_until

#: The repository's root.
REPO = Path(__file__).resolve().parents[1]
AMQP_HOST = os.environ.get("KIT_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("KIT_TEST_AMQP_PORT", "5672"))
MANAGEMENT_URL = os.environ.get("KIT_TEST_MANAGEMENT_URL", "http://127.0.0.1:15672")
ADMIN_USER = os.environ.get("KIT_TEST_ADMIN_USER", "guest")
ADMIN_PASSWORD = os.environ.get("KIT_TEST_ADMIN_PASSWORD", "guest")


def management(method: str, path: str, body: Any = None) -> Any:
    """Call RabbitMQ's management HTTP API as the admin user."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(MANAGEMENT_URL + path, data=data, method=method)
    token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    # Deleting a vhost full of queues can take seconds on a loaded broker.
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def management_delete(path: str) -> None:
    """DELETE a management API object; one that is gone already (404) is fine."""
    try:
        management("DELETE", path)
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


def delete_vhost(name: str) -> None:
    """Delete a vhost and everything in it; one that is gone already is fine."""
    management_delete(f"/api/vhosts/{urllib.request.quote(name, safe='')}")


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q`` on the local test broker and return its output."""
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True).stdout


#: Test vhosts are named ``kit-test-<unix time of creation>-<random>``.
TEST_VHOST_PREFIX = "kit-test-"

class Vhost:
    """A fresh vhost on the test broker, with the admin user allowed everything."""

    def __init__(self, created: float | None = None) -> None:
        created = time.time() if created is None else created
        self.name = f"{TEST_VHOST_PREFIX}{int(created)}-{uuid.uuid4().hex[:8]}"
        quoted = urllib.request.quote(self.name, safe="")
        management("PUT", f"/api/vhosts/{quoted}")
        management("PUT", f"/api/permissions/{quoted}/{ADMIN_USER}", {"configure": ".*", "write": ".*", "read": ".*"})
        self.url = f"pyamqp://{ADMIN_USER}:{ADMIN_PASSWORD}@{AMQP_HOST}:{AMQP_PORT}/{self.name}"

    def delete(self) -> None:
        """Remove the vhost and everything in it (nothing when the broker is unreachable)."""
        with contextlib.suppress(urllib.error.URLError):
            delete_vhost(self.name)

    def connection(self) -> amqp.Connection:
        """A raw py-amqp connection into this vhost."""
        conn = amqp.Connection(
            f"{AMQP_HOST}:{AMQP_PORT}", userid=ADMIN_USER, password=ADMIN_PASSWORD, virtual_host=self.name
        )
        conn.connect()
        return conn

    def drop_connections(self, timeout: float = 60) -> None:
        """Have the broker close every client connection into this vhost, and wait until none is left.

        ``close_all_connections -p`` only reaches connections the broker has already
        registered for the vhost, which happens asynchronously after the handshake; on a
        busy broker a brand-new connection can be missed. So close again until the
        broker's own connection list (not the management statistics, which lag) is empty.
        """

        def closed() -> bool:
            rabbitmqctl("close_all_connections", "-p", self.name, "test: drop")
            live = rabbitmqctl("list_connections", "vhost", "--no-table-headers").splitlines()
            return self.name not in live

        wait_until(closed, timeout, f"the broker to drop every connection into {self.name}", interval=0.5)

    def counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, via a passive declare."""
        conn = self.connection()
        try:
            _, messages, consumers = conn.channel().queue_declare(queue, passive=True)
            return messages, consumers
        finally:
            conn.close()

    def depth(self, queue: str) -> int:
        """Messages ready in a queue."""
        return self.counts(queue)[0]

    def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Messages ready in each of several queues, over one connection."""
        conn = self.connection()
        try:
            channel = conn.channel()
            return {q: channel.queue_declare(q, passive=True)[1] for q in queues}
        finally:
            conn.close()

    def unacked(self, queue: str) -> int:
        """Messages of a queue delivered to a consumer and not yet acked, as the broker itself counts them.

        From ``rabbitmqctl list_queues`` (about a second: not for tight loops); the
        management API's figure lags.
        """
        out = rabbitmqctl("list_queues", "-p", self.name, "name", "messages_unacknowledged")
        rows = dict(line.split("\t") for line in out.splitlines() if "\t" in line and not line.startswith("name"))
        return int(rows.get(queue, "0"))

    def drain(self, queue: str) -> list[amqp.Message]:
        """Take every ready message out of a queue (acked)."""
        conn = self.connection()
        try:
            channel = conn.channel()
            messages = []
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                messages.append(message)
            return messages
        finally:
            conn.close()
