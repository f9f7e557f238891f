"""What to do with a failed task: retry it after a delay, or dead-letter it.

Pure logic, no broker. Both halves of the worker ask ``decide``: the pool
process (``ReliableTask``, which turns a retry into Celery's ``Retry`` so that
Celery logs and counts the run as retried) and the main process
(``ReliableRequest``, which publishes the retry to a wait queue or the dead
letter). So the rules live here only.

The rules, first match wins (``Decision.rule`` names the one that decided; it
is the dead letter's ``kit-retry-rule`` header):

========================  ==============================================================
rule                      when / what
========================  ==============================================================
``invalid-arguments``,    forced by the caller (``forced_reason``): arguments that do not
``hard-time-limit``       fit the task, the pool killed it at its hard time limit. Never
                          retried.
``worker-lost``           the process died under it: retried with the kit backoff until
                          ``max_worker_lost`` deliveries died (then ``worker-lost``).
``self-retry``            the task called ``self.retry()`` (or raised ``Retry``): retried
                          after its countdown/eta, else a declared ``default_retry_delay``,
                          else the kit backoff; limit: self.retry's ``max_retries``, else
                          the task's (``retry_kwargs["max_retries"]``, ``max_retries``,
                          KIT_MAX_RETRIES). Over it: ``retries-exhausted``.
``permanent-exception``   ``PermanentError``, the task's ``permanent_exceptions`` or
                          Celery's ``throws``: ``permanent-error`` at once.
``soft-time-limit``       ``SoftTimeLimitExceeded`` reached the worker, and autoretry_for
                          does not name it (a broad ``Exception`` does not count):
                          ``time-limit`` at once. ``TimeLimitExceeded``: ``hard-time-limit``.
``autoretry-for``         autoretry_for is declared and lists the exception (and
                          dont_autoretry_for does not): retried; delay: retry_backoff
                          (Celery's formula, retry_backoff_max, retry_jitter), else
                          ``retry_kwargs["countdown"]``, else a declared
                          ``default_retry_delay``, else the kit backoff.
``not-in-autoretry-for``  autoretry_for is declared and does not list it:
                          ``permanent-error`` at once (Celery fails it at once).
``manual-retry``          the task retries by hand (its code calls ``self.retry`` and it
                          declares ``max_retries`` or ``default_retry_delay``), or sets
                          ``retry_on_raise=False``: any other exception is
                          ``permanent-error`` at once, as in Celery.
``kit-policy``            everything else: retried after a declared
                          ``default_retry_delay``, else the kit backoff
                          (KIT_RETRY_BACKOFF_*), up to the limit.
========================  ==============================================================

Every retried rule gives up with ``retries-exhausted`` once ``retries`` reached
its limit. There is no unlimited: Celery's ``max_retries=None`` means the kit's
KIT_MAX_RETRIES.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

from service import headers as h
from service.errors import PermanentError
from service.queues import WAIT_TIERS_S

RULE_INVALID_ARGUMENTS = "invalid-arguments"
RULE_HARD_TIME_LIMIT = "hard-time-limit"
RULE_WORKER_LOST = "worker-lost"
RULE_SELF_RETRY = "self-retry"
RULE_PERMANENT = "permanent-exception"
RULE_SOFT_TIME_LIMIT = "soft-time-limit"
RULE_AUTORETRY = "autoretry-for"
RULE_NOT_AUTORETRY = "not-in-autoretry-for"
RULE_MANUAL_RETRY = "manual-retry"
RULE_KIT_POLICY = "kit-policy"
#: A forced reason the table above does not name.
RULE_FORCED = "forced"

#: Every rule, in the order ``decide`` tries them (the README's table follows it).
RULES = (RULE_INVALID_ARGUMENTS, RULE_HARD_TIME_LIMIT, RULE_WORKER_LOST, RULE_SELF_RETRY, RULE_PERMANENT,
         RULE_SOFT_TIME_LIMIT, RULE_AUTORETRY, RULE_NOT_AUTORETRY, RULE_MANUAL_RETRY, RULE_KIT_POLICY)

_FORCED_RULES = {h.REASON_INVALID_ARGUMENTS: RULE_INVALID_ARGUMENTS, h.REASON_TIME_LIMIT: RULE_HARD_TIME_LIMIT}

#: Celery's default ``retry_backoff_max`` (seconds).
CELERY_RETRY_BACKOFF_MAX = 600

ExceptionTypes = tuple[type[BaseException], ...]


@dataclass(frozen=True)
class Policy:
    """A task's retry settings, already resolved against the defaults.

    ``max_retries`` is the task's limit: ``retry_kwargs["max_retries"]``, else its
    declared ``max_retries``, else KIT_MAX_RETRIES. The Celery options below are
    the ones the task declared itself (None / empty: not declared).
    """

    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    max_worker_lost: int
    permanent_exceptions: ExceptionTypes = ()
    #: Celery's ``autoretry_for``; None when the task does not declare it.
    autoretry_for: ExceptionTypes | None = None
    dont_autoretry_for: ExceptionTypes = ()
    #: ``retry_kwargs["countdown"]`` (seconds).
    retry_countdown_s: float | None = None
    #: A ``default_retry_delay`` the task declared (Celery's class default of 180 s does not count).
    default_retry_delay_s: float | None = None
    #: Celery's ``retry_backoff`` factor; 0 when off (True means 1).
    retry_backoff: float = 0.0
    retry_backoff_max_s: float = CELERY_RETRY_BACKOFF_MAX
    retry_jitter: bool = True
    #: A plain raise (outside ``autoretry_for``) is ``permanent-error`` at once, as in Celery.
    raise_fails: bool = False


@dataclass(frozen=True)
class Decision:
    """Retry after ``delay_s`` seconds, or dead-letter with ``reason``; ``rule`` says which rule decided."""

    retry: bool
    reason: str = ""
    delay_s: float = 0.0
    rule: str = ""
    #: The retry limit that applied (None for rules that never retry).
    limit: int | None = None


def backoff_delay(retries: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """The kit's exponential backoff with "equal jitter".

    The ceiling doubles with each retry (base, 2*base, 4*base, ...) up to
    ``max_s`` and the longest wait tier; the delay is drawn uniformly from the
    upper half of it, so retries of a burst of failures spread out but never
    come back sooner than half the ceiling.
    """
    ceiling = min(max_s, float(WAIT_TIERS_S[-1]), base_s * (2 ** min(retries, 62)))
    return (rng or random).uniform(ceiling / 2, ceiling)


def celery_backoff_delay(policy: Policy, retries: int) -> float:
    """Celery's ``retry_backoff`` delay: ``factor * 2**retries`` capped at ``retry_backoff_max``, full jitter."""
    return float(get_exponential_backoff_interval(
        factor=int(max(1.0, policy.retry_backoff)),
        retries=min(retries, 62),
        maximum=int(policy.retry_backoff_max_s),
        full_jitter=policy.retry_jitter,
    ))


