"""``python -m service flower``: Celery's Flower behind basic auth, the login read from KIT_FLOWER_AUTH_FILE.

Flower's API can revoke tasks and shut workers down, so it never runs without
a login: the file must hold one ``user:password`` line with a password of at
least MIN_PASSWORD_LENGTH characters, or the command stops with one line. The
login reaches Flower through its FLOWER_BASIC_AUTH environment variable (Flower
2.x reads every FLOWER_* variable as its option), never through the command
line, where ``ps`` shows it to every user of the machine. The command then
execs ``celery -A service.app flower`` with the remaining arguments, so Flower
keeps this process' pid and gets its signals. Flower's /healthcheck and
/metrics answer without the login; its pages and /api/* ask for it
(FLOWER_UNAUTHENTICATED_API, which would open the API, is not passed on).
"""

from __future__ import annotations

import os
import sys

import click

from service.cli.base import friendly_errors
from service.errors import KitError
from service.settings import ConfigError, load, read_secret

#: Shortest password accepted (the console's users have the same floor).
MIN_PASSWORD_LENGTH = 12
#: Flower's environment variable of its --basic-auth option.
AUTH_VARIABLE = "FLOWER_BASIC_AUTH"
#: Flower options that would put a login on the command line.
_AUTH_FLAGS = ("--basic-auth", "--basic_auth")
#: Flower's switch that opens its API without a login: never passed on.
_OPEN_API_VARIABLE = "FLOWER_UNAUTHENTICATED_API"


def read_login(path: str) -> str:
    """The ``user:password`` of the file at ``path``; ConfigError (naming no password) when it does not qualify."""
    if not path:
        raise ConfigError(
            "KIT_FLOWER_AUTH_FILE is not set: Flower (whose API can revoke tasks and shut workers down) "
            "does not start without a login; point it at a file holding one user:password line "
            "(scripts/make-secrets.sh writes secrets/flower_basic_auth).")
    where = f"KIT_FLOWER_AUTH_FILE={path!r}"
    text = read_secret(path, unreadable=f"{where} cannot be read: {{error}}.",
                       missing=f"{where} does not exist; it must hold one user:password line.",
                       empty=f"{where} is empty; it must hold one user:password line.")
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{where} holds more than one line; it must hold one user:password line.")
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise ConfigError(f"{where} is not user:password (a user name, a colon, then the password).")
    if any(ch.isspace() for ch in user) or any(not ch.isprintable() for ch in text):
        raise ConfigError(f"{where}: the user name has a space, or the line a control character.")
    if "," in text:
        raise ConfigError(f"{where} has a comma, which Flower reads as the end of one login and the start "
                          "of another; choose a password without commas.")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"{where}: the password has {len(password)} characters; at least "
                          f"{MIN_PASSWORD_LENGTH} are needed.")
    return text


def flower_argv(args: tuple[str, ...]) -> list[str]:
    """``celery -A service.app flower ARGS`` with this Python; KitError for a login on the command line."""
    for arg in args:
        if arg.split("=", 1)[0] in _AUTH_FLAGS:
            raise KitError(f"{arg.split('=', 1)[0]} would show the login to anyone running `ps`: "
                           "put it in the file of KIT_FLOWER_AUTH_FILE instead")
    return [sys.executable, "-m", "celery", "-A", "service.app", "flower", *args]


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def flower(flower_args: tuple[str, ...]) -> None:
    """Run Celery's Flower behind basic auth (the login in KIT_FLOWER_AUTH_FILE).

    Arguments are Flower's own, passed on as they are (--address=0.0.0.0
    --port=5555, ...). Refuses to start when KIT_FLOWER_AUTH_FILE is unset,
    missing, empty, not one user:password line, or its password is shorter
    than 12 characters. /healthcheck and /metrics need no login.
    """
    login = read_login(load().flower_auth_file)
    argv = flower_argv(flower_args)
    sys.stdout.flush()
    sys.stderr.flush()
    env = {k: v for k, v in os.environ.items() if k != _OPEN_API_VARIABLE}
    os.execve(argv[0], argv, {**env, AUTH_VARIABLE: login})
