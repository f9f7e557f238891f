"""Pure logic: settings, the README's configuration table, retry decisions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from service import headers as h
from service import queues
from service.errors import PermanentError
from service.retry_policy import Policy, backoff_delay, decide
from service.settings import SETTINGS, ConfigError, load

POLICY = Policy(max_retries=3, backoff_base_s=2, backoff_max_s=600, max_worker_lost=3,
                permanent_exceptions=(KeyError,))


def test_readme_documents_every_setting_with_its_default():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.name}`" in readme
        assert setting.default == "" or f"`{setting.default}`" in readme


def test_defaults_load_and_use_pyamqp(monkeypatch):
    for setting in SETTINGS:
        monkeypatch.delenv(setting.name, raising=False)
    settings = load()
    assert settings.broker_url.startswith("pyamqp://")
    assert settings.hard_time_limit > settings.soft_time_limit


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("KIT_PUBLISH_TIMEOUT", "soon", "KIT_PUBLISH_TIMEOUT='soon' is not a number"),
        ("KIT_BROKER_URL", "redis://localhost", "is not an AMQP URL"),
        ("KIT_HARD_TIME_LIMIT", "10", "must be greater than KIT_SOFT_TIME_LIMIT"),
        ("KIT_MAX_WORKER_LOST", "0", "KIT_MAX_WORKER_LOST='0' is out of range; accepted: an integer from 1 to"),
        ("KIT_PUBLISH_TIMEOUT", "nan", "KIT_PUBLISH_TIMEOUT='nan' is not a finite number"),
    ],
)
def test_bad_settings_are_named(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=None) as info:
        load()
    assert fragment in str(info.value)


def test_backoff_doubles_with_jitter_and_is_capped():
    rng = random.Random(7)
    for retries in range(12):
        ceiling = min(600, 2 * 2**retries)
        delays = [backoff_delay(retries, 2, 600, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d, 6) for d in delays}) > 150  # jittered, not fixed
    assert backoff_delay(100, 2, 10**9) <= queues.WAIT_TIERS_S[-1]


def test_decisions():
    assert decide(POLICY, ConnectionError(), retries=0).retry
    assert decide(POLICY, ConnectionError(), retries=3) == decide(POLICY, ValueError(), retries=3)
    assert decide(POLICY, ConnectionError(), retries=3).reason == h.REASON_RETRIES_EXHAUSTED
    assert decide(POLICY, PermanentError(), retries=0).reason == h.REASON_PERMANENT
    assert decide(POLICY, KeyError(), retries=0).reason == h.REASON_PERMANENT
    assert decide(POLICY, ValueError(), retries=0, permanent_reason="time-limit").reason == "time-limit"
    assert decide(POLICY, RuntimeError(), retries=0, worker_lost=2).retry
    assert decide(POLICY, RuntimeError(), retries=0, worker_lost=3).reason == h.REASON_WORKER_LOST
    assert decide(POLICY, RuntimeError(), retries=0, requested_delay_s=7).delay_s == 7


def test_wait_tiers():
    assert queues.wait_tier_for(0.2) == 1
    assert queues.wait_tier_for(3) == 4
    assert queues.wait_tier_for(4) == 4
    with pytest.raises(ValueError, match="longest wait tier"):
        queues.wait_tier_for(queues.WAIT_TIERS_S[-1] + 1)
