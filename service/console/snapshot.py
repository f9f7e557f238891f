"""What the console shows without reading the broker on every page view: a snapshot of each queue.

A background thread (``Refresher``) reads each dead-letter queue with the
library's unacked walk (``service.deadletters.Walk``), under the queue's lock,
and keeps one small ``Row`` per letter and the queue's statistics. A queue is
read again when its message count changed, when its snapshot is older than
``STALE_AFTER`` refresh periods, after a replay or purge of the console, and
when someone asks (the overview's refresh button). Every refresh period it
also reads the depth and consumers of every queue (a passive declare each).
Page views filter and count the rows in memory, so the overview of 100,000
letters costs what counting them does, not a walk of the queues.

The lock keeps a replay of the CLI from running while the console reads (the
letters a walk holds unacked are invisible to another reader); a CLI replay
that starts meanwhile is refused with the console named as the holder. The
console's own replays and purges wait for the read to end (``exclusive``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service import deadletters as dl
from service import queues
from service.settings import Settings

logger = logging.getLogger(__name__)

#: A snapshot older than this many refresh periods is read again even if the count is the same (a letter
#: replaced by another); rare, because every read holds the queue's lock (a CLI replay meanwhile is refused).
STALE_AFTER = 20
#: The longest a message of a row keeps (the letter's page shows all of it).
MESSAGE_CHARS = 300
#: Seconds a console replay or purge waits for the snapshot's read of its queue to end.
EXCLUSIVE_WAIT_S = 120.0
HOLDER = "the console's overview refresh (read only, a few seconds)"


class ConsoleBusy(dl.DeadLetterError):
    """The console's own read, replay or purge of a queue did not end in time."""


@dataclass(slots=True)
class Row:
    """One dead letter as lists show it. It has the attributes ``Filters.match`` reads."""

    queue: str
    position: int
    id: str
    task: str
    reason: str
    exception_type: str
    exception_message: str
    attempts: int
    replays: int
    source_queue: str
    routing_key: str
    died_at: datetime | None

    @classmethod
    def of(cls, letter: dl.DeadLetter) -> Row:
        """The row of ``letter``."""
        return cls(letter.queue, letter.position, letter.id, letter.task, letter.reason, letter.exception_type,
                   letter.exception_message[:MESSAGE_CHARS], letter.attempts, letter.replays, letter.source_queue,
                   letter.routing_key, letter.died_at)


@dataclass
class QueueSnapshot:
    """The last read of one dead-letter queue."""

    queue: str
    rows: list[Row] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    taken_at: float | None = None  # time.time() of the read; None: never read
    read_seconds: float = 0.0
    count_now: int | None = None  # the message count at the last refresh period
    consumers: int = 0
    error: str | None = None
    holder: str | None = None  # who held the lock when the console last tried to read it


@dataclass(frozen=True)
class WorkQueue:
    """Depth and consumers of a work queue at the last refresh period."""

    name: str
    messages: int | None
    consumers: int | None


class Refresher:
    """Keeps ``snapshots`` of every dead-letter queue and the work queues' depths up to date."""

    def __init__(self, settings: Settings, period: float | None = None) -> None:
        self.settings = settings
        self.period = period or settings.console_refresh
        self.names = list(queues.DEAD_LETTER_QUEUE_NAMES)
        self.snapshots: dict[str, QueueSnapshot] = {name: QueueSnapshot(name) for name in self.names}
        self.work_queues: list[WorkQueue] = []
        self.broker_error: str | None = None
        self._locks = {name: threading.Lock() for name in self.names}
        self._wanted: set[str] = set(self.names)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0  # refresh periods completed (tests and the benchmark wait on it)

    # -- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (reads every queue at once)."""
        self._thread = threading.Thread(target=self._run, name="console-refresh", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def request(self, *names: str) -> None:
        """Read ``names`` (all when none) again soon."""
        self._wanted.update(names or self.names)
        self._wake.set()

    def wait_round(self, timeout: float) -> bool:
        """Wait until a refresh period that started after this call has completed (False at the deadline)."""
        target = self.rounds + 2
        deadline = time.monotonic() + timeout
        while self.rounds < target:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    @contextmanager
    def exclusive(self, name: str, timeout: float = EXCLUSIVE_WAIT_S) -> Iterator[None]:
        """Keep the refresher off queue ``name`` (a console replay or purge runs); it is read again after."""
        if not self._locks[name].acquire(timeout=timeout):
            raise ConsoleBusy(f"the console is still reading {name!r} or running a replay or purge of it "
                              f"(waited {timeout:.0f} s); try again when it has finished")
        try:
            yield
        finally:
            self._locks[name].release()
            self.request(name)

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        from service.topology import connect

        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = connect(self.settings)
                self._refresh(conn)
                self.broker_error = None
            except Exception as exc:  # noqa: BLE001 - a broker outage: shown on the pages, tried again
                self.broker_error = str(exc) or exc.__class__.__name__
                logger.warning("console: cannot read the queues: %s", self.broker_error)
                if conn is not None:
                    try:
                        conn.release()
                    except Exception:  # noqa: BLE001 - the connection is gone already
                        pass
                conn = None
            self.rounds += 1
            self._wake.wait(self.period)
            self._wake.clear()
        if conn is not None:
            conn.release()

    def _refresh(self, conn: Any) -> None:
        counts = {name: _depth(conn, name) for name in self.names}
        self.work_queues = [WorkQueue(name, *_depth(conn, name)) for name in self._work_queue_names()]
        now = time.time()
        for name in self.names:
            snapshot = self.snapshots[name]
            messages, consumers = counts[name]
            snapshot.count_now, snapshot.consumers = messages, consumers or 0
            stale = snapshot.taken_at is None or now - snapshot.taken_at > STALE_AFTER * self.period
            if name in self._wanted or stale or messages != snapshot.stats.get("count"):
                self._read(conn, snapshot)

    def _work_queue_names(self) -> list[str]:
        profile = queues.topology(self.settings.queue_type)
        return [queue.name for queue in profile.all_queues if queue.name in queues.WORK_QUEUE_NAMES
                or queue.name.endswith(queues.HIGH_LANE_SUFFIX)]

    def _read(self, conn: Any, snapshot: QueueSnapshot) -> None:
        name = snapshot.queue
        if not self._locks[name].acquire(blocking=False):
            return  # a console replay or purge works on it: read after
        try:
            try:
                lock = dl.hold(conn, name, holder=HOLDER)
            except dl.QueueBusy as exc:
                snapshot.holder = dl.holder_text(exc.holder) if exc.holder else str(exc)
                return
            started = time.monotonic()
            try:
                walk = dl.Walk(conn, name)
                try:
                    rows = [Row.of(letter) for letter in walk]
                finally:
                    walk.close()
            finally:
                dl.release(lock, name)
            snapshot.rows = rows
            snapshot.stats = dl.summarize(name, rows)
            snapshot.taken_at = time.time()
            snapshot.read_seconds = time.monotonic() - started
            snapshot.error = snapshot.holder = None
            self._wanted.discard(name)
        except dl.DeadLetterError as exc:
            snapshot.error = str(exc)
            self._wanted.discard(name)
        finally:
            self._locks[name].release()


def _depth(conn: Any, name: str) -> tuple[int | None, int | None]:
    """(messages ready, consumers) of queue ``name``; (None, None) when it does not exist."""
    import amqp

    channel = conn.channel()
    try:
        _, messages, consumers = channel.queue_declare(name, passive=True)
    except amqp.exceptions.NotFound:
        return None, None  # the broker closed the channel
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - closed already
        pass
    return messages, consumers

