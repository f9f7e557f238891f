"""Check a delivered task message completely before Celery's request machinery sees it.

Celery reads a message's headers and body in many places (the consumer, the
request, the pool, the tracer) and a wrong type in any of them can lose the
message (kwargs that are not a mapping are acked and gone) or wedge the worker
(a ``retries`` of ``"abc"`` raises in a pool callback, and the message is
neither acked nor rejected). ``problem`` reads every field of Celery's task
protocol 2 that the worker or the kit reads, and says, in one line, the first
one that is wrong. The consumer dead-letters such a message as
``invalid-message`` with that line.

Pure logic: no broker, no Celery app.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from celery.utils.time import maybe_iso8601

from service import headers as h
from service import queues

#: Largest count (retries, worker losses, replays, waits) a message may carry.
MAX_COUNT = 2**31 - 1
#: The keys of a protocol-2 body's third element.
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


class Invalid(ValueError):
    """One field of a message is wrong; the text names it and says what is wrong."""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _optional_text(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise Invalid(f"header {name!r} must be a string or null, got {type(value).__name__} {_describe(value)}")


def _required_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"header {name!r} must be a non-empty string, got {_describe(value)}")


def _count(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise Invalid(f"header {name!r} must be a whole number from 0 to {MAX_COUNT}, got {_describe(value)}")


def _optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise Invalid(f"header {name!r} must be true, false or null, got {_describe(value)}")


def _finite_number(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(f"header {name!r} must be a finite number, got {_describe(value)}")


def parse_time(name: str, value: Any) -> datetime | None:
    """An ``eta``/``expires`` header as Celery reads it: null, or an ISO 8601 string.

    Raises Invalid for any other type, an unparsable string, or a year Celery
    cannot turn into a timestamp.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Invalid(f"header {name!r} must be an ISO 8601 time or null, got {type(value).__name__} "
                      f"{_describe(value)}")
    try:
        parsed = maybe_iso8601(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Invalid(f"header {name!r} is not an ISO 8601 time: {_describe(value)} ({exc})") from None
    if parsed is None or not 1970 < parsed.year < 9999:
        raise Invalid(f"header {name!r} is out of range: {_describe(value)}")
    return parsed


def _timelimit(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise Invalid(f"header 'timelimit' must be [soft, hard] (seconds or null), got {_describe(value)}")
    for limit in value:
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise Invalid(f"header 'timelimit' must hold positive seconds or null, got {_describe(value)}")


def _text_list(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"header {name!r} must be a list of strings or null, got {_describe(value)}")


def _mapping(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise Invalid(f"header {name!r} must be a mapping or null, got {_describe(value)}")


#: Header -> its check. Every header Celery's worker or the kit reads is here;
#: others (a caller's own) are passed through untouched.
HEADER_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {
    "task": _required_text,
    "id": _required_text,
    "lang": _optional_text,
    "shadow": _optional_text,
    "root_id": _optional_text,
    "parent_id": _optional_text,
    "group": _optional_text,
    "group_index": _count,
    "retries": _count,
    "eta": parse_time,
    "expires": parse_time,
    "timelimit": lambda _name, value: _timelimit(value),
    "argsrepr": _optional_text,
    "kwargsrepr": _optional_text,
    "origin": _optional_text,
    "ignore_result": _optional_bool,
    "replaced_task_nesting": _count,
    "stamped_headers": _text_list,
    "stamps": _mapping,
    "sentry-trace": _optional_text,
    "baggage": _optional_text,
    h.WORKER_LOST: _count,
    h.REPLAYS: _count,
    h.WAITS: _count,
    h.ENQUEUED_AT: _finite_number,
    queues.WAIT_HEADER: _optional_text,
}


#: Headers whose check passes for None or a str, and for a count of None or a plain int
#: in range: tested inline first, since every message carries most of them.
_TEXT_CHECKS = frozenset(name for name, check in HEADER_CHECKS.items() if check is _optional_text)
_COUNT_CHECKS = frozenset(name for name, check in HEADER_CHECKS.items() if check is _count)
_REQUIRED = frozenset(name for name, check in HEADER_CHECKS.items() if check is _required_text)


def check_headers(headers: Any) -> None:
    """Raise Invalid naming the first header that Celery or the kit could not use."""
    if not isinstance(headers, Mapping):
        raise Invalid(f"the message headers must be a table, got {type(headers).__name__}")
    if "task" not in headers:
        raise Invalid("header 'task' is missing: not a Celery task message of protocol 2 "
                      "(protocol 1 is not accepted; Celery has published protocol 2 since 4.0)")
    if "id" not in headers:
        raise Invalid("header 'id' is missing: every task message needs its task id")
    _required_text("task", headers["task"])
    _required_text("id", headers["id"])
    for name, value in headers.items():
        if value is None and name not in _REQUIRED or (name in _TEXT_CHECKS and value.__class__ is str):
            continue
        if name in _COUNT_CHECKS and value.__class__ is int and 0 <= value <= MAX_COUNT:
            continue
        check = HEADER_CHECKS.get(name)
        if check is not None:
            check(name, value)


def _signature(where: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise Invalid(f"{where} must be a task signature (a mapping), got {_describe(value)}")
    task = value.get("task")
    if not isinstance(task, str) or not task:
        raise Invalid(f"{where} must name its task (a non-empty 'task' string), got {_describe(task)}")
    if not isinstance(value.get("args", ()), (list, tuple)):
        raise Invalid(f"{where}.args must be a list, got {_describe(value.get('args'))}")
    for key in ("kwargs", "options"):
        if not isinstance(value.get(key, {}), Mapping):
            raise Invalid(f"{where}.{key} must be a mapping, got {_describe(value.get(key))}")
    if not isinstance(value.get("subtask_type"), (str, type(None))):
        raise Invalid(f"{where}.subtask_type must be a string or null, got {_describe(value.get('subtask_type'))}")


def _signatures(where: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)):
        raise Invalid(f"{where} must be a list of task signatures or null, got {_describe(value)}")
    for index, item in enumerate(value):
        _signature(f"{where}[{index}]", item)


def check_body(body: Any) -> None:
    """Raise Invalid unless ``body`` is ``[args, kwargs, embed]`` as protocol 2 defines it."""
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        raise Invalid(f"the body must be [args, kwargs, embed] (task protocol 2), got {_describe(body)}")
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        raise Invalid(f"the body's args must be a list, got {type(args).__name__} {_describe(args)}")
    if not isinstance(kwargs, Mapping):
        raise Invalid(f"the body's kwargs must be a mapping, got {type(kwargs).__name__} {_describe(kwargs)}")
    if not all(isinstance(key, str) for key in kwargs):
        raise Invalid(f"the body's kwargs must have string keys, got {_describe(list(kwargs))}")
    if embed is None:
        return
    if not isinstance(embed, Mapping):
        raise Invalid(f"the body's embed must be a mapping, got {type(embed).__name__} {_describe(embed)}")
    for key in ("callbacks", "errbacks", "chain"):
        _signatures(f"embed.{key}", embed.get(key))
    if embed.get("chord") is not None:
        _signature("embed.chord", embed["chord"])


def problem(headers: Any, body: Any) -> str | None:
    """None when the message is a usable protocol-2 task message, else what is wrong with it."""
    try:
        check_headers(headers)
        check_body(body)
    except Invalid as exc:
        return str(exc)
    return None
