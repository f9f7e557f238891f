"""Start-up failures of workers, beat, the exporter launcher and commands: one line, bounded time.

Each case runs the real process against the real broker and asserts that it
exits non-zero, soon, with exactly one ``error: ...`` line on stderr that names
the problem, and no traceback. What cannot heal (a refused login, a missing
vhost, no permissions, a refused declare, TLS verification, a topology conflict,
an unknown queue) must fail at once even with KIT_CONNECT_TIMEOUT and
KIT_PUBLISH_TIMEOUT set to LONG_TIMEOUT_S; a broker with nothing listening
within KIT_CONNECT_TIMEOUT (or KIT_PUBLISH_TIMEOUT) plus a margin.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from service import broker, queues
from service.client import Publisher
from service.errors import BrokerRefused
from service.settings import load
from tests.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    AMQP_HOST,
    AMQP_PORT,
    REPO,
    Vhost,
    management,
    management_delete,
    rabbitmqctl,
    wait_until,
)
from tests.observability import EXPORTER_PYTHON
from tests.worker_tasks import recorded

#: KIT_CONNECT_TIMEOUT and KIT_PUBLISH_TIMEOUT of the cases that must not wait for them.
LONG_TIMEOUT_S = 30
#: Those cases must end well within LONG_TIMEOUT_S: this is "at once" on a loaded machine.
FAST_S = 15
#: KIT_CONNECT_TIMEOUT (and KIT_PUBLISH_TIMEOUT) when nothing listens: the process retries this long.
SHORT_TIMEOUT_S = 3
#: Slack for a loaded machine on top of a timeout (interpreter start, imports).
MARGIN_S = 20

SERVICE = [sys.executable, "-m", "service"]
#: Long-running processes: each must refuse to start.
DAEMONS = {
    "service worker": [*SERVICE, "worker", "--queues", "default", "--concurrency", "1"],
    "celery worker": [sys.executable, "-m", "celery", "-A", "service.app", "worker", "-Q", "default", "-c", "1"],
    "service beat": [*SERVICE, "beat"],
}
WORKERS = {name: argv for name, argv in DAEMONS.items() if "worker" in name}
#: One-shot commands that use the broker.
COMMANDS = {
    "topology verify": [*SERVICE, "topology", "verify"],
    "publish": [*SERVICE, "publish", "test.record", "--args", '["x"]'],
    "dlq stats": [*SERVICE, "dlq", "stats"],
}
EVERYTHING = {**DAEMONS, **COMMANDS}


@dataclass(frozen=True)
class Outcome:
    """How a process ended: status, seconds it took, what it printed."""

    returncode: int
    seconds: float
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The one ``error:`` line; fails the test unless stderr is exactly that line."""
        output = self.stdout + self.stderr
        assert self.returncode != 0, f"exit status 0:\n{output}"
        assert "Traceback" not in output, output
        lines = _without_root_warning(self.stderr).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{output}"
        return lines[0]


def _without_root_warning(stderr: str) -> str:
    """Celery's own SecurityWarning for a worker run as root (CI runs as root), taken out.

    A worker gets that far only when the broker let it in, i.e. for a refusal
    that comes when it starts consuming.
    """
    lines = stderr.splitlines()
    if lines and "SecurityWarning: You're running the worker with superuser privileges" in lines[0]:
        end = next((i for i, line in enumerate(lines) if "_warn_or_raise_security_error(" in line), -1)
        lines = lines[end + 1:]
    return "\n".join(lines)


def run(argv: list[str], env: dict[str, str], timeout: float) -> Outcome:
    """Run a process to its end (it must end within ``timeout``)."""
    started = time.monotonic()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return Outcome(done.returncode, time.monotonic() - started, done.stdout, done.stderr)


def refuses_fast(argv: list[str], env: dict[str, str], *fragments: str) -> str:
    """Run ``argv`` with long timeouts; it must fail at once with one line holding ``fragments``."""
    env = dict(env, KIT_CONNECT_TIMEOUT=str(LONG_TIMEOUT_S), KIT_PUBLISH_TIMEOUT=str(LONG_TIMEOUT_S))
    outcome = run(argv, env, timeout=LONG_TIMEOUT_S + MARGIN_S)
    line = outcome.error_line()
    for fragment in fragments:
        assert fragment in line, line
    assert outcome.seconds < FAST_S, f"took {outcome.seconds:.1f}s: {line}"
    return line


def url(user: str, password: str, vhost: str, host: str = AMQP_HOST, port: int = AMQP_PORT,
        scheme: str = "pyamqp") -> str:
    """A broker URL with the parts quoted."""
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(vhost, safe='')}"


def free_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def throwaway_user(vhost: Vhost) -> Iterator[tuple[str, str]]:
    """A broker user of its own (name, password), with no permissions anywhere; deleted after the test."""
    name, password = f"{vhost.name}-nobody", secrets.token_urlsafe(16)
    management("PUT", f"/api/users/{quote(name, safe='')}", {"password": password, "tags": ""})
    try:
        yield name, password
    finally:
        management_delete(f"/api/users/{quote(name, safe='')}")


def _grant(vhost: Vhost, user: str, permissions: dict[str, str]) -> None:
    management("PUT", f"/api/permissions/{quote(vhost.name, safe='')}/{quote(user, safe='')}", permissions)


# -- what cannot heal: at once ------------------------------------------------------


@pytest.mark.parametrize("what", EVERYTHING)
def test_wrong_password(what, kit_env, vhost):
    env = dict(kit_env, KIT_BROKER_URL=url(ADMIN_USER, "not-the-password", vhost.name))
    line = refuses_fast(EVERYTHING[what], env, f"refused the login of user {ADMIN_USER!r}", "KIT_BROKER_URL",
                        "KIT_BROKER_PASSWORD_FILE")
    assert "not-the-password" not in line


@pytest.mark.parametrize("what", EVERYTHING)
def test_vhost_that_does_not_exist(what, kit_env, vhost):
    missing = f"{vhost.name}-missing"
    env = dict(kit_env, KIT_BROKER_URL=url(ADMIN_USER, ADMIN_PASSWORD, missing))
    refuses_fast(EVERYTHING[what], env, f"vhost {missing!r} does not exist", "broker provision", "add_vhost")


@pytest.mark.parametrize("what", EVERYTHING)
def test_user_without_permissions_on_the_vhost(what, kit_env, vhost, throwaway_user):
    name, password = throwaway_user
    env = dict(kit_env, KIT_BROKER_URL=url(name, password, vhost.name))
    line = refuses_fast(EVERYTHING[what], env, f"user {name!r} may not use vhost {vhost.name!r}", "set_permissions")
    assert password not in line


@pytest.mark.parametrize("what", WORKERS)
def test_least_privilege_user_that_declares_the_topology(what, kit_env, vhost, throwaway_user):
    name, password = throwaway_user
    _grant(vhost, name, broker.PERMISSIONS["worker"])  # the kit-worker's rights: no configure on the topology
    env = dict(kit_env, KIT_BROKER_URL=url(name, password, vhost.name), KIT_DECLARE_TOPOLOGY="true")
    refuses_fast(WORKERS[what], env, f"user {name!r} lacks the configure right on exchange", vhost.name,
                 "KIT_DECLARE_TOPOLOGY=false")


@pytest.mark.parametrize("what", WORKERS)
def test_worker_user_that_may_not_read_the_work_queues(what, kit_env, vhost, topology, throwaway_user):
    name, password = throwaway_user
    kit_worker = broker.PERMISSIONS["worker"]
    rights = dict(kit_worker, read=kit_worker["read"].replace("urgent|default|bulk|", ""))
    _grant(vhost, name, rights)  # the kit-worker's rights, less read on the work queues
    env = dict(kit_env, KIT_BROKER_URL=url(name, password, vhost.name), KIT_DECLARE_TOPOLOGY="false",
               KIT_CONNECT_TIMEOUT=str(LONG_TIMEOUT_S))
    outcome = run(WORKERS[what], env, timeout=LONG_TIMEOUT_S + MARGIN_S)
    # The refusal comes once the worker consumes, after its start-up log lines (INFO): the
    # error is the one error line, and the last.
    output = outcome.stdout + outcome.stderr
    assert outcome.returncode == 2 and "Traceback" not in output, output
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and outcome.stderr.strip().splitlines()[-1] == errors[0], output
    assert f"user {name!r} lacks the read right on queue 'default' in vhost {vhost.name!r}" in errors[0]
    assert outcome.seconds < FAST_S, output


