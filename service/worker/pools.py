"""Time limits on pools that cannot enforce them: one warning at start, and the kit's own watchdog.

Celery enforces time limits only in the prefork pool: billiard raises
SoftTimeLimitExceeded in the child process at the soft limit and kills it at
the hard one. The other pools run tasks inside the worker process:

- ``threads`` and ``solo`` enforce nothing. The kit does it itself (best effort):
  a watchdog thread raises SoftTimeLimitExceeded in the task's thread at the
  soft limit and, at the hard limit, an exception that ``except Exception``
  does not catch, which the task then reports as TimeLimitExceeded (so it is
  dead-lettered as ``time-limit``, as on prefork). Python delivers such an
  exception only between bytecodes: a task blocked in one long C call (a
  ``time.sleep(60)``, a socket read without a timeout) or one that catches
  BaseException runs on. A thread cannot be killed, so such a task keeps its
  slot and its message until it returns; the watchdog logs an ERROR for it.
- ``eventlet`` and ``gevent``: Celery raises the hard limit at the task's next
  yield to the event loop; soft limits are not enforced.

At start a worker on one of these pools logs one WARNING line saying so
(``service.worker.task`` imports this module, which connects the signals).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from celery import concurrency
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import celeryd_after_setup, worker_init

logger = logging.getLogger(__name__)

#: Pools whose tasks run in threads of the worker process: the kit enforces their time limits.
THREAD_POOLS = frozenset({"threads", "solo"})
#: Green pools: Celery raises their hard limit at the next yield; soft limits are not enforced.
GREEN_POOLS = frozenset({"eventlet", "gevent"})
#: Seconds after the hard limit at which a task still running is logged as stuck.
OVERRUN_GRACE_S = 5.0

_state: dict[str, Any] = {"pool": None, "enforce": False, "warning": None}


class HardTimeLimit(BaseException):
    """Raised in a task's thread at its hard limit; a BaseException so ``except Exception`` does not swallow it.

    ``run_within_time_limits`` turns it into TimeLimitExceeded before the task's
    caller sees it.
    """


def pool_name(pool_cls: Any) -> str:
    """The alias (``prefork``, ``threads``, ``solo``, ...) of a worker's ``pool_cls``, a name or a class."""
    if isinstance(pool_cls, str):
        name = pool_cls.strip().lower()
        return "prefork" if name == "processes" else name
    if isinstance(pool_cls, type):
        target = f"{pool_cls.__module__}:{pool_cls.__qualname__}"
        for alias, path in concurrency.ALIASES.items():
            if path == target:
                return "prefork" if alias == "processes" else alias
        return target
    return "prefork" if pool_cls is None else str(pool_cls)


def warning_for(pool: str) -> str | None:
    """The one-line start-up warning for ``pool``; None for pools that enforce time limits (prefork)."""
    if pool in THREAD_POOLS:
        return (
            f"pool {pool!r} cannot enforce time limits: KIT_SOFT_TIME_LIMIT, KIT_HARD_TIME_LIMIT and per-task "
            "time limits are not enforced by the pool. The kit raises them in the task's thread instead, best "
            "effort: not inside a long C call (a sleep, a socket read), and a task that swallows them or is stuck "
            "keeps its slot until it returns, since a thread cannot be killed. Use -P prefork where limits must hold."
        )
    if pool in GREEN_POOLS:
        return (
            f"pool {pool!r} cannot enforce time limits: KIT_SOFT_TIME_LIMIT and per-task soft time limits are not "
            "enforced, and KIT_HARD_TIME_LIMIT and per-task hard limits only when the task yields to the event "
            "loop. Use -P prefork where limits must hold."
        )
    return None


def configure(pool: str) -> str | None:
    """Set this process up for ``pool``: the kit's watchdog on for threads/solo. Returns the warning (or None)."""
    _state.update(pool=pool, enforce=pool in THREAD_POOLS, warning=warning_for(pool))
    return _state["warning"]


@worker_init.connect
def _check_pool(sender: Any = None, **_: Any) -> None:
    """Worker start (main process, before the pool starts): which pool runs the tasks?"""
    configure(pool_name(getattr(sender, "pool_cls", None)))


@celeryd_after_setup.connect
def _warn_about_pool(**_: Any) -> None:
    """Log the pool's warning once logging is set up (worker_init comes before it), before consuming."""
    if _state["warning"]:
        logger.warning(_state["warning"])


# -- the watchdog (threads and solo pools) --------------------------------------------


def effective_time_limits(task: Any) -> tuple[float | None, float | None]:
    """(soft, hard) seconds of the running task: its message's ``timelimit``, else the task's own / the settings'."""
    limits = getattr(task.request, "timelimit", None) or (None, None)
    try:
        hard, soft = limits[0], limits[1]
    except (TypeError, IndexError, KeyError):
        hard = soft = None
    return _positive(soft or task.soft_time_limit), _positive(hard or task.time_limit)


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    return float(value)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    """Have ``thread_id`` raise ``exc`` at its next bytecode (None clears one still pending)."""
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                                      ctypes.py_object(exc) if exc is not None else None)


