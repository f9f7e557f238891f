"""The client refuses bad input before anything is sent (no broker needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from service import queues
from service.client import TaskRequest, build_message
from service.errors import InvalidTaskInput

LIMIT = 10_000


def build(**kwargs):
    return build_message(TaskRequest(**{"name": "emails.send", **kwargs}), LIMIT)


def test_a_valid_request_becomes_a_celery_protocol_2_message():
    task_id, message = build(args=[1, "a"], kwargs={"k": True}, priority="high")
    assert message.exchange == queues.TASK_EXCHANGE
    assert message.routing_key == "urgent"  # emails.* route
    assert message.headers["task"] == "emails.send" and message.headers["id"] == task_id
    assert message.headers["retries"] == 0 and message.headers["eta"] is None
    assert message.properties["priority"] == queues.PRIORITIES["high"]
    assert message.properties["delivery_mode"] == 2
    assert message.properties["content_type"] == "application/json"
    assert json.loads(message.body) == [[1, "a"], {"k": True}, {"callbacks": None, "errbacks": None,
                                                                  "chain": None, "chord": None}]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"queue": "nope"}, "unknown work queue 'nope'"),
        ({"queue": "default.dead"}, "never published to or consumed directly"),
        ({"priority": "urgent"}, "unknown priority 'urgent'"),
        ({"priority": 9}, "out of range 0..3"),
        ({"priority": -1}, "out of range"),
        ({"args": [object()]}, "not JSON-serializable"),
        ({"kwargs": {"when": float("nan")}}, "not JSON-serializable"),
        ({"args": "abc"}, "args must be a list or tuple"),
        ({"kwargs": {1: "x"}}, "string keys"),
        ({"args": ["x" * LIMIT]}, "over the limit of 10000"),
        ({"countdown": -1}, "countdown must be"),
        ({"countdown": 10**10}, "countdown must be a number of seconds from 0 to"),
        ({"countdown": float("nan")}, "countdown must be"),
        ({"countdown": float("inf")}, "countdown must be"),
        ({"name": ""}, "non-empty string"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs, fragment):
    with pytest.raises(InvalidTaskInput, match=None) as info:
        build(**kwargs)
    assert fragment in str(info.value)


def test_countdown_goes_to_a_wait_queue_not_an_eta():
    _, message = build(countdown=3)
    assert message.exchange == queues.RETRY_EXCHANGE
    assert message.headers[queues.WAIT_HEADER] == "4s"
    assert message.properties["expiration"] == "3000"
    assert message.headers["eta"] is None


def test_a_countdown_longer_than_one_wait_carries_its_due_time():
    before = datetime.now(UTC)
    _, message = build(countdown=3 * 3600)
    assert message.exchange == queues.RETRY_EXCHANGE
    assert message.headers[queues.WAIT_HEADER] == "4096s"  # the longest tier, then it waits again
    assert message.properties["expiration"] == "4096000"
    due = datetime.fromisoformat(message.headers["eta"])
    assert timedelta(hours=3) <= due - before < timedelta(hours=3, seconds=5)


def test_the_longest_wait_can_be_shortened():
    _, message = build_message(TaskRequest("emails.send", countdown=10), LIMIT, longest_wait_s=2)
    assert message.headers[queues.WAIT_HEADER] == "2s"
    assert message.properties["expiration"] == "2000"
    assert message.headers["eta"] is not None
