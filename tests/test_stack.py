"""The README's run command, for real: `python -m service stack up --demo` on the
shared RabbitMQ, then up again, status, Prometheus and the demo's metrics, the
console's first operator and Flower's login, down.

The stack gets a state directory, vhost, user prefix and port offset of its own,
so it never meets another stack on this machine (a developer's, or the one the
README starts) and leaves nothing behind on the broker.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service import stack as local
from service.stack import processes
from tests.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    AMQP_HOST,
    AMQP_PORT,
    MANAGEMENT_URL,
    REPO,
    delete_vhost,
    management,
    management_delete,
    spawn,
    wait_for_run,
    wait_until,
)
from tests.observability import http_json

#: `stack up` against the local broker.
pytestmark = pytest.mark.broker

JOBS = ("rabbitmq", "celery-exporter", "kit-workers", "kit-web", "kit-console", "kit-alert-relay")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_offset(base_ports: list[int]) -> int:
    """An offset under which every port of the stack is free.

    The stack's ports stay below 32768, out of the kernel's ephemeral range, so
    no outgoing connection of another test can take one before the stack binds it.
    """
    span = 32768 - max(base_ports) - 10000
    assert span > 1000, f"the stack's base ports {sorted(base_ports)} leave no room below 32768"
    for _ in range(200):
        offset = 10000 + int.from_bytes(os.urandom(2), "big") % span
        if all(_free(p + offset) for p in base_ports):
            return offset
    raise AssertionError("no free port range for the stack")


@dataclass
class LocalStack:
    state_dir: Path
    env: dict[str, str]
    vhost: str
    prefix: str
    offset: int

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service", "stack", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{9090 + self.offset}"

    def query(self, expr: str) -> float:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result = http_json(url)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def targets(self) -> dict[str, list[str]]:
        """job -> health of each of its targets."""
        jobs: dict[str, list[str]] = {}
        for target in http_json(f"{self.prometheus}/api/v1/targets")["data"]["activeTargets"]:
            jobs.setdefault(target["labels"]["job"], []).append(target["health"])
        return jobs


def http_status(url: str, login: str | None = None) -> int:
    """The status of a GET (redirects not followed), with basic auth ``user:password`` when given."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def pids(output: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+pid (\d+)\s+(?:started|already running)$", output, re.M)}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    state_dir = tmp_path_factory.mktemp("stack") / "state"
    tag = uuid.uuid4().hex[:8]
    base = local.Stack(state_dir, local.Options(demo=True))
    offset = _port_offset([p for c in base.all_components() for p in c.ports])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIT_", "SENTRY_"))}
    env.update({
        "KIT_STATE_DIR": str(state_dir),
        # The broker's administrator, to create the stack's vhost and users.
        "KIT_BROKER_URL": f"pyamqp://{ADMIN_USER}:{ADMIN_PASSWORD}@{AMQP_HOST}:{AMQP_PORT}//",
        "KIT_ADMIN_URL": MANAGEMENT_URL,
    })
    stack = LocalStack(state_dir, env, f"kit-stack-{tag}", f"ks{tag}-", offset)
    try:
        yield stack
    finally:
        stack.cli("down", timeout=600)
        delete_vhost(stack.vhost)
        for user in management("GET", "/api/users"):
            if user["name"].startswith(stack.prefix):
                management_delete(f"/api/users/{urllib.parse.quote(user['name'], safe='')}")


