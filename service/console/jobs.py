"""Replays and purges of the console: a plan (what a dry run found), then a job that carries it out.

A ``Plan`` is what the dry run (replay) or the preview (purge) found: for
each queue the ids of the letters it would take, in queue order. Confirming a
plan starts a ``Job`` in a background thread that runs the dead-letter
library's own ``replay`` or ``purge`` restricted to exactly those ids (and at
most that many), so letters that died after the dry run are not swept along.
A job's progress lives in the console's memory: a page reload shows it again;
a restart of the console forgets it (the broker keeps what was done: replay
and purge ack each letter only once it is safe).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service import deadletters as dl
from service.console.snapshot import Refresher
from service.errors import KitError
from service.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds a plan can be confirmed after its dry run.
PLAN_TTL_S = 900.0
#: Plans and jobs kept in memory (the oldest finished ones are forgotten).
KEEP = 200
REPLAY, PURGE = "replay", "purge"


@dataclass
class Plan:
    """What a dry run found: per queue the ids it would take, plus what it would refuse."""

    kind: str
    user: str
    filters: dict[str, Any]
    ids: dict[str, list[str]]
    refused: dict[str, list[str]] = field(default_factory=dict)
    to: str | None = None
    rate: float | None = None
    targets: dict[str, int] = field(default_factory=dict)  # work queue -> letters it would receive
    rows: list[dict[str, Any]] = field(default_factory=list)  # the first letters, for the page
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    created: float = field(default_factory=time.monotonic)

    @property
    def count(self) -> int:
        """Letters the plan would move or delete."""
        return sum(len(ids) for ids in self.ids.values())

    @property
    def refused_count(self) -> int:
        """Letters the dry run refused (over the replay budget, or no work queue to go back to)."""
        return sum(len(ids) for ids in self.refused.values())


@dataclass
class Job:
    """A replay or purge running (or done) in the background."""

    plan: Plan
    total: int
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "running"  # running, done, failed
    done: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"moved": 0, "refused": 0, "failed": 0, "purged": 0})
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    archive: str | None = None
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished_at: str | None = None

    def view(self) -> dict[str, Any]:
        """The job as the progress page and its JSON poll show it."""
        return {"id": self.id, "kind": self.plan.kind, "state": self.state, "done": self.done, "total": self.total,
                "counts": dict(self.counts), "failures": self.failures[:20], "error": self.error,
                "archive": Path(self.archive).name if self.archive else None, "user": self.plan.user,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "percent": 100 if not self.total else min(100, round(100 * self.done / self.total))}


class Jobs:
    """The plans and jobs of one console."""

    def __init__(self, settings: Settings, refresher: Refresher, audit: Any) -> None:
        self.settings = settings
        self.refresher = refresher
        self.audit = audit
        self.plans: OrderedDict[str, Plan] = OrderedDict()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    # -- plans ------------------------------------------------------------------------------

    def dry_run(self, kind: str, user: str, names: list[str], filters: dl.Filters, shown: dict[str, Any],
                to: str | None = None, rate: float | None = None) -> Plan:
        """Find what a replay (or purge) of ``filters`` on ``names`` would take, changing nothing."""
        from service.topology import connect

        plan = Plan(kind, user, shown, {}, to=to, rate=rate)
        conn = connect(self.settings)
        try:
            for name in names:
                with self.refresher.exclusive(name):
                    busy = dl.holder_of(conn, name)
                    if busy:  # its letters are held by the other reader: a dry run would miss them
                        raise dl.QueueBusy(name, busy)
                    if kind == REPLAY:
                        outcome = dl.replay(conn, self.settings, name, filters, to=to,
                                            max_replays=self.settings.max_replays, dry_run=True)
                        taken, refused = outcome.taken, outcome.refused + outcome.homeless
                    else:
                        taken, refused = dl.browse(conn, name, filters), []
                plan.ids[name] = [letter.id for letter in taken]
                plan.refused[name] = [letter.id for letter in refused]
                for letter in taken:
                    target = to or letter.source_queue
                    plan.targets[target] = plan.targets.get(target, 0) + 1
                    if len(plan.rows) < 200:
                        plan.rows.append(dict(letter.summary(), queue=name, to=target, action="would " + kind))
                for letter in refused:
                    if len(plan.rows) < 200:
                        plan.rows.append(dict(letter.summary(), queue=name, to=None, action="refused"))
        finally:
            conn.release()
        with self._lock:
            self.plans[plan.id] = plan
            self._forget()
        return plan

    def plan(self, plan_id: str, user: str) -> Plan:
        """The unexpired plan ``plan_id`` of ``user``; KitError otherwise."""
        with self._lock:
            plan = self.plans.get(plan_id)
        if plan is None or plan.user != user or time.monotonic() - plan.created > PLAN_TTL_S:
            raise KitError("that dry run has expired or is not yours; run the dry run again")
        return plan

    # -- jobs -------------------------------------------------------------------------------

    def start(self, plan: Plan) -> Job:
        """Carry out ``plan`` in the background; the plan cannot be confirmed twice."""
        with self._lock:
            if self.plans.pop(plan.id, None) is None:
                raise KitError("that dry run was confirmed already; run the dry run again")
            job = Job(plan, plan.count + (plan.refused_count if plan.kind == REPLAY else 0))
            self.jobs[job.id] = job
            self._forget()
        threading.Thread(target=self._run, args=(job,), name=f"console-{plan.kind}-{job.id}", daemon=True).start()
        return job

    def job(self, job_id: str) -> Job | None:
        """The job ``job_id``, or None."""
        with self._lock:
            return self.jobs.get(job_id)

    def running(self) -> list[Job]:
        """Jobs still running."""
        with self._lock:
            return [job for job in self.jobs.values() if job.state == "running"]

    def _run(self, job: Job) -> None:
        from service.topology import connect

        plan = job.plan
        holder = f"{plan.user} via the console ({plan.kind})"
        try:
            conn = connect(self.settings)
            try:
                for name, ids in plan.ids.items():
                    wanted = ids + (plan.refused.get(name, []) if plan.kind == REPLAY else [])
                    if wanted:
                        self._one_queue(conn, job, name, wanted, holder)
            finally:
                conn.release()
            job.state = "failed" if job.counts["failed"] else "done"
        except KitError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - shown on the job's page and logged, never lost silently
            logger.exception("console: %s job %s failed", plan.kind, job.id)
            job.state, job.error = "failed", f"{exc.__class__.__name__}: {exc}"
        job.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.audit(plan.user, plan.kind, plan.filters, job.counts, job.state, job.error)

    def _one_queue(self, conn: Any, job: Job, name: str, ids: list[str], holder: str) -> None:
        plan = job.plan

        def progress(letter: dl.DeadLetter, what: str) -> None:
            job.done += 1
            key = {"replayed": "moved", "refused": "refused", "failed": "failed", "purged": "purged"}.get(what)
            if key:
                job.counts[key] += 1
            if what == "failed" and len(job.failures) < 100:
                job.failures.append(letter.id)

        filters = dl.Filters(ids=tuple(ids))
        with self.refresher.exclusive(name):
            if plan.kind == REPLAY:
                outcome = dl.replay(conn, self.settings, name, filters, to=plan.to, limit=len(ids), rate=plan.rate,
                                    max_replays=self.settings.max_replays, progress=progress, holder=holder)
                for letter, why in outcome.failed[:5]:
                    job.failures.append(f"{letter.id}: {why}")
            else:
                path = self._archive_path(job)
                with open(path, "a", encoding="utf-8") as stream:
                    dl.purge(conn, name, filters, limit=len(ids), archive=stream, progress=progress, holder=holder)

    def _archive_path(self, job: Job) -> Path:
        if job.archive is None:
            directory = Path(self.settings.console_archive_dir)
            directory.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            job.archive = str(directory / f"purge-{stamp}-{job.id}.jsonl")
        return Path(job.archive)

    def _forget(self) -> None:
        now = time.monotonic()
        for plan_id in [p.id for p in self.plans.values() if now - p.created > PLAN_TTL_S]:
            del self.plans[plan_id]
        while len(self.jobs) > KEEP:
            oldest = next((j for j in self.jobs.values() if j.state != "running"), None)
            if oldest is None:
                break
            del self.jobs[oldest.id]
