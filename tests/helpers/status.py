"""Helpers of the task status and cancel tests: publish, wait for a state, run a command."""

from __future__ import annotations

import subprocess
import sys

from harness.broker import REPO
from harness.waiting import wait_until
from service.client import Publisher
from service.status import TaskStatus, status

__all__ = ["STATUS_TASK_MODULES", "publish", "run_cli", "wait_state"]

#: KIT_TASK_MODULES of the workers of these tests: the test tasks and the status tests' own.
STATUS_TASK_MODULES = "tests.worker_tasks,tests.status_tasks"


def publish(name: str, *args: object, **options: object) -> str:
    """Publish one task with a fresh Publisher (of this test's settings); its id."""
    with Publisher() as publisher:
        return publisher.publish(name, list(args), **options)  # type: ignore[arg-type]


def wait_state(task_id: str, state: str, timeout: float = 30) -> TaskStatus:
    """Poll ``status`` until the task is in ``state``; fail at once if it ends in another final state."""
    seen: list[str] = []

    def reached() -> TaskStatus | None:
        found = status(task_id)
        if not seen or seen[-1] != found.state:
            seen.append(found.state)
        if found.state == state:
            return found
        if found.final:
            raise AssertionError(f"task {task_id} ended {found.state}, not {state}: {found}")
        return None

    try:
        return wait_until(reached, timeout, f"task {task_id} to be {state}", interval=0.02)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (states seen: {seen})") from None


def run_cli(env: dict[str, str] | None, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m service ARGS`` with ``env``; its output."""
    return subprocess.run([sys.executable, "-m", "service", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
