"""Celery's retry options keep their meaning on a real worker, with the waiting done by the broker (issue 9).

One worker per test runs every case at once; each task records its runs with
their times (tests/worker_tasks.py, "runs"), so a case checks how often its
message ran, the delays between the runs and its dead letter's ``kit-reason``
and ``kit-retry-rule``. Delays wait in the broker's wait queues: a retry due in
d seconds arrives no sooner than d, and on a loaded machine up to about the
next wait tier plus a dispatch later, so the lower bounds are tight and the
upper bounds generous.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from service import headers as h
from service import queues
from service.client import Publisher
from tests.helpers import REPO, wait_until
from tests.worker_tasks import recorded

#: Seconds a retry may arrive after its wait tier ran out, on a loaded machine.
SLACK_S = 8.0
#: Lower bounds give this much for clock granularity.
EPSILON_S = 0.05

EXHAUSTED, PERMANENT, TIME_LIMIT = h.REASON_RETRIES_EXHAUSTED, h.REASON_PERMANENT, h.REASON_TIME_LIMIT


@dataclass(frozen=True)
class Case:
    """A message, how often it must run, the delays (lower bounds, s) before each rerun, and how it ends."""

    marker: str
    task: str
    args: tuple[object, ...] = ()
    delays: tuple[float, ...] = ()  # one per retry: runs = len(delays) + 1
    reason: str | None = None  # None: it succeeds
    rule: str | None = None
    exception: str | None = None
    #: The longest delay each retry may be given (jitter); defaults to ``delays``.
    longest: tuple[float, ...] | None = None

    @property
    def runs(self) -> int:
        return len(self.delays) + 1


CASES = [
    Case("autoretry-listed", "opt.autoretry", ("ConnectionError",), delays=(1, 1), reason=EXHAUSTED,
         rule="autoretry-for", exception="ConnectionError"),  # retry_kwargs: max_retries 2 (not 5), countdown 1
    Case("autoretry-not-listed", "opt.autoretry", ("ValueError",), reason=PERMANENT, rule="not-in-autoretry-for",
         exception="ValueError"),
    Case("retry-backoff", "opt.backoff", delays=(1, 2, 2), reason=EXHAUSTED, rule="autoretry-for",
         exception="TimeoutError"),  # factor 1 doubling, capped by retry_backoff_max=2, no jitter
    Case("retry-backoff-jitter", "opt.backoff_jitter", delays=(0, 0, 0), longest=(1, 2, 2), reason=EXHAUSTED,
         rule="autoretry-for"),
    Case("max-retries-default-delay", "opt.kit_style_delay", delays=(2,), reason=EXHAUSTED, rule="kit-policy",
         exception="OSError"),
    Case("kit-policy", "opt.kit_policy", delays=(0.1, 0.2, 0.4), longest=(0.2, 0.4, 0.8), reason=EXHAUSTED,
         rule="kit-policy", exception="KeyError"),  # KIT_MAX_RETRIES=3, backoff 0.2 s doubling (conftest)
    Case("self-retry", "opt.self_retry", delays=(1, 1), reason=EXHAUSTED, rule="self-retry",
         exception="ConnectionError"),  # self.retry(countdown=1, max_retries=2) beats max_retries=5
    Case("self-retry-default-delay", "opt.self_retry_default_delay", delays=(1,), reason=EXHAUSTED,
         rule="self-retry"),
    Case("self-retry-no-throw", "opt.retry_no_throw", delays=(1,)),
    Case("tutorial-retriable", "opt.process_payment", (True,), delays=(1, 1, 1), reason=EXHAUSTED,
         rule="self-retry", exception="tests.worker_tasks.PaymentError"),  # max_retries=3
    Case("tutorial-not-retriable", "opt.process_payment", (False,), reason=PERMANENT, rule="manual-retry",
         exception="tests.worker_tasks.PaymentError"),
    Case("soft-limit-reraised", "opt.soft_limit_reraised", reason=TIME_LIMIT, rule="soft-time-limit",
         exception="billiard.exceptions.SoftTimeLimitExceeded"),
    Case("soft-limit-in-autoretry-for", "opt.soft_limit_listed", delays=(1.5,), reason=EXHAUSTED,
         rule="autoretry-for"),  # a 1 s run to its soft limit, then countdown 0.5
]


def _runs(output: Path, marker: str) -> list[tuple[int, float]]:
    """(retries, start time) of each run of ``marker``."""
    rows = [line.rsplit(":", 2) for line in recorded(output, "runs")]
    return [(int(retries), float(at)) for name, retries, at in rows if name == marker]


def _ceiling(delay: float) -> float:
    """The latest a retry due in ``delay`` s should start: its wait tier, plus slack."""
    return queues.wait_tier_for(max(delay, 0.001)) + SLACK_S


def _cli(env: dict[str, str], *args: str) -> object:
    result = subprocess.run([sys.executable, "-m", "service", "dlq", *args, "--json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_celery_retry_options_keep_their_meaning(vhost, kit_env, start_worker, tmp_path):
    worker = start_worker(queues=["default"], concurrency=3)
    with Publisher() as p:
        ids = {case.marker: p.publish(case.task, [case.marker, *case.args]) for case in CASES}
    dying = [c for c in CASES if c.reason]
    wait_until(lambda: vhost.depth("default.dead") >= len(dying), 60, f"{len(dying)} dead letters")
    wait_until(lambda: "self-retry-no-throw" in recorded(tmp_path, "done"), 30, "the no-throw retry to succeed")

    listed = {row["id"]: row for row in _cli(kit_env, "list")}  # dlq list/show name the rule
    shown = _cli(kit_env, "show", ids["tutorial-not-retriable"])
    assert (shown["reason"], shown["retry_rule"]) == (PERMANENT, "manual-retry")
    assert shown["headers"][h.RETRY_RULE] == "manual-retry"
    dead = {m.headers["id"]: m.headers for m in vhost.drain("default.dead")}

    problems = []
    for case in CASES:
        runs = _runs(tmp_path, case.marker)
        problem = []
        if [retries for retries, _ in runs] != list(range(case.runs)):
            problem.append(f"ran {[r for r, _ in runs]}, want {case.runs} run(s)")
        for n, ((_, before), (_, after)) in enumerate(zip(runs, runs[1:], strict=False)):
            gap, low = after - before, case.delays[n] if n < len(case.delays) else 0
            high = _ceiling((case.longest or case.delays)[n] if n < len(case.delays) else 0)
            if not low - EPSILON_S <= gap <= high:
                problem.append(f"retry {n + 1} came {gap:.2f}s after run {n + 1}, want {low}..{high}s")
        letter = dead.get(ids[case.marker])
        if case.reason is None:
            if letter is not None:
                problem.append(f"dead-lettered as {letter[h.REASON]}, want success")
        elif letter is None:
            problem.append("no dead letter")
        else:
            got, want = (letter[h.REASON], letter.get(h.RETRY_RULE), letter[h.ATTEMPTS]), (case.reason, case.rule,
                                                                                           case.runs)
            if got != want:
                problem.append(f"dead letter (reason, rule, attempts) {got}, want {want}")
            if case.exception and letter[h.EXCEPTION_TYPE] != case.exception:
                problem.append(f"exception {letter[h.EXCEPTION_TYPE]}, want {case.exception}")
            if listed.get(ids[case.marker], {}).get("retry_rule") != case.rule:
                problem.append(f"dlq list shows rule {listed.get(ids[case.marker], {}).get('retry_rule')}")
        if problem:
            problems.append(f"{case.marker}: " + "; ".join(problem))
    assert not problems, "\n".join(problems)

    assert recorded(tmp_path, "cleaned_up") == ["soft-limit-reraised"]
    log = worker.log()
    assert "Retry in 1s by rule self-retry" in log  # Celery's own retry line, in the pool process
    assert f"opt.process_payment[{ids['tutorial-not-retriable']}]: permanent-error by rule manual-retry" in log
    assert "cannot enforce time limits" not in log  # prefork enforces them
    assert vhost.depth("default") == 0


def test_a_task_with_acks_late_false_is_refused_when_the_worker_starts(kit_env, tmp_path):
    (tmp_path / "early_ack_tasks.py").write_text(textwrap.dedent("""
        from service.app import app

        @app.task(name="early.ack", acks_late=False)
        def early_ack():
            pass
    """))
    env = dict(kit_env, KIT_TASK_MODULES="tests.worker_tasks,early_ack_tasks",
               PYTHONPATH=f"{tmp_path}:{kit_env['PYTHONPATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "service.app", "worker", "-Q", "default", "-c", "1",
         "--without-gossip", "--without-mingle"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "task 'early.ack' (early_ack_tasks): sets acks_late=False" in errors[0]
    assert "remove acks_late=False" in errors[0]


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_pool_without_time_limits_warns_and_the_kit_enforces_them(pool, vhost, kit_env, start_worker, tmp_path):
    worker = start_worker(queues=["default"], concurrency=3, extra_args=["-P", pool])
    warnings = [line for line in worker.log().splitlines() if "cannot enforce time limits" in line]
    assert len(warnings) == 1, worker.log()
    assert "WARNING" in warnings[0] and f"pool {pool!r}" in warnings[0]
    assert "KIT_SOFT_TIME_LIMIT, KIT_HARD_TIME_LIMIT and per-task time limits are not enforced" in warnings[0]

    with Publisher() as p:
        soft = p.publish("opt.threads_soft", ["threads-soft"])
        hard = p.publish("opt.threads_hard", ["threads-hard"])
        p.publish("test.record", ["threads-ok"])
    wait_until(lambda: vhost.depth("default.dead") >= 2, 30, "both time-limited tasks to be dead-lettered")
    dead = {m.headers["id"]: m.headers for m in vhost.drain("default.dead")}
    assert (dead[soft][h.REASON], dead[soft][h.RETRY_RULE]) == (TIME_LIMIT, "soft-time-limit")
    assert "SoftTimeLimitExceeded" in dead[soft][h.EXCEPTION_TYPE]
    assert (dead[hard][h.REASON], dead[hard][h.RETRY_RULE]) == (TIME_LIMIT, "hard-time-limit")
    assert dead[hard][h.EXCEPTION_TYPE] == "billiard.exceptions.TimeLimitExceeded"
    assert recorded(tmp_path, "swallowed") == ["threads-hard"]  # it swallowed the soft limit; not the hard one
    assert recorded(tmp_path, "done") == ["threads-ok"]  # neither ran on to its end
    for task_id, marker, limit in ((soft, "threads-soft", 1), (hard, "threads-hard", 2)):
        [(_, started)] = _runs(tmp_path, marker)
        ended = datetime.fromisoformat(dead[task_id][h.DEAD_LETTERED_AT]).timestamp()
        assert limit - EPSILON_S <= ended - started < limit + SLACK_S, (marker, ended - started)
    log = worker.log()
    assert "Soft time limit (1s) exceeded for opt.threads_soft" in log
    assert "Hard time limit (2s) exceeded for opt.threads_hard" in log
    assert worker.process.poll() is None
