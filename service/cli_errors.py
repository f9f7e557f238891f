"""How every command reports an error the operator can act on: one line, a status, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from service.errors import KitError
from service.settings import ConfigError

#: Exit status of a command that could not do what it was asked.
EXIT_ERROR = 2


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn KitError and ConfigError into ``error: <message>`` on stderr and exit status 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (KitError, ConfigError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper
