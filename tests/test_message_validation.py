"""The worker's message check names the field that is wrong (pure logic, no broker)."""

from __future__ import annotations

import math

import pytest

from service import headers as h
from service.worker.validation import problem


def valid_headers(**changes):
    headers = {
        "lang": "py", "task": "test.record", "id": "id-1", "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": "id-1",
        "parent_id": None, "argsrepr": "['x']", "kwargsrepr": "{}", "origin": "gen@host", "ignore_result": False,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    headers.update(changes)
    return headers


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
BODY = [["x"], {}, EMBED]
SIGNATURE = {"task": "test.record", "args": ["y"], "kwargs": {}, "options": {}, "subtask_type": None,
             "immutable": False}


def test_a_celery_message_passes():
    assert problem(valid_headers(), BODY) is None
    assert problem(valid_headers(eta="2026-01-01T00:00:00+00:00", expires="2026-01-01T00:00:00"), BODY) is None
    assert problem(valid_headers(timelimit=[2, 3.5], retries=4), BODY) is None
    embed = {**EMBED, "callbacks": [SIGNATURE], "errbacks": [SIGNATURE], "chain": [SIGNATURE], "chord": SIGNATURE}
    assert problem(valid_headers(), [["x"], {"a": 1}, embed]) is None
    assert problem(valid_headers(), [[], {}, None]) is None


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"retries": "abc"}, "header 'retries' must be a whole number"),
        ({"retries": -1}, "header 'retries'"),
        ({"retries": True}, "header 'retries'"),
        ({"retries": 1.5}, "header 'retries'"),
        ({"retries": 2**40}, "header 'retries'"),
        ({"task": ""}, "header 'task' must be a non-empty string"),
        ({"task": ["a"]}, "header 'task'"),
        ({"task": None}, "header 'task' must be a non-empty string"),
        ({"id": None}, "header 'id' must be a non-empty string"),
        ({"id": 5}, "header 'id'"),
        ({"eta": "tomorrow"}, "header 'eta' is not an ISO 8601 time"),
        ({"eta": 1700000000}, "header 'eta' must be an ISO 8601 time or null"),
        ({"expires": "0001-01-01T00:00:00"}, "header 'expires' is out of range"),
        ({"expires": {"a": 1}}, "header 'expires'"),
        ({"timelimit": 5}, "header 'timelimit' must be [soft, hard]"),
        ({"timelimit": ["a", None]}, "header 'timelimit' must hold positive seconds"),
        ({"timelimit": [math.nan, None]}, "header 'timelimit'"),
        ({"timelimit": [-1, None]}, "header 'timelimit'"),
        ({"root_id": 7}, "header 'root_id' must be a string or null"),
        ({"parent_id": []}, "header 'parent_id'"),
        ({"group": {}}, "header 'group'"),
        ({"group_index": "1"}, "header 'group_index'"),
        ({"ignore_result": "yes"}, "header 'ignore_result'"),
        ({"stamped_headers": "abc"}, "header 'stamped_headers'"),
        ({"stamps": []}, "header 'stamps'"),
        ({"shadow": 3}, "header 'shadow'"),
        ({h.WORKER_LOST: "2"}, f"header {h.WORKER_LOST!r}"),
        ({h.REPLAYS: -3}, f"header {h.REPLAYS!r}"),
        ({h.ENQUEUED_AT: "now"}, f"header {h.ENQUEUED_AT!r} must be a finite number"),
        ({h.ENQUEUED_AT: math.inf}, f"header {h.ENQUEUED_AT!r}"),
    ],
)
def test_a_wrong_header_is_named(changes, fragment):
    found = problem(valid_headers(**changes), BODY)
    assert found is not None and fragment in found
    assert "\n" not in found


def test_missing_headers_are_named():
    headers = valid_headers()
    del headers["id"]
    assert "header 'id' is missing" in problem(headers, BODY)
    assert "protocol 2" in problem({"id": "x"}, BODY)
    assert "headers must be a table" in problem(None, BODY)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ([[], [1, 2], EMBED], "kwargs must be a mapping"),
        ([{}, {}, EMBED], "args must be a list"),
        ([[], {}], "the body must be [args, kwargs, embed]"),
        ({"args": []}, "the body must be"),
        ("text", "the body must be"),
        ([[], {1: 2}, EMBED], "string keys"),
        ([[], {}, []], "embed must be a mapping"),
        ([[], {}, {**EMBED, "callbacks": "x"}], "embed.callbacks must be a list"),
        ([[], {}, {**EMBED, "errbacks": [5]}], "embed.errbacks[0] must be a task signature"),
        ([[], {}, {**EMBED, "chain": [{"args": []}]}], "embed.chain[0] must name its task"),
        ([[], {}, {**EMBED, "chord": {"task": "t", "kwargs": []}}], "embed.chord.kwargs must be a mapping"),
        ([[], {}, {**EMBED, "callbacks": [{**SIGNATURE, "args": "x"}]}], "embed.callbacks[0].args"),
    ],
)
def test_a_wrong_body_is_named(body, fragment):
    found = problem(valid_headers(), body)
    assert found is not None and fragment in found


def test_long_values_are_cut_in_the_message():
    found = problem(valid_headers(retries="x" * 10_000), BODY)
    assert len(found) < 300
