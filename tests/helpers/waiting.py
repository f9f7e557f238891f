"""Waiting in tests: ``wait_until`` a condition holds, ``wait_for_run`` until a one-shot probe succeeds."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from harness.waiting import wait_until

__all__ = ["wait_for_run", "wait_until"]


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
