"""Helpers for tests on a real RabbitMQ: vhosts, worker processes, waiting.

Each test gets its own vhost (created through the management API), so tests
never see each other's messages and the suite can run twice in a row.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import amqp

REPO = Path(__file__).resolve().parents[1]
AMQP_HOST = os.environ.get("KIT_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("KIT_TEST_AMQP_PORT", "5672"))
MANAGEMENT_URL = os.environ.get("KIT_TEST_MANAGEMENT_URL", "http://127.0.0.1:15672")
ADMIN_USER = os.environ.get("KIT_TEST_ADMIN_USER", "guest")
ADMIN_PASSWORD = os.environ.get("KIT_TEST_ADMIN_PASSWORD", "guest")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_run(
    run: Callable[[], subprocess.CompletedProcess[str]],
    succeeded: Callable[[subprocess.CompletedProcess[str]], bool],
    timeout: float,
    what: str,
) -> subprocess.CompletedProcess[str]:
    """Run a command again until ``succeeded`` says yes; return that run.

    For one-shot probes (a ping, a health check) that a loaded machine may answer
    late; on timeout the test fails with the last run's output.
    """
    runs: list[subprocess.CompletedProcess[str]] = []
    last_output = ["(no run finished)"]

    def attempt() -> bool:
        try:
            runs.append(run())
        except subprocess.TimeoutExpired as exc:  # a hung run counts as a failed one
            last_output[0] = f"(the run timed out after {exc.timeout:g}s)"
            return False
        last_output[0] = runs[-1].stdout + runs[-1].stderr
        return succeeded(runs[-1])

    try:
        wait_until(attempt, timeout, what, interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last run printed:\n{last_output[0]}") from None
    return runs[-1]


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


def spawn(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a long-running process for a test in its own process group, bound to the test run.

    Run from the test's (main) thread, the process gets SIGTERM from the kernel
    when pytest exits, also on kill -9 (``setpriv --pdeathsig``, util-linux), so a
    run killed before its teardown leaves no worker, beat, Prometheus or broker
    behind; a worker then shuts down warm, after its running task. Without
    setpriv the process is not bound. Its process group is its own, so a test can
    signal it and its children together with ``os.killpg(process.pid, ...)``.
    """
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return subprocess.Popen(list(argv), start_new_session=True, **popen_kwargs)
    process = subprocess.Popen([setpriv, "--pdeathsig", "TERM", "--", *argv], start_new_session=True, **popen_kwargs)
    _wait_past_setpriv(process, os.path.realpath(setpriv))
    return process


def _wait_past_setpriv(process: subprocess.Popen[bytes], setpriv: str, timeout: float = 10.0) -> None:
    """Return once ``process`` has exec'd past setpriv, so its death signal is armed.

    The kernel arms the signal only while the parent lives: had this run died
    between Popen and setpriv's prctl (seen once in 40 kills on a loaded
    machine), the process would have outlived it. So ``spawn`` returns only
    after setpriv has replaced itself with the command.
    """
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{process.pid}/exe") != setpriv:
                return
        except PermissionError:  # setpriv's own image is readable: this is the command's
            return
        except OSError:  # exiting, or between images
            pass
        time.sleep(0.001)


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q`` on the local test broker and return its output."""
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True).stdout


#: Test vhosts are named ``kit-test-<unix time of creation>-<random>``.
TEST_VHOST_PREFIX = "kit-test-"
#: A test vhost older than this belongs to a run that died before its teardown.
STALE_VHOST_AGE = 3 * 3600


def sweep_stale_vhosts(max_age: float = STALE_VHOST_AGE, now: float | None = None) -> list[str]:
    """Delete the test vhosts that a killed test run left behind; return their names.

    Only vhosts whose name carries a creation time older than ``max_age`` are
    touched, so a test run going on beside this one keeps its vhosts. Does
    nothing when the management API cannot be reached (unit tests without a broker).
    """
    now = time.time() if now is None else now
    try:
        names = [v["name"] for v in management("GET", "/api/vhosts")]
    except OSError:  # URLError included
        return []
    stale = []
    for name in names:
        created = name.removeprefix(TEST_VHOST_PREFIX).split("-")[0] if name.startswith(TEST_VHOST_PREFIX) else ""
        if created.isdigit() and now - int(created) > max_age:
            delete_vhost(name)
            stale.append(name)
    return stale


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


class Worker:
    """A real ``celery worker`` process of the kit, in its own process group."""

    def __init__(self, env: dict[str, str], queues: Sequence[str] = ("urgent", "default", "bulk"),
                 concurrency: int = 2, extra_args: Sequence[str] = ()) -> None:
        self.env = env
        self.queues = list(queues)
        self.name = f"w{uuid.uuid4().hex[:6]}@%h"
        self.log_path = Path(env["KIT_TEST_OUTPUT_DIR"]) / f"worker-{uuid.uuid4().hex[:6]}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "service.app", "worker",
            "-Q", ",".join(self.queues), "-c", str(concurrency), "-n", self.name,
            "--without-gossip", "--without-mingle", "-l", "INFO", *extra_args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = spawn(argv, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, vhost: Vhost, timeout: float = 60) -> Worker:
        """Wait until the worker consumes all its queues."""
        def consuming() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            try:
                return all(vhost.counts(q)[1] > 0 for q in self.queues)
            except amqp.exceptions.NotFound:
                return False
        wait_until(consuming, timeout, "the worker to consume its queues", interval=0.2)
        return self

    def log(self) -> str:
        """Everything the worker printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (warm shutdown) and wait for the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self._wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool children."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._wait(30)

    def _wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Stop the worker whatever its state (test teardown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # cold shutdown: unacked messages return to the queue
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not self._log.closed:
            self._log.close()


@contextlib.contextmanager
def running_beat(env: dict[str, str], log_path: Path) -> Iterator[Callable[[], None]]:
    """Run real ``celery beat`` with ``env``; yield a check that fails the test if beat has exited.

    Beat is stopped (SIGTERM, then SIGKILL of its process group) when the block ends.
    """
    with log_path.open("wb") as log:
        beat = spawn([sys.executable, "-m", "celery", "-A", "service.app", "beat", "-l", "INFO"],
                     env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

        def still_running() -> None:
            if beat.poll() is not None:
                raise AssertionError(f"beat exited with {beat.returncode}:\n{log_path.read_text(errors='replace')}")

        try:
            yield still_running
        finally:
            if beat.poll() is None:
                beat.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    beat.wait(10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(beat.pid, signal.SIGKILL)  # and anything it left in its group
            beat.wait(10)