def _type_of(exc: BaseException | type[BaseException]) -> type[BaseException]:
    return exc if isinstance(exc, type) else type(exc)


def _is(exc_type: type[BaseException], classes: ExceptionTypes | None) -> bool:
    return any(isinstance(c, type) and issubclass(exc_type, c) for c in classes or ())


def _names_soft_time_limit(exc_type: type[BaseException], classes: ExceptionTypes | None) -> bool:
    """Whether ``classes`` names SoftTimeLimitExceeded (or a subclass matching ``exc_type``) itself."""
    return any(isinstance(c, type) and issubclass(c, SoftTimeLimitExceeded) and issubclass(exc_type, c)
               for c in classes or ())


def _seconds(value: float | None) -> float | None:
    """A usable delay in seconds, or None (negative: 0; NaN, infinite or not a number: None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return max(0.0, float(value))


def _retry(policy: Policy, rule: str, retries: int, limit: int, delay_s: float | None) -> Decision:
    if retries >= limit:
        return Decision(False, h.REASON_RETRIES_EXHAUSTED, rule=rule, limit=limit)
    if delay_s is None:
        delay_s = backoff_delay(retries, policy.backoff_base_s, policy.backoff_max_s)
    return Decision(True, delay_s=delay_s, rule=rule, limit=limit)


def decide(
    policy: Policy,
    exc: BaseException | type[BaseException],
    *,
    retries: int,
    worker_lost: int = 0,
    requested_delay_s: float | None = None,
    permanent_reason: str | None = None,
    retry_requested: bool = False,
    requested_max_retries: int | None = None,
) -> Decision:
    """Decide the fate of a task that failed with ``exc`` (an exception or its class) after ``retries`` retries.

    ``permanent_reason`` forces a dead letter (a hard time limit, arguments that
    do not fit the task). ``worker_lost`` counts deliveries whose process died,
    this one included. ``retry_requested`` says the task called ``self.retry()``,
    with ``requested_delay_s`` (its countdown, or its eta as seconds from now) and
    ``requested_max_retries``; a ``requested_delay_s`` alone implies it. See the
    module docstring for the rules.
    """
    exc_type = _type_of(exc)
    if permanent_reason:
        return Decision(False, permanent_reason, rule=_FORCED_RULES.get(permanent_reason, RULE_FORCED))
    if worker_lost:
        if worker_lost >= policy.max_worker_lost:
            return Decision(False, h.REASON_WORKER_LOST, rule=RULE_WORKER_LOST, limit=policy.max_worker_lost)
        return _retry(policy, RULE_WORKER_LOST, retries, policy.max_retries, None)
    if retry_requested or requested_delay_s is not None:
        limit = policy.max_retries if requested_max_retries is None else max(0, int(requested_max_retries))
        delay = _seconds(requested_delay_s)
        return _retry(policy, RULE_SELF_RETRY, retries, limit, delay if delay is not None
                      else _seconds(policy.default_retry_delay_s))
    if _is(exc_type, (PermanentError, *policy.permanent_exceptions)):
        return Decision(False, h.REASON_PERMANENT, rule=RULE_PERMANENT)
    if issubclass(exc_type, TimeLimitExceeded):
        return Decision(False, h.REASON_TIME_LIMIT, rule=RULE_HARD_TIME_LIMIT)
    if issubclass(exc_type, SoftTimeLimitExceeded) and not _names_soft_time_limit(exc_type, policy.autoretry_for):
        return Decision(False, h.REASON_TIME_LIMIT, rule=RULE_SOFT_TIME_LIMIT)
    if policy.autoretry_for is not None:
        if not _is(exc_type, policy.autoretry_for) or _is(exc_type, policy.dont_autoretry_for):
            return Decision(False, h.REASON_PERMANENT, rule=RULE_NOT_AUTORETRY)
        if policy.retry_backoff:
            delay = celery_backoff_delay(policy, retries)
        elif policy.retry_countdown_s is not None:
            delay = _seconds(policy.retry_countdown_s)
        else:
            delay = _seconds(policy.default_retry_delay_s)
        return _retry(policy, RULE_AUTORETRY, retries, policy.max_retries, delay)
    if policy.raise_fails:
        return Decision(False, h.REASON_PERMANENT, rule=RULE_MANUAL_RETRY)
    return _retry(policy, RULE_KIT_POLICY, retries, policy.max_retries, _seconds(policy.default_retry_delay_s))
