"""The local stack's processes: start, stop, health checks, and the pid files that track them.

``start`` runs a component in a session of its own, its output appended to
KIT_STATE_DIR/log/NAME.log, and writes KIT_STATE_DIR/run/NAME.pid: the pid and
the kernel's start time of that process. A process whose start time differs
from its pid file's is not the stack's, so a reused pid is never signalled.
``stop`` sends SIGTERM to the process, and after the grace period SIGKILL to
whatever is left of its process group; it stops only processes the stack
started. ``locked`` allows one ``up`` or ``down`` at a time per state directory.
``save_options`` and ``saved_options`` keep the options of the last ``up`` in
KIT_STATE_DIR/run/stack.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service.stack.compose import DEFAULT_STOP_GRACE
from service.stack.model import REPO, Component, Options, Stack, StackError


def start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _pid_file(stack: Stack, name: str) -> Path:
    return stack.run_dir / f"{name}.pid"


def running_pid(stack: Stack, name: str) -> int | None:
    """The pid of a component this stack started, if that very process still runs."""
    try:
        pid_text, _, started = _pid_file(stack, name).read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    now = start_time(pid)
    if now is None or (started and now != started):
        return None
    return pid


def start(stack: Stack, component: Component) -> tuple[int, bool]:
    """Start a component unless it runs; returns (pid, started_now)."""
    pid = running_pid(stack, component.name)
    if pid:
        return pid, False
    venv = stack.local_services.get(component.name, {}).get("venv")
    if venv and not (REPO / venv / "bin" / "python").is_file():
        raise StackError(f"{component.name}: the virtual environment {venv} is missing; run scripts/install.sh")
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    with (stack.log_dir / f"{component.name}.log").open("ab") as log:
        try:
            process = subprocess.Popen(component.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, env=dict(component.env))
        except OSError as exc:
            raise StackError(f"{component.name}: cannot run {component.argv[0]} ({exc.strerror}); "
                             "run scripts/install.sh") from None
    started = start_time(process.pid) or ""
    tmp = _pid_file(stack, component.name).with_suffix(".tmp")
    tmp.write_text(f"{process.pid} {started}\n")
    tmp.replace(_pid_file(stack, component.name))
    return process.pid, True


def stop(stack: Stack, component: Component, timeout: float | None = None) -> bool:
    """Stop a component this stack started, as Docker does: SIGTERM to the process
    (a worker's warm shutdown), SIGKILL to its process group after its stop_grace_period."""
    return stop_name(stack, component.name, component.stop_timeout if timeout is None else timeout)


def started_names(stack: Stack) -> list[str]:
    """Components with a pid file, including ones docker-compose.yml no longer lists."""
    return sorted(p.stem for p in stack.run_dir.glob("*.pid")) if stack.run_dir.is_dir() else []


def stop_name(stack: Stack, name: str, timeout: float = DEFAULT_STOP_GRACE) -> bool:
    """Stop the process of pid file ``name`` if this stack started it and it still runs."""
    pid = running_pid(stack, name)
    pid_file = _pid_file(stack, name)
    if not pid:
        pid_file.unlink(missing_ok=True)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and start_time(pid) is not None:
        time.sleep(0.2)
    try:  # whatever is left of its process group (pool processes of a killed worker)
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    pid_file.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def locked(stack: Stack) -> Iterator[None]:
    """One `up` or `down` at a time per state directory."""
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    with (stack.run_dir / "stack.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(f"another `stack up` or `stack down` runs on {stack.state_dir}") from None
        yield


def wait_healthy(stack: Stack, components: list[Component], timeout: float,
                 on_change: Callable[[str, bool, str], None] | None = None) -> dict[str, tuple[bool, str]]:
    """Probe until every component is healthy or ``timeout`` passes; name -> (healthy, detail)."""
    deadline = time.monotonic() + timeout
    results: dict[str, tuple[bool, str]] = {}
    exited: set[str] = set()
    while True:
        for c in components:
            if results.get(c.name, (False, ""))[0] or c.name in exited:
                continue
            results[c.name] = health(stack, c)
            if not running_pid(stack, c.name):  # it will not get healthy by waiting
                exited.add(c.name)
                results[c.name] = (False, f"exited; see {stack.log_dir / (c.name + '.log')}")
            if on_change and results[c.name][0]:
                on_change(c.name, True, results[c.name][1])
        pending = [n for n, (ok, _) in results.items() if not ok and n not in exited]
        if not pending or time.monotonic() > deadline:
            return results
        time.sleep(1)


def health(stack: Stack, component: Component) -> tuple[bool, str]:
    """(healthy, detail) of a component: it runs, and passes its compose health check."""
    if not running_pid(stack, component.name):
        return False, "not running"
    if component.probe is None:
        return True, "running (no health check)"
    return component.probe.check(component.env)


def save_options(stack: Stack) -> None:
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    (stack.run_dir / "stack.json").write_text(json.dumps(stack.options.as_dict(), indent=2) + "\n")


def saved_options(state_dir: Path) -> Options | None:
    """The options of the last ``up`` in this state directory."""
    try:
        data = json.loads((Path(state_dir) / "run" / "stack.json").read_text())
    except (OSError, ValueError):
        return None
    return Options(**{k: data.get(k) for k in ("vhost", "user_prefix")},
                   port_offset=int(data.get("port_offset") or 0), demo=bool(data.get("demo")),
                   cluster=int(data.get("cluster") or 0))
