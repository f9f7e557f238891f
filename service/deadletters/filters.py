"""Which dead letters an operation takes: the filters of ``dlq list|replay|purge|export``."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from service.deadletters.letter import DeadLetterError, as_utc

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (``2026-11-21``, ``2026-11-21T14:00``, with or without zone; UTC
    when none) or an age (``30m``, ``2h``, ``7d`` ago)."""
    value = text.strip()
    match = _RELATIVE.match(value)
    if match:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise DeadLetterError(
            f"cannot read the time {text!r}: use ISO 8601 (2026-11-21 or 2026-11-21T14:30:00Z) "
            "or an age like 30m, 2h, 7d"
        ) from None


class Matchable(Protocol):
    """What ``Filters.match`` reads of a dead letter: a ``DeadLetter``, or any row with these attributes."""

    @property
    def id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def exception_type(self) -> str: ...
    @property
    def exception_message(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def died_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class Filters:
    """Which dead letters an operation takes. Empty fields match everything; given ones must all match.

    ``tasks`` and ``exceptions`` accept shell-style patterns (``emails.*``,
    ``*Timeout*``); ``exceptions`` matches the qualified or the short class name.
    ``search`` is text, any case, found anywhere in the exception's message or
    in its qualified class name: ``timeout`` finds ``TimeoutError`` and "read
    timeout after 5 s" alike (surrounding blanks ignored; empty: no search).
    ``ids`` may hold thousands of task ids: each letter is looked up in a set.
    The tuple fields take any iterable and keep it as a tuple.
    """

    tasks: tuple[str, ...] = ()
    exceptions: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    search: str = ""
    _ids: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())
    _needle: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        for name in ("tasks", "exceptions", "reasons", "ids"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "_ids", frozenset(self.ids))
        object.__setattr__(self, "_needle", (self.search or "").strip().casefold())

    def match(self, letter: Matchable) -> bool:
        """True when ``letter`` passes every filter given."""
        if self._ids and letter.id not in self._ids:
            return False
        if self.tasks and not any(fnmatch.fnmatchcase(letter.task, p) for p in self.tasks):
            return False
        if self.exceptions:
            full = letter.exception_type
            short = full.rsplit(".", 1)[-1]
            if not any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(short, p) for p in self.exceptions):
                return False
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self._needle and (self._needle not in (letter.exception_message or "").casefold()
                             and self._needle not in (letter.exception_type or "").casefold()):
            return False
        if self.since or self.until:
            died = letter.died_at
            if died is None or (self.since and died < self.since) or (self.until and died > self.until):
                return False
        return True
