"""The retry rules as a pure function, and how a task's declaration turns into them (no broker).

``service.retry_policy.decide`` is table-tested here; ``tests/test_retry_options.py``
runs the same options on a real worker.
"""

from __future__ import annotations

import pickle
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import CDeprecationWarning, SoftTimeLimitExceeded, TimeLimitExceeded

from service import headers as h
from service.errors import PermanentError
from service.retry_policy import RULES, Decision, Policy, celery_backoff_delay, decide
from service.worker import pools
from service.worker.task import (
    KitRetry,
    TaskDefinitionError,
    calls_self_retry,
    final_decision,
    is_declared,
    mark_final,
)

KIT = Policy(max_retries=3, backoff_base_s=2, backoff_max_s=600, max_worker_lost=3)


class Declined(Exception):
    """A task's permanent exception."""


@dataclass(frozen=True)
class Case:
    """One row: a policy (KIT with changes), a failure, and what must be decided."""

    name: str
    exc: BaseException | type[BaseException]
    expect: tuple[bool, str, str]  # retry?, reason, rule
    policy: dict[str, Any] = field(default_factory=dict)
    call: dict[str, Any] = field(default_factory=dict)
    delay: tuple[float, float] | None = None  # inclusive bounds of the delay when retried


CASES = [
    # forced reasons and lost workers come first
    Case("bad arguments", TypeError(), (False, h.REASON_INVALID_ARGUMENTS, "invalid-arguments"),
         call={"permanent_reason": h.REASON_INVALID_ARGUMENTS, "retry_requested": True}),
    Case("hard limit (pool killed it)", TimeLimitExceeded(), (False, h.REASON_TIME_LIMIT, "hard-time-limit"),
         call={"permanent_reason": h.REASON_TIME_LIMIT}),
    Case("worker lost, below the limit", RuntimeError(), (True, "", "worker-lost"), call={"worker_lost": 2},
         delay=(1, 2)),
    Case("worker lost, at the limit", RuntimeError(), (False, h.REASON_WORKER_LOST, "worker-lost"),
         call={"worker_lost": 3}),
    # 1: self.retry()
    Case("self.retry countdown", ValueError(), (True, "", "self-retry"),
         call={"retry_requested": True, "requested_delay_s": 7}, delay=(7, 7)),
    Case("self.retry beats autoretry_for and permanent", PermanentError(), (True, "", "self-retry"),
         policy={"autoretry_for": ()}, call={"retry_requested": True, "requested_delay_s": 1}, delay=(1, 1)),
    Case("self.retry: declared default_retry_delay", ValueError(), (True, "", "self-retry"),
         policy={"default_retry_delay_s": 60}, call={"retry_requested": True}, delay=(60, 60)),
    Case("self.retry: kit backoff without either", ValueError(), (True, "", "self-retry"),
         call={"retry_requested": True, "retries": 1}, delay=(2, 4)),
    Case("self.retry max_retries beats the task's", ValueError(), (False, h.REASON_RETRIES_EXHAUSTED, "self-retry"),
         policy={"max_retries": 10}, call={"retry_requested": True, "requested_max_retries": 1, "retries": 1}),
    Case("self.retry max_retries above the task's", ValueError(), (True, "", "self-retry"),
         call={"retry_requested": True, "requested_max_retries": 8, "retries": 5}),
    Case("self.retry exhausted by the task's limit", ValueError(), (False, h.REASON_RETRIES_EXHAUSTED, "self-retry"),
         call={"retry_requested": True, "retries": 3}),
    # 2: permanent
    Case("PermanentError", PermanentError(), (False, h.REASON_PERMANENT, "permanent-exception")),
    Case("permanent_exceptions / throws", Declined(), (False, h.REASON_PERMANENT, "permanent-exception"),
         policy={"permanent_exceptions": (Declined,), "autoretry_for": (Exception,)}),
    Case("permanent, as a class", Declined, (False, h.REASON_PERMANENT, "permanent-exception"),
         policy={"permanent_exceptions": (Declined,)}),
    # 3: time limits
    Case("soft limit re-raised", SoftTimeLimitExceeded(), (False, h.REASON_TIME_LIMIT, "soft-time-limit")),
    Case("soft limit: a broad autoretry_for does not count", SoftTimeLimitExceeded(),
         (False, h.REASON_TIME_LIMIT, "soft-time-limit"), policy={"autoretry_for": (Exception,)}),
    Case("soft limit named in autoretry_for", SoftTimeLimitExceeded(), (True, "", "autoretry-for"),
         policy={"autoretry_for": (SoftTimeLimitExceeded,), "retry_countdown_s": 3}, delay=(3, 3)),
    Case("hard limit raised in the task", TimeLimitExceeded(), (False, h.REASON_TIME_LIMIT, "hard-time-limit"),
         policy={"autoretry_for": (TimeLimitExceeded,)}),
    # 4: autoretry_for
    Case("autoretry_for: listed", ConnectionError(), (True, "", "autoretry-for"),
         policy={"autoretry_for": (OSError,)}, delay=(1, 2)),
    Case("autoretry_for: not listed", ValueError(), (False, h.REASON_PERMANENT, "not-in-autoretry-for"),
         policy={"autoretry_for": (ConnectionError,)}),
    Case("autoretry_for: empty lists nothing", ValueError(), (False, h.REASON_PERMANENT, "not-in-autoretry-for"),
         policy={"autoretry_for": ()}),
    Case("dont_autoretry_for wins", ConnectionRefusedError(), (False, h.REASON_PERMANENT, "not-in-autoretry-for"),
         policy={"autoretry_for": (OSError,), "dont_autoretry_for": (ConnectionRefusedError,)}),
    Case("autoretry_for: exhausted", ConnectionError(), (False, h.REASON_RETRIES_EXHAUSTED, "autoretry-for"),
         policy={"autoretry_for": (ConnectionError,), "max_retries": 2}, call={"retries": 2}),
    Case("autoretry_for: retry_kwargs countdown", ConnectionError(), (True, "", "autoretry-for"),
         policy={"autoretry_for": (ConnectionError,), "retry_countdown_s": 5, "default_retry_delay_s": 60},
         delay=(5, 5)),
    Case("autoretry_for: default_retry_delay", ConnectionError(), (True, "", "autoretry-for"),
         policy={"autoretry_for": (ConnectionError,), "default_retry_delay_s": 60}, delay=(60, 60)),
    Case("autoretry_for: retry_backoff beats countdown", ConnectionError(), (True, "", "autoretry-for"),
         policy={"autoretry_for": (ConnectionError,), "retry_backoff": 3, "retry_jitter": False,
                 "retry_countdown_s": 5}, call={"retries": 2}, delay=(12, 12)),
    Case("autoretry_for: retry_backoff_max", ConnectionError(), (True, "", "autoretry-for"),
         policy={"autoretry_for": (ConnectionError,), "retry_backoff": 1, "retry_jitter": False,
                 "retry_backoff_max_s": 2, "max_retries": 10}, call={"retries": 6}, delay=(2, 2)),
    Case("autoretry_for: full jitter", ConnectionError(), (True, "", "autoretry-for"),
         policy={"autoretry_for": (ConnectionError,), "retry_backoff": 1}, call={"retries": 2}, delay=(0, 4)),
    # 5: manual retry
    Case("manual retry: a plain raise fails", KeyError(), (False, h.REASON_PERMANENT, "manual-retry"),
         policy={"raise_fails": True}),
    Case("manual retry: autoretry_for still retries", ConnectionError(), (True, "", "autoretry-for"),
         policy={"raise_fails": True, "autoretry_for": (ConnectionError,)}),
    # 6: the kit's policy
    Case("kit policy: a plain raise is retried", KeyError(), (True, "", "kit-policy"), call={"retries": 2},
         delay=(4, 8)),
    Case("kit policy: declared default_retry_delay", KeyError(), (True, "", "kit-policy"),
         policy={"default_retry_delay_s": 9}, delay=(9, 9)),
    Case("kit policy: exhausted", KeyError(), (False, h.REASON_RETRIES_EXHAUSTED, "kit-policy"), call={"retries": 3}),
    Case("kit policy: max_retries 0", KeyError(), (False, h.REASON_RETRIES_EXHAUSTED, "kit-policy"),
         policy={"max_retries": 0}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rules(case: Case):
    call = {"retries": 0, **case.call}
    decision = decide(Policy(**{**KIT.__dict__, **case.policy}), case.exc, **call)
    assert (decision.retry, decision.reason, decision.rule) == case.expect
    assert decision.rule in RULES
    if case.delay is not None:
        low, high = case.delay
        assert low <= decision.delay_s <= high


def test_every_rule_has_a_row():
    assert {c.expect[2] for c in CASES} == set(RULES)


def test_celery_backoff_is_celerys_formula():
    policy = Policy(**{**KIT.__dict__, "retry_backoff": 2, "retry_jitter": False, "retry_backoff_max_s": 600})
    assert [celery_backoff_delay(policy, n) for n in range(10)] == [2, 4, 8, 16, 32, 64, 128, 256, 512, 600]
    jittered = Policy(**{**KIT.__dict__, "retry_backoff": 1})
    random.seed(3)
    delays = [celery_backoff_delay(jittered, 3) for _ in range(300)]
    assert min(delays) >= 0 and max(delays) <= 8 and len(set(delays)) > 5


# -- what a task declares ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit_app() -> Celery:
    """A Celery app of its own with the kit's base class (tasks ``shared=False``: they stay out of service.app)."""
    app = Celery("unit", task_cls="service.worker.task:ReliableTask", set_as_current=False)
    with warnings.catch_warnings():  # finalizing copies every shared task in, deprecated options and all
        warnings.simplefilter("ignore", CDeprecationWarning)
        app.finalize()  # tasks defined from now on are created at once, not as lazy proxies
    return app


def test_declared_means_set_on_the_task_not_inherited(unit_app):
    @unit_app.task(shared=False, name="unit.plain")
    def plain():
        pass

    @unit_app.task(shared=False, name="unit.options", default_retry_delay=5, max_retries=None)
    def options():
        pass

    assert not is_declared(type(plain), "default_retry_delay")  # celery.Task's 180 s does not count
    assert not is_declared(type(plain), "max_retries")
    assert is_declared(type(options), "default_retry_delay") and is_declared(type(options), "max_retries")


def test_policy_from_declared_options(unit_app, monkeypatch):
    monkeypatch.setenv("KIT_MAX_RETRIES", "4")

    @unit_app.task(shared=False, name="unit.auto", bind=True, autoretry_for=(ConnectionError,), max_retries=9,
                   retry_kwargs={"max_retries": 2, "countdown": 1.5}, retry_backoff=True, retry_backoff_max=30,
                   retry_jitter=False, throws=(Declined,))
    def auto(self):
        pass

    @unit_app.task(shared=False, name="unit.unlimited", max_retries=None)
    def unlimited():
        pass

    policy = auto.retry_policy()
    assert policy.autoretry_for == (ConnectionError,) and policy.max_retries == 2  # retry_kwargs first
    assert (policy.retry_countdown_s, policy.retry_backoff, policy.retry_backoff_max_s, policy.retry_jitter) == (
        1.5, 1.0, 30, False)
    assert Declined in policy.permanent_exceptions
    assert policy.default_retry_delay_s is None
    kit = unlimited.retry_policy()
    assert kit.max_retries == 4 and kit.autoretry_for is None  # None: KIT_MAX_RETRIES, never unlimited
    assert "run" not in vars(auto)  # Celery's autoretry wrapper is not installed: the kit applies autoretry_for


def test_manual_retry_is_detected_from_the_code(unit_app):
    class PaymentError(Exception):
        is_retriable = False

    @unit_app.task(shared=False, name="unit.tutorial", bind=True, max_retries=3)
    def tutorial(self, order_id):
        try:
            raise PaymentError(order_id)
        except PaymentError as e:
            if e.is_retriable:
                raise self.retry(exc=e, countdown=60) from None
            raise

    @unit_app.task(shared=False, name="unit.nested", bind=True, default_retry_delay=1)
    def nested(self):
        def again():
            return self.retry()

        return again

    @unit_app.task(shared=False, name="unit.kit_style", bind=True, max_retries=8)
    def kit_style(self):
        raise ConnectionError()

    @unit_app.task(shared=False, name="unit.retry_after", bind=True)  # webhooks.deliver's shape: self.retry, no options
    def retry_after(self, delay=None):
        if delay:
            raise self.retry(countdown=delay)
        raise TimeoutError()

    @unit_app.task(shared=False, name="unit.explicit", bind=True, max_retries=3, retry_on_raise=True)
    def explicit(self):
        raise self.retry()

    @unit_app.task(shared=False, name="unit.strict", bind=True, retry_on_raise=False)
    def strict(self):
        raise ConnectionError()

    assert calls_self_retry(type(tutorial)) and calls_self_retry(type(nested))
    assert not calls_self_retry(type(kit_style))
    assert tutorial.retry_policy().raise_fails and nested.retry_policy().raise_fails
    assert not kit_style.retry_policy().raise_fails  # max_retries alone keeps "raise to retry"
    assert not retry_after.retry_policy().raise_fails  # self.retry without Celery options: the kit's policy
    assert not explicit.retry_policy().raise_fails
    assert strict.retry_policy().raise_fails


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"acks_late": False}, "sets acks_late=False"),
        ({"autoretry_for": ConnectionError()}, "autoretry_for=ConnectionError() is not an exception class"),
        ({"retry_kwargs": [1]}, "retry_kwargs=[1] is not a dict"),
        ({"max_retries": -1}, "max_retries=-1 is not a number >= 0"),
    ],
)
def test_unsafe_or_malformed_declarations_are_refused(unit_app, options, fragment):
    name = f"unit.refused_{abs(hash(fragment))}"
    with pytest.raises(TaskDefinitionError) as info:
        @unit_app.task(shared=False, name=name, **options)
        def refused():
            pass
    assert name in str(info.value) and fragment in str(info.value)


def test_decisions_travel_from_the_pool_to_the_main_process():
    retry = pickle.loads(pickle.dumps(KitRetry(exc=ConnectionError("down"), when=1.5, rule="autoretry-for")))
    assert (retry.when, retry.rule, type(retry.exc)) == (1.5, "autoretry-for", ConnectionError)
    assert "by rule autoretry-for" in str(retry)
    exc = ValueError("bad")
    mark_final(exc, "id-1", 2, Decision(False, h.REASON_PERMANENT, rule="manual-retry"))
    copy = pickle.loads(pickle.dumps(exc))
    assert final_decision(copy, "id-1", 2) == Decision(False, h.REASON_PERMANENT, rule="manual-retry")
    assert final_decision(copy, "id-1", 3) is None  # another delivery: decided again
    assert final_decision(ValueError(), "id-1", 2) is None


# -- pools ------------------------------------------------------------------------------------


def test_pool_names_and_warnings():
    from celery.concurrency.prefork import TaskPool as Prefork
    from celery.concurrency.thread import TaskPool as Threads

    assert [pools.pool_name(p) for p in (Threads, Prefork, "solo", "processes", None)] == [
        "threads", "prefork", "solo", "prefork", "prefork"]
    assert pools.warning_for("prefork") is None
    for pool in ("threads", "solo", "gevent", "eventlet"):
        text = pools.warning_for(pool)
        assert f"pool {pool!r} cannot enforce time limits" in text and "KIT_SOFT_TIME_LIMIT" in text
        assert "\n" not in text


@pytest.fixture
def threads_pool() -> Any:
    pools.configure("threads")
    yield
    pools.configure("prefork")


def _task(soft: float | None, hard: float | None) -> Any:
    return SimpleNamespace(name="unit.slow", request=SimpleNamespace(id="t1", timelimit=(hard, soft)),
                           soft_time_limit=None, time_limit=None)


def _loop(swallow: bool, seconds: float = 5) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except Exception:  # noqa: BLE001 - a task that swallows its soft limit
            if not swallow:
                raise
    return "ran out"


def test_the_kit_enforces_time_limits_on_the_threads_pool(threads_pool):
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        pools.run_within_time_limits(_task(0.3, 1), _loop, (False,), {})
    assert 0.25 < time.monotonic() - started < 0.9
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        pools.run_within_time_limits(_task(0.2, 0.5), _loop, (True,), {})  # swallows the soft one
    assert 0.45 < time.monotonic() - started < 1.5
    # In another thread too, and a run that ends in time is left alone, also afterwards.
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(
        pools.run_within_time_limits(_task(0.5, 0.8), _loop, (False, 0.1), {})))
    worker.start()
    worker.join(5)
    time.sleep(1)
    assert outcome == ["ran out"]


def test_prefork_runs_without_the_watchdog():
    pools.configure("prefork")
    assert pools.run_within_time_limits(_task(0.01, 0.02), _loop, (False, 0.1), {}) == "ran out"
