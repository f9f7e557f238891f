"""What every command shares: one-line errors and exit codes, JSON parameters, the broker connection.

An error the operator can act on is one ``error: ...`` line on stderr with
exit status EXIT_ERROR (2), never a traceback (``friendly_errors``). A command
that ran but found something wrong (drift, an unhealthy component, a replay
that failed part-way) exits with EXIT_FAILED (1).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import amqp
import click
from kombu import Connection
from kombu.exceptions import OperationalError

from service.connection import permission_refused
from service.errors import KitError
from service.settings import ConfigError, Settings

#: Exit status of a command that could not do what it was asked.
EXIT_ERROR = 2
#: Exit status of a command that ran and found a problem: drift, an unhealthy stack, a partial replay.
EXIT_FAILED = 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn KitError and ConfigError into ``error: <message>`` on stderr and exit status 2.

    So are the broker's own refusals and dropped connections that reach a
    command after it connected (a 403 on a queue the user may not read, a
    broker that went away): one line naming what was refused, never a traceback.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (KitError, ConfigError) as exc:
            message = str(exc)
        except amqp.exceptions.AccessRefused as exc:
            message = str(permission_refused(exc, "this command"))
        except (amqp.exceptions.AMQPError, OperationalError, ConnectionError, TimeoutError) as exc:
            message = (f"the broker connection failed during the command ({type(exc).__name__}: {exc}); "
                       "check that RabbitMQ runs and KIT_BROKER_URL is right")
        click.echo(f"error: {_one_line(message)}", err=True)
        sys.exit(EXIT_ERROR)

    return wrapper


def json_option(value: str | None, what: str, kind: type) -> Any:
    """The JSON of option ``what`` as ``kind`` (list or dict; empty when None); BadParameter otherwise."""
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(parsed, kind):
        raise click.BadParameter(f"{what} must be a JSON {'array' if kind is list else 'object'}")
    return parsed


@contextmanager
def connected(settings: Settings) -> Iterator[Connection]:
    """A broker connection with ``settings`` (service.topology.connect), released at the end."""
    from service.topology import connect

    conn = connect(settings)
    try:
        yield conn
    finally:
        conn.release()
