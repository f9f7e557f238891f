"""The local stack without Docker: workers, beat and demo traffic as background processes.

``up`` starts what is not running yet (so running it twice is harmless),
``down`` stops only the processes it started (tracked by pid files in
KIT_STATE_DIR/run), ``status`` says what runs. RabbitMQ itself is started by
``scripts/broker.sh``, which ``up`` calls when the broker is not reachable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Component:
    """One long-running process of the stack."""

    name: str
    argv: tuple[str, ...]
    description: str
    env: tuple[tuple[str, str], ...] = ()


def components(demo: bool = False, demo_count: int = 300, demo_rate: float = 5.0) -> list[Component]:
    """The processes of the local stack. Urgent work has a worker of its own so
    it never waits behind bulk work."""
    py = (sys.executable, "-m", "service")
    items = [
        # Metrics ports match deploy/prometheus/targets/kit-workers.json.
        Component("worker-urgent", (*py, "worker", "--queues", "urgent", "--concurrency", "1",
                                    "--name", "urgent@%h"), "worker for the urgent queue",
                  env=(("KIT_METRICS_PORT", "9810"),)),
        Component("worker-default-bulk", (*py, "worker", "--queues", "default,bulk",
                                          "--name", "default-bulk@%h"), "worker for default and bulk",
                  env=(("KIT_METRICS_PORT", "9811"),)),
        Component("beat", (*py, "beat"), "Celery beat (periodic clean-up)"),
    ]
    if demo:
        items.append(Component("demo", (*py, "demo", "--count", str(demo_count), "--rate", str(demo_rate)),
                               "demo traffic"))
    return items


def _paths(settings: Settings, name: str) -> tuple[Path, Path]:
    run_dir, log_dir = settings.state_dir / "run", settings.state_dir / "log"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    return run_dir / f"{name}.pid", log_dir / f"{name}.log"


def running_pid(settings: Settings, name: str) -> int | None:
    """The pid of a component this stack started, if it still runs."""
    pid_file, _ = _paths(settings, name)
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        return pid
    return pid


def start(settings: Settings, component: Component) -> tuple[int, bool]:
    """Start a component unless it runs; returns (pid, started_now)."""
    pid = running_pid(settings, component.name)
    if pid:
        return pid, False
    pid_file, log_file = _paths(settings, component.name)
    with log_file.open("ab") as log:
        process = subprocess.Popen(component.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, **dict(component.env)})
    pid_file.write_text(str(process.pid))
    return process.pid, True


def stop(settings: Settings, name: str, timeout: float = 60) -> bool:
    """SIGTERM (warm shutdown) a component this stack started; SIGKILL after ``timeout``."""
    pid = running_pid(settings, name)
    pid_file, _ = _paths(settings, name)
    if not pid:
        pid_file.unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True
