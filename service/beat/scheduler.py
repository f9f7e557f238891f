"""``LeasedScheduler``: Celery's PersistentScheduler that sends tasks only while it holds the lease.

Run two beats (or more) on one vhost: the one holding the schedule lease
(service.beat.lease) schedules, the others stand by and try to take the lease
every KIT_BEAT_LEASE_RETRY seconds. What this promises (README, "Beat"):

- **One sender.** A beat sends a due task only after a round trip on its lease
  connection proved the lease is its own and after it recorded the run in the
  schedule state (service.beat.state), confirmed, on that connection. A beat
  whose lease connection fails stops at once (it closes the connection and
  stands by); a beat that hung and wakes up after its lease was freed finds
  out on that round trip, before it sends anything.
- **A takeover resumes the schedule.** The beat that takes the lease takes each
  entry's last run from the state on the broker, not from its own schedule
  file: an entry the old beat sent in this interval is not sent again, and one
  that fell due while the lease changed hands is sent at once (Celery's
  catch-up: once). So each entry is sent once per interval, and between two
  sends of an entry at most its interval plus the takeover time passes. One
  exception: a beat killed after recording a run and before sending it loses
  that run (at most one per entry and takeover), rather than the next beat
  sending it twice.
- **Takeover time**: at most KIT_BEAT_LEASE_RETRY (plus a round trip) after the
  active beat's process died, since its connection closes at once; when it hung
  or lost its network, add the broker's heartbeat timeout (2 to 3 times
  LEASE_HEARTBEAT_S: 10 to 15 s).
- Without a state on the broker (the first beat on a vhost, or the state queue
  deleted) a beat starts from its own schedule file, as Celery does. A state it
  cannot read counts every entry as run at the takeover: nothing is sent twice,
  each entry waits one interval.

The shelve file (KIT_STATE_DIR) is still written, as by Celery; it is only read
when the broker has no state. Logs: one line when a beat takes the lease (with
how long it stood by), one when it stands by, one when it loses or releases it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import amqp
from celery.beat import PersistentScheduler, SchedulingError
from celery.utils.time import maybe_make_aware

from service import queues
from service.beat import state
from service.beat.lease import Lease, LeaseLost, LeaseUnavailable, describe, poll_interval
from service.settings import load

logger = logging.getLogger(__name__)


class LeasedScheduler(PersistentScheduler):
    """Celery's persistent scheduler, gated by the schedule lease; set as the app's ``beat_scheduler``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._settings = load()
        self._lease = Lease(self._settings)  # no I/O until the first tick
        self._state_channel: Any = None
        self._foreign: dict[str, datetime] = {}  # entries of the state that this beat does not schedule
        self._active = False
        self._standby_since = datetime.now(UTC)
        self._standby_logged = False
        self._problem = ""  # the last failure to try the lease, logged once
        self._next_attempt = 0.0  # time.monotonic() of the next attempt to take the lease
        self._identity = f"{socket.gethostname()}/{os.getpid()}"
        super().__init__(*args, **kwargs)
        self.max_interval = min(float(self.max_interval), poll_interval(self._settings.beat_lease_retry))

    @property
    def active(self) -> bool:
        """Whether this beat holds the lease and sends the schedule."""
        return self._active

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Celery's tick while this beat holds the lease; else one step of standing by. Returns the sleep."""
        if self._holds_lease():
            return super().tick(*args, **kwargs)
        return max(0.0, min(self._next_attempt - time.monotonic(), self.max_interval))

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Record the run in the state on the broker (confirmed), then send; nothing is sent if recording fails."""
        runs = {**self._foreign, **{name: maybe_make_aware(e.last_run_at) for name, e in self.schedule.items()}}
        try:
            state.write(self._state_channel, runs, self._identity)
        except Exception as exc:  # noqa: BLE001 - not recorded: not sent, and stand by
            self._lose(f"recording the run of {entry.name} in {queues.BEAT_STATE_QUEUE!r} failed: {describe(exc)}; "
                       "it was not sent")
            return
        # Celery's apply_entry (which Sentry's Crons integration wraps) calls apply_async below.
        super().apply_entry(entry, producer=producer)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        """Celery's apply_async; a send the broker nacks (a quorum queue electing its leader) is sent again
        until KIT_PUBLISH_TIMEOUT has passed. Other failures are raised at once (they may have sent it)."""
        deadline = time.monotonic() + self._settings.publish_timeout
        while True:
            try:
                return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
            except SchedulingError as exc:  # Celery's wrapper; the broker's answer is its context
                nacked = isinstance(exc.__context__, amqp.exceptions.MessageNacked)
                if not nacked or time.monotonic() >= deadline:
                    raise
                logger.warning("beat: the broker refused (nack) %s; sending it again", entry.name)
                advance = False  # the run is reserved already
                time.sleep(0.2)

    def close(self) -> None:
        """Celery's close (the schedule file is synced), then the lease is given back."""
        try:
            super().close()
        finally:
            if self._active:
                logger.info("beat: released the schedule lease %s", queues.BEAT_LEASE_QUEUE)
            self._active = False
            self._lease.release()

    # -- the lease -------------------------------------------------------------------------

    def _holds_lease(self) -> bool:
        """Whether this beat may send now: it holds the lease (checked by a round trip) or just took it."""
        if self._active:
            try:
                self._lease.confirm()
                return True
            except LeaseLost as exc:
                self._lose(str(exc))
                return False
        now = time.monotonic()
        if now < self._next_attempt:
            self._lease.keepalive()
            return False
        self._next_attempt = now + self._settings.beat_lease_retry
        try:
            if not self._lease.acquire():
                self._log_standby()
                return False
            self._take_over()
        except (LeaseUnavailable, LeaseLost) as exc:
            self._lease.release()
            self._log_problem(str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - reading the state failed: give the lease back, try again
            self._lease.release()
            self._log_problem(f"reading the schedule state {queues.BEAT_STATE_QUEUE!r} failed: {describe(exc)}")
            return False
        return True

    def _take_over(self) -> None:
        """Just took the lease: take each entry's last run from the broker's state, then schedule."""
        channel = state.declare(self._lease.open_channel, self._settings.queue_type)
        now = self.app.now()
        try:
            found = state.read(channel)
        except state.StateUnreadable as exc:
            for entry in self.schedule.values():
                entry.last_run_at = now
            self._foreign = {}
            source = f"{exc}; every entry counts as run now"
        else:
            source = self._resume(found, now)
        self._state_channel = channel
        self._heap = None  # rebuilt from the entries' new last runs at the next tick
        self.sync()
        self._active = True
        self._problem = ""
        waited = (datetime.now(UTC) - self._standby_since).total_seconds()
        logger.info("beat: took the schedule lease %s on %s, standby since %s (%.1fs); %s",
                    queues.BEAT_LEASE_QUEUE, self._lease.where, self._standby_since.isoformat(timespec="milliseconds"),
                    waited, source)

    def _resume(self, found: state.ScheduleState | None, now: datetime) -> str:
        """Set the entries' last runs from the state (None: keep the schedule file's); says where they came from."""
        if found is None:
            self._foreign = {}
            return "no schedule state on the broker yet: last runs from the local schedule file"
        for name, entry in self.schedule.items():
            when = found.last_run_at.get(name)
            if when is not None:  # an entry no beat with a state has sent keeps the file's last run
                entry.last_run_at = min(when, now).astimezone(now.tzinfo)  # never in the future
        self._foreign = {name: when for name, when in found.last_run_at.items() if name not in self.schedule}
        written = found.written_at.isoformat(timespec="milliseconds")
        return f"last runs from the broker's schedule state, written {written} by {found.by or 'an unnamed beat'}"

    def _lose(self, reason: str) -> None:
        """Stop sending at once: close the lease connection (the broker frees the lease) and stand by."""
        self._active = False
        self._state_channel = None
        self._lease.release()
        self._standby_since = datetime.now(UTC)
        self._standby_logged = True
        self._next_attempt = time.monotonic() + self._settings.beat_lease_retry
        logger.warning("beat: lost the schedule lease %s (%s); standby, trying to take it again every %gs",
                       queues.BEAT_LEASE_QUEUE, reason, self._settings.beat_lease_retry)

    def _log_standby(self) -> None:
        self._problem = ""
        if not self._standby_logged:
            self._standby_logged = True
            logger.info("beat: standby: another beat holds the schedule lease %s; trying to take it every %gs",
                        queues.BEAT_LEASE_QUEUE, self._settings.beat_lease_retry)

    def _log_problem(self, problem: str) -> None:
        self._standby_logged = False  # once the problem is gone, say whether this beat stands by
        if problem != self._problem:
            self._problem = problem
            logger.error("beat: cannot take the schedule lease %s: %s; trying again every %gs",
                         queues.BEAT_LEASE_QUEUE, problem, self._settings.beat_lease_retry)
