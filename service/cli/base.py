"""How every command reports an error the operator can act on: one line, a status, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import amqp
import click
from kombu.exceptions import OperationalError

from service.connection import permission_refused
from service.errors import KitError
from service.settings import ConfigError

#: Exit status of a command that could not do what it was asked.
EXIT_ERROR = 2


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
