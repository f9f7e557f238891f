"""The test harness cleans up after test runs that were killed before their teardown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, STALE_VHOST_AGE, Vhost, management, sweep_stale_vhosts, wait_until


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) binds spawned processes")
def test_processes_spawned_by_a_killed_run_end_with_it():
    run = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from tests.helpers import spawn\n"
         "child = spawn(['sleep', '600'])\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(600)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    child = None
    try:
        child = int(run.stdout.readline())
        assert _alive(child)
        run.send_signal(signal.SIGKILL)
        run.wait(10)
        wait_until(lambda: not _alive(child), 10, f"the spawned process {child} to end with its test run")
    finally:
        run.kill()
        run.wait(10)
        run.stdout.close()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.broker
def test_sweep_removes_only_stale_test_vhosts():
    old, fresh = Vhost(created=time.time() - STALE_VHOST_AGE - 60), Vhost()
    try:
        swept = sweep_stale_vhosts()
        assert old.name in swept
        assert fresh.name not in swept
        live = {v["name"] for v in management("GET", "/api/vhosts")}
        assert old.name not in live and fresh.name in live
    finally:
        old.delete()
        fresh.delete()
