"""Tasks that misbehave on purpose, loaded by test workers via KIT_TASK_MODULES.

Each writes what happened as a line in a file under KIT_TEST_OUTPUT_DIR, so a
test can see runs that happened in other processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.app import app
from service.errors import PermanentError


def _record(kind: str, value: str) -> None:
    path = Path(os.environ["KIT_TEST_OUTPUT_DIR"]) / f"{kind}.log"
    with path.open("a") as f:
        f.write(value + "\n")


def recorded(output_dir: Path, kind: str) -> list[str]:
    """Lines recorded under ``kind`` so far."""
    path = output_dir / f"{kind}.log"
    return path.read_text().splitlines() if path.exists() else []


class Unfixable(Exception):
    """Declared non-retryable by ``test.declared_permanent``."""


@app.task(name="test.record", bind=True)
def record(self, marker: str, seconds: float = 0.0) -> str:
    """Record ``marker`` (after sleeping ``seconds``)."""
    _record("started", marker)
    time.sleep(seconds)
    _record("done", marker)
    return marker


@app.task(name="test.fail_always", bind=True, max_retries=2)
def fail_always(self, marker: str) -> None:
    """Fail with a transient-looking error every time."""
    _record("attempt", f"{marker}:{self.request.retries}")
    raise ConnectionError(f"upstream unavailable for {marker}")


@app.task(name="test.permanent", bind=True)
def permanent(self, marker: str) -> None:
    """Fail with PermanentError."""
    _record("attempt", marker)
    raise PermanentError(f"recipient {marker} does not exist")


@app.task(name="test.declared_permanent", bind=True, permanent_exceptions=(Unfixable,))
def declared_permanent(self, marker: str) -> None:
    """Fail with an exception the task declares non-retryable."""
    _record("attempt", marker)
    raise Unfixable(f"cannot fix {marker}")


@app.task(name="test.flaky", bind=True, max_retries=5)
def flaky(self, marker: str, failures: int) -> str:
    """Fail ``failures`` times, then succeed."""
    _record("attempt", f"{marker}:{self.request.retries}")
    if self.request.retries < failures:
        raise TimeoutError(f"attempt {self.request.retries} timed out")
    _record("done", marker)
    return marker


@app.task(name="test.retry_countdown", bind=True, max_retries=1)
def retry_countdown(self, marker: str) -> str:
    """Ask for one retry with an explicit countdown via self.retry()."""
    _record("attempt", f"{marker}:{self.request.retries}:{time.time()}")
    if self.request.retries == 0:
        raise self.retry(countdown=1.5)
    _record("done", marker)
    return marker


@app.task(name="test.sleep", bind=True, time_limit=2, soft_time_limit=1.5)
def sleep_forever(self, marker: str) -> None:
    """Ignore the soft time limit and sleep past the hard one."""
    _record("attempt", marker)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            time.sleep(0.1)
        except Exception:  # noqa: BLE001 - swallow SoftTimeLimitExceeded on purpose
            pass


@app.task(name="test.die", bind=True)
def die(self, marker: str) -> None:
    """Kill the worker process running this task, every time (a poison message)."""
    _record("attempt", marker)
    os._exit(9)


@app.task(name="test.typed", bind=True)
def typed(self, a: int, b: int) -> int:
    """Takes exactly two arguments."""
    _record("done", f"{a}+{b}")
    return a + b


class CardDeclined(Exception):
    """An exception that cannot be unpickled (two required arguments)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


@app.task(name="test.unpicklable_permanent", bind=True, permanent_exceptions=(CardDeclined,))
def unpicklable_permanent(self, marker: str) -> None:
    """Fail with a declared non-retryable exception that Celery must wrap to pickle."""
    _record("attempt", marker)
    raise CardDeclined("card_declined", f"for {marker}")


@app.task(name="test.until_fixed", bind=True, max_retries=1)
def until_fixed(self, marker: str) -> str:
    """Fail (a transient error) while the file ``fixed`` is missing from KIT_TEST_OUTPUT_DIR.

    Once the file exists, fail as many more times as the number it holds (none
    when it is empty), then succeed: a replayed task needs a fresh retry budget
    to get through a last hiccup after the fix.
    """
    output = Path(os.environ["KIT_TEST_OUTPUT_DIR"])
    _record("attempt", f"{marker}:{self.request.retries}")
    fixed = output / "fixed"
    if not fixed.exists():
        raise ConnectionError(f"downstream still broken for {marker}")
    _record("after_fix", marker)
    hiccups = int(fixed.read_text().strip() or 0)
    if recorded(output, "after_fix").count(marker) <= hiccups:
        raise TimeoutError(f"downstream warming up for {marker}")
    _record("done", marker)
    return marker


@app.task(name="test.secret_arguments", bind=True)
def secret_arguments(self, email: str, token: str) -> None:
    """Fail permanently while holding secrets in its arguments (not in its message): Sentry must not see them."""
    _record("attempt", self.request.id)
    raise PermanentError("the mail server refused the message")