class _Run:
    """One task run under the watchdog: the thread and frame it runs in, and its deadlines."""

    def __init__(self, task: Any, soft: float | None, hard: float | None, frame: FrameType) -> None:
        now = time.monotonic()
        self.name = str(task.name)
        self.task_id = str(task.request.id)
        self.thread_id = threading.get_ident()
        self.frame: FrameType | None = frame
        self.soft, self.hard = soft, hard
        self.lock = threading.Lock()
        self.done = False
        self.pending: list[tuple[float, str]] = []
        if soft and (not hard or soft < hard):
            self.pending.append((now + soft, "soft"))
        if hard:
            self.pending += [(now + hard, "hard"), (now + hard + OVERRUN_GRACE_S, "overrun")]

    def _on_stack(self) -> bool:
        """Whether the run's frame is still on its thread's stack (so an exception lands in the task)."""
        frame = sys._current_frames().get(self.thread_id)
        while frame is not None:
            if frame is self.frame:
                return True
            frame = frame.f_back
        return False

    def fire(self, kind: str) -> None:
        """Deliver one deadline (the lock keeps it from racing the end of the run)."""
        with self.lock:
            if self.done or not self._on_stack():
                return
            pool = _state["pool"]
            if kind == "soft":
                logger.warning("Soft time limit (%ss) exceeded for %s[%s]: SoftTimeLimitExceeded raised in its "
                               "thread (pool %s)", f"{self.soft:g}", self.name, self.task_id, pool)
                _set_async_exc(self.thread_id, SoftTimeLimitExceeded)
            elif kind == "hard":
                logger.error("Hard time limit (%ss) exceeded for %s[%s]: TimeLimitExceeded raised in its thread "
                             "(the %s pool cannot kill it)", f"{self.hard:g}", self.name, self.task_id, pool)
                _set_async_exc(self.thread_id, HardTimeLimit)
            else:
                logger.error("%s[%s] still runs %ss past its hard time limit (%ss): the %s pool cannot stop it; "
                             "it keeps its slot and its message until it returns", self.name, self.task_id,
                             f"{OVERRUN_GRACE_S:g}", f"{self.hard:g}", pool)

    def finish(self) -> None:
        """The run ended: nothing fires any more, and an exception not yet delivered is withdrawn."""
        with self.lock:
            self.done = True
            self.frame = None
            _set_async_exc(self.thread_id, None)


class _Watchdog:
    """One daemon thread that delivers the deadlines of the runs in progress (at most the pool's concurrency)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs: set[_Run] = set()
        self._thread: threading.Thread | None = None

    def add(self, run: _Run) -> None:
        with self._cond:
            self._runs.add(run)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kit-time-limits", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, run: _Run) -> None:
        with self._cond:
            self._runs.discard(run)

    def _loop(self) -> None:
        while True:
            due: list[tuple[_Run, str]] = []
            with self._cond:
                now = time.monotonic()
                for run in self._runs:
                    while run.pending and run.pending[0][0] <= now:
                        due.append((run, run.pending.pop(0)[1]))
                if not due:
                    deadlines = [run.pending[0][0] for run in self._runs if run.pending]
                    self._cond.wait(min(deadlines) - now if deadlines else None)
                    continue
            for run, kind in due:
                try:
                    run.fire(kind)
                except Exception:  # noqa: BLE001 - the watchdog must outlive any one run
                    logger.exception("could not deliver the %s time limit of %s[%s]", kind, run.name, run.task_id)


_watchdog = _Watchdog()


def enforcing() -> bool:
    """Whether this process enforces time limits itself (a worker on the threads or solo pool)."""
    return bool(_state["enforce"])


def run_within_time_limits(task: Any, call: Callable[..., Any], args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
    """``call(*args, **kwargs)``, under the task's soft and hard time limits when this pool does not enforce them.

    A hard limit surfaces as TimeLimitExceeded. A limit that fires while the
    run is already ending is dropped: the task finished first.
    """
    if not _state["enforce"]:
        return call(*args, **kwargs)
    soft, hard = effective_time_limits(task)
    if soft is None and hard is None:
        return call(*args, **kwargs)
    run = _Run(task, soft, hard, sys._getframe())
    _watchdog.add(run)
    try:
        return call(*args, **kwargs)
    except HardTimeLimit:
        raise TimeLimitExceeded(hard) from None
    finally:
        _end(run)


def _end(run: _Run) -> None:
    """Finish ``run``; a limit delivered meanwhile is dropped (each run fires at most three times)."""
    for _ in range(4):
        try:
            run.finish()
            _watchdog.remove(run)
            return
        except (SoftTimeLimitExceeded, HardTimeLimit):
            continue
