"""A real 3-node RabbitMQ cluster for the cluster tests, ended with the test run.

``start_test_cluster`` runs ``service.stack.cluster.LocalCluster`` on the
TEST_LAYOUT ports (5701-5703, apart from the local stack's 5681-5683), after
stopping what a killed run may have left. A guard process bound to the run
(``spawn``) kill -9s the nodes' Erlang VMs when pytest exits, also when pytest
itself is killed, so no node outlives the run. ``ClusterVhost`` is a fresh
vhost on it with a URL per node.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp

from harness.broker import ADMIN_PASSWORD, ADMIN_USER
from harness.processes import spawn
from harness.waiting import wait_until
from service.stack.cluster import ClusterLayout, LocalCluster, Node

#: KIT_TEST_CLUSTER_OFFSET (default 0; below 100) moves the test cluster's ports and names, so two
#: test runs on one machine (two clones) each get their own cluster.
_OFFSET = int(os.environ.get("KIT_TEST_CLUSTER_OFFSET", "0"))
#: Names and ports of the test cluster's nodes.
TEST_LAYOUT = ClusterLayout(size=3, prefix=f"kit-test{_OFFSET or ''}-c", first_amqp_port=5701 + _OFFSET,
                            first_dist_port=25701 + _OFFSET, first_management_port=15701 + _OFFSET,
                            first_prometheus_port=15801 + _OFFSET)
#: Where the test cluster's nodes keep their data and logs (wiped at each start).
TEST_CLUSTER_DIR = Path(f"/tmp/kit-test-cluster{_OFFSET or ''}")
#: Vhosts of the cluster tests are named like the other tests' ones.
CLUSTER_VHOST_PREFIX = "kit-test-cluster-"


def management(node: Node, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    """Call one node's management HTTP API as the admin user."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{node.management_port}{path}", data=data, method=method)
    token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