def test_up_down_and_everything_in_between(running: LocalStack) -> None:
    started = time.monotonic()
    up = running.cli("up", "--demo", "--port-offset", str(running.offset), "--vhost", running.vhost,
                     "--user-prefix", running.prefix, "--wait", "90")
    assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
    first = pids(up.stdout)
    expected = [c.name for c in local.Stack(running.state_dir, local.Options(demo=True)).all_components()]
    assert sorted(first) == sorted(expected), up.stdout
    for name in ("rabbitmq", "prometheus", "alertmanager", "flower", "web", "console"):
        assert re.search(rf"^{name}\s+http://127\.0\.0\.1:\d+$", up.stdout, re.M), f"no URL for {name}"
    console = f"http://127.0.0.1:{5580 + running.offset}"
    assert re.search(rf"^console\s+{re.escape(console)}$", up.stdout, re.M)
    add_operator = re.search(r"^console users\s+none yet: add the first operator .*\n\s+(.+ --role operator)$",
                             up.stdout, re.M)
    assert add_operator, up.stdout
    assert re.search(r"^redis\s+redis://127\.0\.0\.1:\d+$", up.stdout, re.M), "no URL for redis"
    assert f"http://127.0.0.1:{9090 + running.offset}" in up.stdout
    print(f"\nstack up --demo: {time.monotonic() - started:.1f}s")

    # Up again: harmless, the same processes keep running.
    again = running.cli("up", "--wait", "30")
    assert again.returncode == 0, again.stdout + again.stderr
    assert pids(again.stdout) == first
    assert again.stdout.count("already running") == len(first)

    # `status` probes each component once (a worker answers a ping under demo
    # load), so a slow answer on a loaded machine is asked again.
    status = wait_for_run(
        lambda: running.cli("status", timeout=30),
        lambda run: run.returncode == 0 and all(
            re.search(rf"^{name}\s+running, pid {pid}\s+healthy$", run.stdout, re.M) for name, pid in first.items()),
        60, "stack status to report every component healthy")
    assert re.search(r"^queue urgent\s+ready \d+\s+consumers [1-9]", status.stdout, re.M), status.stdout

    # The console: its health and metrics without a login, its lists only with one; the command
    # `up` printed adds the first operator to the console's own users file.
    assert http_status(f"{console}/healthz") == 200
    assert http_status(f"{console}/letters?queue=default.dead") in (303, 401), "the list needs a login"
    argv = shlex.split(add_operator.group(1).replace(" NAME ", " first-op "))
    assignments = dict(a.split("=", 1) for a in argv if re.fullmatch(r"[A-Z_]+=.*", a))
    assert set(assignments) == {"KIT_CONSOLE_USERS_FILE"}
    assert Path(assignments["KIT_CONSOLE_USERS_FILE"]).is_relative_to(running.state_dir)
    added = subprocess.run([*argv[len(assignments):], "--password-stdin"], cwd=REPO,
                           env={**running.env, **assignments}, input="an operator's password\n",
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stdout + added.stderr
    status = running.cli("status", timeout=60)
    assert re.search(r"^console users\s+1 operator\(s\) in ", status.stdout, re.M), status.stdout

    # Flower: its API only with the login of the stack's flower_basic_auth secret.
    flower = f"http://127.0.0.1:{5555 + running.offset}"
    login = (running.state_dir / "secrets" / "flower_basic_auth").read_text().strip()
    assert re.search(rf"^log in to Flower as\s+user:password in {re.escape(str(running.state_dir))}", up.stdout,
                     re.M), up.stdout
    assert http_status(f"{flower}/api/workers") == 401
    assert http_status(f"{flower}/api/workers", login) == 200
    assert http_status(f"{flower}/healthcheck") == 200

    # Prometheus scrapes every target of the stack ...
    wait_until(lambda: all(running.targets().get(job) and set(running.targets()[job]) == {"up"} for job in JOBS),
               60, "every Prometheus target up", interval=1)
    # ... and the demo traffic shows: successes, retries and dead letters, in this stack's vhost.
    vhost = running.vhost
    wait_until(lambda: running.query("sum(celery_task_succeeded_total)") > 0, 60, "succeeded tasks", interval=2)
    wait_until(lambda: running.query("sum(kit_retries_scheduled_total)") > 0, 60, "retried tasks", interval=2)
    wait_until(lambda: running.query("sum(kit_dead_letters_total)") > 0
               or running.query(f'sum(rabbitmq_queue_messages_ready{{vhost="{vhost}",queue=~".*\\\\.dead"}})') > 0,
               90, "dead letters", interval=2)
    assert running.query(f'count(rabbitmq_queue_messages_ready{{vhost="{vhost}"}})') > 0
    # The dead-letter alerts link this stack's console (the console_url external label).
    config = http_json(f"{running.prometheus}/api/v1/status/config")["data"]["yaml"]
    assert f"console_url: {console}" in config, config
    print(f"targets up and demo traffic in the metrics after {time.monotonic() - started:.1f}s")

    # Down stops only what up started: not a process of ours, not even one with a recycled pid file.
    bystander = spawn(["sleep", "600"])
    try:
        down = running.cli("down", timeout=600)
        assert down.returncode == 0, down.stdout + down.stderr
        for name in first:
            assert re.search(rf"^{name}\s+stopped$", down.stdout, re.M), down.stdout
        for pid in first.values():
            wait_until(lambda pid=pid: processes.start_time(pid) is None, 10, f"pid {pid} to exit")
        (running.state_dir / "run" / "demo.pid").write_text(f"{bystander.pid} 1\n")
        again_down = running.cli("down")
        assert re.search(r"^demo\s+not running$", again_down.stdout, re.M), again_down.stdout
        assert bystander.poll() is None, "down signalled a process it did not start"
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()

    status = running.cli("status")
    assert status.returncode == 1
    for name in first:
        if name != "demo":
            assert re.search(rf"^{name}\s+NOT RUNNING$", status.stdout, re.M), status.stdout
    try:
        urllib.request.urlopen(running.prometheus, timeout=2)
        raise AssertionError("Prometheus still answers after down")
    except OSError:
        pass
    print(f"whole cycle: {time.monotonic() - started:.1f}s")