@pytest.mark.parametrize("what", WORKERS)
def test_least_privilege_worker_without_the_topology(what, kit_env, vhost):
    env = dict(kit_env, KIT_DECLARE_TOPOLOGY="false")
    refuses_fast(WORKERS[what], env, "missing in vhost", vhost.name, "KIT_DECLARE_TOPOLOGY=false",
                 "broker provision")


@pytest.mark.parametrize("what", WORKERS)
def test_topology_conflict(what, kit_env, vhost):
    other = queues.MAX_PRIORITY + 7  # only this argument differs from the code's
    arguments = dict(queues.work_queue("default").arguments, **{"x-max-priority": other})
    conn = vhost.connection()
    try:
        conn.channel().queue_declare("default", durable=True, auto_delete=False, arguments=arguments)
    finally:
        conn.close()
    refuses_fast(WORKERS[what], kit_env, "queue 'default' already exists", f"x-max-priority={other}", "delete")


@pytest.mark.parametrize("what", WORKERS)
@pytest.mark.parametrize("queue", ["nope", "default.dead"])
def test_unknown_queue(what, queue, kit_env):
    argv = [queue if a == "default" else a for a in WORKERS[what]]
    refuses_fast(argv, kit_env, f"unknown work queue {queue!r}", ", ".join(queues.WORK_QUEUE_NAMES))


def test_celery_worker_with_an_unreadable_password_file(kit_env, tmp_path):
    env = dict(kit_env, KIT_BROKER_PASSWORD_FILE=str(tmp_path / "absent"))
    refuses_fast(WORKERS["celery worker"], env, "KIT_BROKER_PASSWORD_FILE", str(tmp_path / "absent"))


