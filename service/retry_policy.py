"""What to do with a failed task: retry it after a delay, or dead-letter it.

Pure logic, no broker: the worker's request handler asks ``decide`` and then
publishes accordingly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from service import headers as h
from service.errors import PermanentError
from service.queues import WAIT_TIERS_S


@dataclass(frozen=True)
class Policy:
    """A task's retry settings, already resolved against the defaults."""

    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    max_worker_lost: int
    permanent_exceptions: tuple[type[BaseException], ...] = ()


@dataclass(frozen=True)
class Decision:
    """Retry after ``delay_s`` seconds, or dead-letter with ``reason``."""

    retry: bool
    reason: str = ""
    delay_s: float = 0.0


def backoff_delay(retries: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter".

    The ceiling doubles with each retry (base, 2*base, 4*base, ...) up to
    ``max_s`` and the longest wait tier; the delay is drawn uniformly from the
    upper half of it, so retries of a burst of failures spread out but never
    come back sooner than half the ceiling.
    """
    ceiling = min(max_s, float(WAIT_TIERS_S[-1]), base_s * (2 ** min(retries, 62)))
    return (rng or random).uniform(ceiling / 2, ceiling)


def decide(
    policy: Policy,
    exc: BaseException,
    *,
    retries: int,
    worker_lost: int = 0,
    requested_delay_s: float | None = None,
    permanent_reason: str | None = None,
) -> Decision:
    """Decide the fate of a task that failed with ``exc`` after ``retries`` retries.

    ``permanent_reason`` forces a dead letter (for example a hard time limit or
    arguments that do not fit the task). ``worker_lost`` counts deliveries whose
    process died, this one included. ``requested_delay_s`` is a countdown the task
    asked for with ``self.retry(countdown=...)``.
    """
    if permanent_reason:
        return Decision(False, permanent_reason)
    if worker_lost:
        if worker_lost >= policy.max_worker_lost:
            return Decision(False, h.REASON_WORKER_LOST)
    elif isinstance(exc, (PermanentError, *policy.permanent_exceptions)):
        return Decision(False, h.REASON_PERMANENT)
    if retries >= policy.max_retries:
        return Decision(False, h.REASON_RETRIES_EXHAUSTED)
    if requested_delay_s is not None and requested_delay_s > 0:
        delay = min(float(requested_delay_s), float(WAIT_TIERS_S[-1]))
    else:
        delay = backoff_delay(retries, policy.backoff_base_s, policy.backoff_max_s)
    return Decision(True, delay_s=delay)
