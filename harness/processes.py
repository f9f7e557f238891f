"""Processes started for a test or a benchmark, bound to the run so none outlives it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any


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
    wait_past_setpriv(process, os.path.realpath(setpriv))
    return process


def wait_past_setpriv(process: subprocess.Popen[bytes], setpriv: str, timeout: float = 10.0) -> None:
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
