"""Tasks of the status and cancel tests (tests/test_task_status.py, tests/test_revoke.py), loaded by
their workers through KIT_TASK_MODULES beside tests.worker_tasks.

Each waits for a file the test creates (a condition, with a deadline), so the
test sees the task in each state for as long as it needs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.app import app
from tests.worker_tasks import _record

#: Seconds a task waits for the test's go-ahead before it gives up.
GO_AHEAD_TIMEOUT_S = 60


def go_ahead(output_dir: Path, marker: str, step: str) -> None:
    """Let task ``marker`` past ``step`` (the test's side)."""
    (output_dir / f"go-{marker}-{step}").touch()


def _wait_for(marker: str, step: str) -> None:
    path = Path(os.environ["KIT_TEST_OUTPUT_DIR"]) / f"go-{marker}-{step}"
    deadline = time.monotonic() + GO_AHEAD_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go-ahead {path.name} within {GO_AHEAD_TIMEOUT_S}s")
        time.sleep(0.02)


@app.task(name="test.status_steps", bind=True, retry_on_raise=False)
def status_steps(self, marker: str) -> dict:
    """Run (waiting for ``started``), report PROGRESS (waiting for ``progressed``), then return a result."""
    _record("started", marker)
    _wait_for(marker, "started")
    self.update_state(state="PROGRESS", meta={"done": 1, "total": 2, "marker": marker})
    _wait_for(marker, "progressed")
    return {"marker": marker, "rows": 2}


@app.task(name="test.status_retry_later", bind=True, max_retries=3)
def status_retry_later(self, marker: str, countdown: float) -> str:
    """Ask for a retry in ``countdown`` seconds on its first run; succeed on the next."""
    _record("attempt", f"{marker}:{self.request.retries}")
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError(f"{marker} not reachable yet"), countdown=countdown)
    _record("done", marker)
    return marker
