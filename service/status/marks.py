"""``QueuedMarker``: publishers record "queued" for what they published, off the caller's path.

``Publisher`` and ``AsyncPublisher`` call ``add(task_id, name)`` after each
confirmed publish. The call only appends to a list; a daemon thread writes
the batch with one pipeline of ``SET NX`` (so a later state, written by a
worker that was faster, is never overwritten) with KIT_RESULT_EXPIRES.
A forked child (gunicorn's workers after a preloaded app) gets its own list
and thread. When Redis is down the batch is dropped after one short timeout
(logged); the task runs all the same, only its "queued" state is missing.
Without a Redis KIT_RESULT_BACKEND everything is a no-op.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque

from service.settings import Settings, load
from service.status.store import BEST_EFFORT_TIMEOUT_S, StateStore

#: Most task ids waiting to be written; past it the oldest are dropped (Redis is then far behind or down).
MAX_PENDING = 100_000
#: Most task ids written by one pipeline.
BATCH = 1000
#: Seconds the writer waits after the first id of a batch, so the ids of a burst share one pipeline.
GATHER_S = 0.005


class QueuedMarker:
    """Writes the "queued" state of published tasks in the background (see the module docstring)."""

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or load()
        self._store = StateStore.from_settings(settings, timeout=BEST_EFFORT_TIMEOUT_S)
        self._thread: threading.Thread | None = None
        self._reset()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (marker := ref()) is not None and marker._reset())

    def _reset(self) -> None:
        """Fresh lock, list and counters: at start, and in a forked child (whose copy of the lock may be
        held by a thread that does not exist there)."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits on it for ids
        self._written = threading.Condition(self._lock)  # flush() waits on it for the writer
        self._pending: deque[tuple[str, str]] = deque(maxlen=MAX_PENDING)
        self._added = 0  # ids handed to add(), in this process
        self._done = 0  # ids written or dropped, in this process
        self._thread = None

    @property
    def enabled(self) -> bool:
        """Whether there is a Redis backend to write to."""
        return self._store is not None

    def add(self, task_id: str, name: str) -> None:
        """Record that ``task_id`` (task ``name``) was published. Never blocks on Redis, never raises."""
        if self._store is None:
            return
        try:
            with self._lock:
                self._ensure_thread()
                if len(self._pending) == MAX_PENDING:
                    self._done += 1  # the oldest falls out of the deque
                self._pending.append((task_id, name))
                self._added += 1
                if len(self._pending) == 1:
                    self._work.notify()  # the writer sleeps only when nothing is waiting
        except Exception:  # noqa: BLE001 - a state is telemetry: the publish succeeded
            pass

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything added so far (in this process) is written or dropped; False on timeout."""
        if self._store is None:
            return True
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._added
            while self._done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._written.wait(remaining)
        return True

    def _ensure_thread(self) -> None:
        """Start this process's writer thread (a forked child starts its own). Holds ``_lock``."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="kit-queued-marker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._store is not None
        while True:
            with self._lock:
                while not self._pending:
                    self._work.wait()
            time.sleep(GATHER_S)  # let a burst gather: one pipeline for many publishes, not one each
            with self._lock:
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            self._store.record_queued(batch)  # logs and drops the batch when Redis fails
            with self._lock:
                self._done += len(batch)
                self._written.notify_all()
