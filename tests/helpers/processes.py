"""Real processes of the kit for tests: ``celery worker`` and ``celery beat``, bound to the run (``spawn``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import amqp

from harness.broker import REPO, Vhost
from harness.processes import spawn
from harness.waiting import wait_until

__all__ = ["Beat", "Worker", "running_beat", "spawn"]


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


class Beat:
    """A real ``celery beat`` process of the kit (log level INFO) in its own process group, its output in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = spawn([sys.executable, "-m", "celery", "-A", "service.app", "beat", "-l", "INFO"],
                             env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        """The beat process's pid (Celery names it in a task's ``origin`` header: ``gen<pid>@<host>``)."""
        return self.process.pid

    def log(self) -> str:
        """Everything beat printed so far (also after ``stop``)."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> str:
        """Wait until ``text`` is in the log (failing at once if beat exits); returns the first line with it."""
        def logged() -> str | None:
            log = self.log()
            if text in log:
                return next(line for line in log.splitlines() if text in line)
            if self.process.poll() is not None:
                raise AssertionError(f"beat exited with {self.process.returncode}:\n{log}")
            return None
        return wait_until(logged, timeout, f"beat to log {text!r}", interval=0.02)

    def kill(self) -> None:
        """SIGKILL its process group and wait for it to end."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def pause(self) -> None:
        """SIGSTOP: beat hangs (its connections stay open and silent) until ``resume``."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop beat whatever its state (test teardown): SIGCONT, SIGTERM, then SIGKILL of its group."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
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
