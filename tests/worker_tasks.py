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


@app.task(name="test.accept_anything", bind=True)
def accept_anything(self, *args, **kwargs) -> None:
    """Take any arguments; record the message's AMQP message_id (the test's marker) and task id."""
    properties = getattr(self.request, "properties", None) or {}
    _record("ran", f"{properties.get('message_id')} {self.request.id}")


@app.task(name="test.record_waits", bind=True)
def record_waits(self, marker: str) -> None:
    """Record ``marker``, the time it ran and how many broker waits its message made (kit-waits)."""
    _record("waits", f"{marker}:{time.time()}:{getattr(self.request, 'kit-waits', 0) or 0}")


@app.task(name="test.record_bulk", bind=True, queue="bulk")
def record_bulk(self, marker: str) -> None:
    """Record ``marker``; declared with ``queue="bulk"`` as Celery's docs show."""
    _record("done", marker)


# -- Celery's retry options (tests/test_retry_options.py) ----------------------------------
#
# Each records ``<marker>:<retries>:<epoch seconds>`` under "runs" when it starts,
# so a test can count the runs of one message and the delays between them.

from celery.exceptions import SoftTimeLimitExceeded  # noqa: E402 - grouped with the tasks that use it


def _run(marker: str, retries: int) -> None:
    _record("runs", f"{marker}:{retries}:{time.time()}")


class PaymentError(Exception):
    """The tutorial's error: ``is_retriable`` says whether another attempt can help."""

    def __init__(self, message: str, is_retriable: bool = False) -> None:
        super().__init__(message, is_retriable)
        self.is_retriable = is_retriable

    def __str__(self) -> str:
        return str(self.args[0])


@app.task(name="opt.autoretry", bind=True, autoretry_for=(ConnectionError,), max_retries=5,
          retry_kwargs={"max_retries": 2, "countdown": 1})
def opt_autoretry(self, marker: str, error: str) -> None:
    """autoretry_for=(ConnectionError,), retry_kwargs max_retries 2 / countdown 1 s; raises ``error`` every run."""
    _run(marker, self.request.retries)
    raise {"ConnectionError": ConnectionError, "ValueError": ValueError}[error](f"{error} in {marker}")


@app.task(name="opt.backoff", bind=True, autoretry_for=(TimeoutError,), max_retries=3, retry_backoff=True,
          retry_backoff_max=2, retry_jitter=False)
def opt_backoff(self, marker: str) -> None:
    """retry_backoff=True (factor 1), retry_backoff_max=2, no jitter: waits 1, 2, 2 s."""
    _run(marker, self.request.retries)
    raise TimeoutError(f"slow upstream for {marker}")


@app.task(name="opt.backoff_jitter", bind=True, autoretry_for=(TimeoutError,), max_retries=3, retry_backoff=1,
          retry_backoff_max=2)
def opt_backoff_jitter(self, marker: str) -> None:
    """retry_backoff=1, retry_backoff_max=2, with Celery's full jitter: waits 0-1, 0-2, 0-2 s."""
    _run(marker, self.request.retries)
    raise TimeoutError(f"slow upstream for {marker}")


@app.task(name="opt.kit_style_delay", bind=True, max_retries=1, default_retry_delay=2)
def opt_kit_style_delay(self, marker: str) -> None:
    """Kit style (raise to retry) with max_retries=1 and default_retry_delay=2."""
    _run(marker, self.request.retries)
    raise OSError(f"disk busy for {marker}")


@app.task(name="opt.kit_policy", bind=True)
def opt_kit_policy(self, marker: str) -> None:
    """No retry options at all: a plain raise follows the kit's policy (KIT_MAX_RETRIES, KIT_RETRY_BACKOFF_*)."""
    _run(marker, self.request.retries)
    raise KeyError(f"missing row for {marker}")


@app.task(name="opt.self_retry", bind=True, max_retries=5)
def opt_self_retry(self, marker: str) -> None:
    """self.retry(countdown=1, max_retries=2) overrides the task's max_retries=5."""
    _run(marker, self.request.retries)
    try:
        raise ConnectionError(f"upstream down for {marker}")
    except ConnectionError as exc:
        raise self.retry(exc=exc, countdown=1, max_retries=2) from None


@app.task(name="opt.self_retry_default_delay", bind=True, max_retries=1, default_retry_delay=1)
def opt_self_retry_default_delay(self, marker: str) -> None:
    """self.retry() without a countdown waits the declared default_retry_delay (1 s)."""
    _run(marker, self.request.retries)
    raise self.retry(exc=ConnectionError(f"upstream down for {marker}"))


@app.task(name="opt.retry_no_throw", bind=True, max_retries=1)
def opt_retry_no_throw(self, marker: str) -> str:
    """self.retry(countdown=1, throw=False), then return: as in Celery, the retry still happens."""
    _run(marker, self.request.retries)
    if self.request.retries == 0:
        self.retry(countdown=1, throw=False)
        return "retry requested"
    _record("done", marker)
    return marker


@app.task(name="opt.process_payment", bind=True, max_retries=3)
def opt_process_payment(self, marker: str, retriable: bool) -> None:
    """The tutorial's manual retry: retriable errors via self.retry(countdown), the others re-raised (fail now)."""
    _run(marker, self.request.retries)
    try:
        raise PaymentError(f"card processor said no for {marker}", is_retriable=retriable)
    except PaymentError as e:
        if e.is_retriable:
            raise self.retry(exc=e, countdown=1)  # noqa: B904 - the tutorial's shape, kept on purpose
        else:
            raise


@app.task(name="opt.soft_limit_reraised", bind=True, soft_time_limit=1, time_limit=5)
def opt_soft_limit_reraised(self, marker: str) -> None:
    """Clean up on SoftTimeLimitExceeded and re-raise it: dead-lettered as time-limit, not retried."""
    _run(marker, self.request.retries)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(0.05)
    except SoftTimeLimitExceeded:
        _record("cleaned_up", marker)
        raise


@app.task(name="opt.soft_limit_listed", bind=True, soft_time_limit=1, time_limit=5,
          autoretry_for=(SoftTimeLimitExceeded,), max_retries=1, retry_kwargs={"countdown": 0.5})
def opt_soft_limit_listed(self, marker: str) -> None:
    """autoretry_for names SoftTimeLimitExceeded: a soft time limit is retried."""
    _run(marker, self.request.retries)
    deadline = time.time() + 10
    while time.time() < deadline:
        time.sleep(0.05)


@app.task(name="opt.threads_soft", bind=True, soft_time_limit=1, time_limit=3)
def opt_threads_soft(self, marker: str) -> None:
    """Loops past its soft limit; on the threads pool the kit raises SoftTimeLimitExceeded in it."""
    _run(marker, self.request.retries)
    deadline = time.time() + 10
    while time.time() < deadline:
        time.sleep(0.05)
    _record("done", marker)


@app.task(name="opt.threads_hard", bind=True, soft_time_limit=1, time_limit=2)
def opt_threads_hard(self, marker: str) -> None:
    """Swallows every Exception (the soft limit too); only the hard limit stops it."""
    _run(marker, self.request.retries)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            time.sleep(0.05)
        except Exception:  # noqa: BLE001 - swallow SoftTimeLimitExceeded on purpose
            _record("swallowed", marker)
    _record("done", marker)