@pytest.fixture
def untrusted_tls_port(tmp_path: Path) -> Iterator[int]:
    """A TLS listener with a self-signed certificate (no AMQP behind it): nobody can verify it."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                sock, _ = server.accept()
            except OSError:
                continue
            try:
                sock.settimeout(5)
                context.wrap_socket(sock, server_side=True).close()
            except OSError:
                pass  # the client refused our certificate, as it should
            finally:
                sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(10)
        server.close()


@pytest.mark.parametrize("what", ["celery worker", "service beat", "dlq stats"])
def test_tls_certificate_that_does_not_verify(what, kit_env, untrusted_tls_port):
    env = dict(kit_env, KIT_BROKER_URL=url("guest", "guest", "kit", port=untrusted_tls_port, scheme="amqps"))
    refuses_fast(EVERYTHING[what], env, "TLS certificate verification", "failed", "KIT_BROKER_CA_FILE")


# -- what may heal: retried until the deadline, then one line --------------------------


@pytest.mark.parametrize("what", EVERYTHING)
def test_nothing_listening(what, kit_env):
    port = free_port()
    env = dict(kit_env, KIT_BROKER_URL=url(ADMIN_USER, ADMIN_PASSWORD, "kit", port=port),
               KIT_CONNECT_TIMEOUT=str(SHORT_TIMEOUT_S), KIT_PUBLISH_TIMEOUT=str(SHORT_TIMEOUT_S))
    outcome = run(EVERYTHING[what], env, timeout=SHORT_TIMEOUT_S + MARGIN_S)
    line = outcome.error_line()
    assert f"127.0.0.1:{port}" in line and "RabbitMQ runs" in line, line
    assert outcome.seconds >= SHORT_TIMEOUT_S - 1, f"gave up after {outcome.seconds:.1f}s, before the deadline"


# -- the exporter launcher ----------------------------------------------------------------


def _exporter(env: dict[str, str]) -> list[str]:
    if not EXPORTER_PYTHON.exists():
        pytest.skip("celery-exporter is not installed (.venv-exporter); run scripts/install.sh")
    env.pop("KIT_BROKER_PASSWORD_FILE", None)
    return [str(EXPORTER_PYTHON), str(REPO / "scripts" / "celery_exporter.py"), "--port", str(free_port()),
            "--host", "127.0.0.1"]


def test_exporter_wrong_password(kit_env, vhost):
    env = dict(kit_env, KIT_BROKER_URL=url(ADMIN_USER, "not-the-password", vhost.name))
    line = refuses_fast(_exporter(env), env, f"refused the login of user {ADMIN_USER!r}")
    assert "not-the-password" not in line


def test_exporter_vhost_that_does_not_exist(kit_env, vhost):
    env = dict(kit_env, KIT_BROKER_URL=url(ADMIN_USER, ADMIN_PASSWORD, f"{vhost.name}-missing"))
    refuses_fast(_exporter(env), env, f"vhost '{vhost.name}-missing' does not exist")


def test_exporter_user_without_the_rights_it_needs(kit_env, vhost, throwaway_user):
    name, password = throwaway_user
    _grant(vhost, name, broker.PERMISSIONS["publisher"])
    env = dict(kit_env, KIT_BROKER_URL=url(name, password, vhost.name))
    refuses_fast(_exporter(env), env, f"user {name!r} lacks a right", "monitor user")


def test_exporter_unreadable_password_file(kit_env, tmp_path):
    env = dict(kit_env, KIT_BROKER_URL=f"pyamqp://{ADMIN_USER}@{AMQP_HOST}:{AMQP_PORT}/kit")
    argv = _exporter(env)
    env["KIT_BROKER_PASSWORD_FILE"] = str(tmp_path / "absent")
    refuses_fast(argv, env, "KIT_BROKER_PASSWORD_FILE cannot be read")


def test_exporter_nothing_listening(kit_env):
    port = free_port()
    env = dict(kit_env, KIT_BROKER_URL=url(ADMIN_USER, ADMIN_PASSWORD, "kit", port=port),
               KIT_CONNECT_TIMEOUT=str(SHORT_TIMEOUT_S))
    outcome = run(_exporter(env), env, timeout=SHORT_TIMEOUT_S + MARGIN_S)
    assert f"127.0.0.1:{port}" in outcome.error_line()


# -- the publisher: a missing vhost is not retried until the deadline --------------------


@pytest.mark.parametrize("case", ["missing vhost", "wrong password", "no permissions"])
def test_publish_fails_at_once_when_the_broker_refuses(case, kit_env, vhost, throwaway_user, monkeypatch):
    name, password = throwaway_user
    target, fragment = {
        "missing vhost": (url(ADMIN_USER, ADMIN_PASSWORD, f"{vhost.name}-gone"), f"'{vhost.name}-gone' does not exist"),
        "wrong password": (url(ADMIN_USER, "nope", vhost.name), f"refused the login of user {ADMIN_USER!r}"),
        "no permissions": (url(name, password, vhost.name), f"user {name!r} may not use vhost {vhost.name!r}"),
    }[case]
    monkeypatch.setenv("KIT_BROKER_URL", target)
    monkeypatch.setenv("KIT_PUBLISH_TIMEOUT", str(LONG_TIMEOUT_S))
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", str(LONG_TIMEOUT_S))
    started = time.monotonic()
    with Publisher(load()) as publisher, pytest.raises(BrokerRefused) as info:
        publisher.publish("test.record", ["x"])
    assert time.monotonic() - started < 10
    assert fragment in str(info.value)


# -- after a good start, the broker going away is not a start-up failure --------------------


def _connections(vhost: Vhost) -> set[str]:
    lines = rabbitmqctl("list_connections", "name", "vhost", "--no-table-headers").splitlines()
    return {line.rsplit("\t", 1)[0] for line in lines if line.endswith(f"\t{vhost.name}")}


def test_a_started_worker_keeps_reconnecting(kit_env, vhost, start_worker, tmp_path):
    start_worker(queues=("default",), concurrency=1)
    before = _connections(vhost)
    assert before
    rabbitmqctl("close_all_connections", "-p", vhost.name, "test: the broker goes away")

    def consuming_again() -> bool:
        return not (_connections(vhost) & before) and vhost.counts("default")[1] > 0

    wait_until(consuming_again, 60, "the worker to consume again on new connections", interval=0.5)
    with Publisher(load()) as publisher:
        publisher.publish("test.record", ["after the drop"])
    wait_until(lambda: recorded(tmp_path, "done") == ["after the drop"], 60, "the task to run")