class TestCluster(LocalCluster):
    """The LocalCluster of the tests, with the helpers they share."""

    __test__ = False  # not a test class, whatever its name

    def running(self) -> list[Node]:
        """The nodes whose RabbitMQ runs now."""
        return [node for node in self.nodes if self.is_running(node)]

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """The management API of the first running node."""
        last: Exception | None = None
        for node in self.nodes:
            if self.vm_pid(node) is None:
                continue
            try:
                return management(node, method, path, body)
            except urllib.error.HTTPError:
                raise
            except OSError as exc:
                last = exc
        raise RuntimeError(f"no node of the test cluster answers its management API: {last}")

    def queue_info(self, vhost: str, queue: str) -> dict[str, Any]:
        """The management API's view of a queue (for a quorum queue: leader, members, online)."""
        return self.api("GET", f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")

    def leader_of(self, vhost: str, queue: str) -> Node:
        """The node that leads a quorum queue now."""
        leader = self.queue_info(vhost, queue).get("leader")
        for node in self.nodes:
            if node.name == leader:
                return node
        raise RuntimeError(f"queue {queue!r} in {vhost!r} has no leader among the nodes ({leader!r})")

    def wait_all_running(self, timeout: float = 120) -> None:
        """Wait until every node runs in the cluster (after a restart)."""
        wait_until(lambda: len(self.running_nodes()) == len(self.nodes), timeout,
                   "every node of the test cluster to run", interval=1)

    def start_nodes(self, nodes: list[Node]) -> None:
        """Start several stopped or killed nodes at once (each boots in the time of one), and wait for each."""
        if not nodes:
            return
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for started in [pool.submit(self.start_node, node) for node in nodes]:
                started.result()  # a node that did not boot raises its ClusterError here

    def stop_nodes(self, nodes: list[Node]) -> None:
        """Stop several nodes cleanly at once, and wait until each VM has exited."""
        if not nodes:
            return
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for stopped in [pool.submit(self.stop_node, node) for node in nodes]:
                stopped.result()

    def restore(self) -> None:
        """Start again every node that does not run (all at once), and wait until all run in the cluster."""
        self.start_nodes([node for node in self.nodes if not self.is_running(node)])
        self.wait_all_running()


def _guard(cluster: LocalCluster) -> subprocess.Popen[bytes]:
    """A process bound to the test run that kill -9s the nodes' VMs when the run ends."""
    names = " ".join(str(n.pid_file) for n in cluster.nodes)
    script = (
        f"trap 'for f in {names}; do [ -s \"$f\" ] && kill -9 \"$(cat \"$f\")\" 2>/dev/null; done; exit 0' TERM INT; "
        "while :; do sleep 0.5; done"
    )
    return spawn(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_leftovers(cluster: LocalCluster) -> None:
    """kill -9 the nodes a killed run left running, and wipe their directories."""
    for node in cluster.nodes:
        pid = cluster.vm_pid(node)
        if pid is not None:
            with contextlib.suppress(Exception):
                cluster.kill_node(node)
        if cluster.is_running(node):  # started from another directory: ask it by name
            cluster.ctl(node, "stop", check=False)
    shutil.rmtree(cluster.base_dir, ignore_errors=True)


def start_test_cluster() -> tuple[TestCluster, subprocess.Popen[bytes]]:
    """A fresh 3-node test cluster and its guard process (terminate the guard to end the nodes)."""
    cluster = TestCluster(TEST_CLUSTER_DIR, TEST_LAYOUT)
    stop_leftovers(cluster)
    guard = _guard(cluster)
    cluster.start()
    return cluster, guard


def stop_test_cluster(cluster: TestCluster, guard: subprocess.Popen[bytes]) -> None:
    """End the nodes (kill -9: their data is thrown away) and the guard."""
    for node in cluster.nodes:
        with contextlib.suppress(Exception):
            if cluster.vm_pid(node) is not None:
                cluster.kill_node(node)
    guard.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        guard.wait(timeout=10)
    shutil.rmtree(cluster.base_dir, ignore_errors=True)


class ClusterVhost:
    """A fresh vhost on the test cluster, the admin allowed everything, with one URL per node."""

    def __init__(self, cluster: TestCluster) -> None:
        self.cluster = cluster
        self.name = f"{CLUSTER_VHOST_PREFIX}{int(time.time())}-{uuid.uuid4().hex[:8]}"
        quoted = quote(self.name, safe="")
        cluster.api("PUT", f"/api/vhosts/{quoted}")
        cluster.api("PUT", f"/api/permissions/{quoted}/{ADMIN_USER}", {"configure": ".*", "write": ".*", "read": ".*"})
        self.urls = cluster.amqp_urls(ADMIN_USER, ADMIN_PASSWORD, self.name)
        #: KIT_BROKER_URL for every node, in kombu's failover syntax.
        self.url = ";".join(self.urls)

    def delete(self) -> None:
        """Remove the vhost and everything in it (nothing when no node answers)."""
        with contextlib.suppress(Exception):
            self.cluster.api("DELETE", f"/api/vhosts/{quote(self.name, safe='')}")

    def connection(self, node: Node | None = None) -> amqp.Connection:
        """A raw py-amqp connection into this vhost through ``node`` (default: the first running one)."""
        candidates = [node] if node is not None else [n for n in self.cluster.nodes if self.cluster.vm_pid(n)]
        last: Exception | None = None
        for candidate in candidates:
            conn = amqp.Connection(f"127.0.0.1:{candidate.amqp_port}", userid=ADMIN_USER, password=ADMIN_PASSWORD,
                                   virtual_host=self.name, connect_timeout=5)
            try:
                conn.connect()
                return conn
            except Exception as exc:  # noqa: BLE001 - try the next node
                last = exc
        raise RuntimeError(f"no node of the test cluster takes a connection: {last}")

    def counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, via a passive declare through any running node."""
        conn = self.connection()
        try:
            _, messages, consumers = conn.channel().queue_declare(queue, passive=True)
            return messages, consumers
        finally:
            conn.close()

    def depth(self, queue: str) -> int:
        """Messages ready in a queue (through any running node)."""
        return self.counts(queue)[0]

    def depths(self, queues: list[str] | tuple[str, ...]) -> dict[str, int]:
        """Messages ready in each of several queues."""
        return {q: self.depth(q) for q in queues}

    def drain(self, queue: str) -> list[amqp.Message]:
        """Take every ready message out of a queue (acked), through any running node."""
        conn = self.connection()
        try:
            channel = conn.channel()
            messages = []
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                messages.append(message)
            return messages
        finally:
            conn.close()
