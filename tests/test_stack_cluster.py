"""`python -m service stack up --cluster 3`: the local stack on a 3-node RabbitMQ cluster with quorum queues.

The stack gets its own state directory, vhost, user prefix and port offset;
``stack down`` stops its processes and the three nodes it started, and the
test kills whatever a failure left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from service import queues
from service.stack import Options, Stack
from tests.helpers import REPO, wait_until
from tests.observability import http_json

pytestmark = pytest.mark.broker


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_stack_offset(state_dir: Path) -> int:
    """A port offset under which the stack's and its nodes' ports are all free (and below 32768)."""
    for _ in range(200):
        offset = 100 + int.from_bytes(os.urandom(2), "big") % 4000
        stack = Stack(state_dir, Options(cluster=3, port_offset=offset))
        ports = [p for c in stack.all_components() for p in c.ports]
        for node in stack.broker_nodes():
            ports += [node.amqp_port, node.dist_port, node.management_port, node.prometheus_port]
        if max(ports) < 32768 and all(_free(p) for p in ports):
            return offset
    raise AssertionError("no free port range for the cluster stack")


def test_stack_up_cluster_3_runs_the_kit_on_three_nodes_and_down_stops_them(tmp_path):
    state_dir = tmp_path / "state"
    offset = _cluster_stack_offset(state_dir)
    tag = uuid.uuid4().hex[:6]
    vhost, prefix = f"kit-cstack-{tag}", f"kc{tag}-"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIT_", "SENTRY_"))}
    env["KIT_STATE_DIR"] = str(state_dir)

    def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service", "stack", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)

    stack = Stack(state_dir, Options(cluster=3, port_offset=offset, vhost=vhost, user_prefix=prefix))
    cluster = stack.cluster()
    assert cluster is not None
    try:
        up = cli("up", "--cluster", "3", "--port-offset", str(offset), "--vhost", vhost, "--user-prefix", prefix,
                 "--wait", "120")
        assert up.returncode == 0, f"stack up --cluster 3 failed:\n{up.stdout}\n{up.stderr}"
        status = cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        for node in cluster.nodes:
            assert f"{node.name}" in status.stdout and f"AMQP {node.amqp_port}" in status.stdout, status.stdout
        assert "queue default.high" in status.stdout
        # Every queue is a quorum queue on the three nodes, and the workers consume the high lanes too.
        api = f"http://127.0.0.1:{cluster.nodes[0].management_port}/api/queues/{urllib.request.quote(vhost, safe='')}"
        request = urllib.request.Request(api, headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})  # guest:guest
        found: dict[str, dict] = {}

        def lanes_consumed() -> bool:
            # The management API's consumer counts lag the workers' consume by a statistics interval (5 s).
            with urllib.request.urlopen(request, timeout=30) as response:
                found.clear()
                found.update({q["name"]: q for q in json.load(response)})
            return all(found.get(lane.name, {}).get("consumers", 0) >= 1 for lane in queues.topology("quorum").lanes)

        try:
            wait_until(lanes_consumed, 60, "the workers to consume every high lane", interval=1)
        except AssertionError as exc:
            counts = {lane.name: found.get(lane.name, {}).get("consumers") for lane in queues.topology("quorum").lanes}
            raise AssertionError(f"{exc}: consumers per lane {counts}") from None
        for queue in queues.topology("quorum").all_queues:
            assert found[queue.name]["type"] == "quorum", queue.name
            assert len(found[queue.name]["members"]) == 3, queue.name
        # Prometheus scrapes every node.
        prometheus = f"http://127.0.0.1:{9090 + offset}/api/v1/targets"

        def every_node_scraped() -> bool:
            targets = http_json(prometheus)["data"]["activeTargets"]
            up_nodes = {t["labels"]["instance"] for t in targets
                        if t["labels"]["job"] == "rabbitmq" and t["health"] == "up"}
            return up_nodes == {f"127.0.0.1:{n.prometheus_port}" for n in cluster.nodes}

        wait_until(every_node_scraped, 90, "Prometheus to scrape all three nodes", interval=1)
        down = cli("down", timeout=400)
        assert down.returncode == 0, down.stdout + down.stderr
        for node in cluster.nodes:
            assert f"{node.name:22} stopped" in down.stdout, down.stdout
            assert cluster.vm_pid(node) is None
    finally:
        cli("down", timeout=400)
        for node in cluster.nodes:
            pid = cluster.vm_pid(node)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(cluster.base_dir, ignore_errors=True)  # the nodes' data, outside tmp_path
