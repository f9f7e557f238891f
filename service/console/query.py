"""The filters of the console's pages and forms, read as ``dlq`` reads its options.

The same names as the CLI's options: ``queue`` (``default`` or ``default.dead``,
``unroutable``; repeatable), ``task``, ``exception``, ``reason``, ``id``
(repeatable), ``since``, ``until`` (ISO 8601 or an age like ``2h``) and
``search`` (text in the exception message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from service import deadletters as dl

#: The filter fields, in the order forms and links show them.
FIELDS = ("queue", "task", "exception", "reason", "id", "since", "until", "search")
_REPEATABLE = ("queue", "task", "exception", "reason", "id")


class QueryError(dl.DeadLetterError):
    """A filter value cannot be read (the page says which and why)."""


@dataclass(frozen=True)
class Selection:
    """Which queues and which letters a page or an operation takes."""

    queues: list[str]
    filters: dl.Filters
    values: dict[str, list[str]]  # what the user typed, for forms and links

    def shown(self) -> dict[str, Any]:
        """The filter as the audit line and the pages show it (only the fields given)."""
        return {k: (v if len(v) > 1 else v[0]) for k, v in self.values.items() if v}

    def query_string(self, **extra: Any) -> str:
        """The selection as a query string (for links), plus ``extra``."""
        pairs = [(k, v) for k, values in self.values.items() for v in values]
        pairs += [(k, v) for k, v in extra.items() if v is not None]
        return urlencode(pairs)


def read_selection(params: Mapping[str, Any] | Any) -> Selection:
    """The selection of a request's query or form (``getlist`` where repeatable); QueryError when bad."""
    values: dict[str, list[str]] = {}
    for name in FIELDS:
        raw = params.getlist(name) if hasattr(params, "getlist") else [params.get(name)]
        items = [str(v).strip() for v in raw if v is not None and str(v).strip()]
        if name not in _REPEATABLE:
            items = items[:1]
        values[name] = items
    try:
        names = dl.resolve_queues(values["queue"])
        since = dl.parse_moment(values["since"][0]) if values["since"] else None
        until = dl.parse_moment(values["until"][0]) if values["until"] else None
    except dl.DeadLetterError as exc:
        raise QueryError(str(exc)) from None
    filters = dl.Filters(tasks=tuple(values["task"]), exceptions=tuple(values["exception"]),
                         reasons=tuple(values["reason"]), ids=tuple(values["id"]), since=since, until=until,
                         search=values["search"][0] if values["search"] else "")
    return Selection(names, filters, values)
