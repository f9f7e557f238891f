"""The console's Jinja2 environment: autoescaped templates and the few filters they use."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi.templating import Jinja2Templates


def ago(moment: float | None) -> str:
    """``12 s ago`` for a time.time() value; ``never`` for None."""
    if moment is None:
        return "never"
    seconds = max(0, int(time.time() - moment))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def moment(value: datetime | str | None) -> str:
    """A time as ``2026-12-01 14:03:07 UTC``; an empty string for None."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def query(**params: Any) -> str:
    """A query string of the given parameters, leaving out empty ones."""
    return urlencode([(k, v) for k, v in params.items() if v not in (None, "")])


def templates(directory: Path) -> Jinja2Templates:
    """The console's templates (autoescaped: every value shown is escaped)."""
    result = Jinja2Templates(directory=str(directory))
    result.env.filters.update(ago=ago, moment=moment)
    result.env.globals.update(query=query)
    return result
