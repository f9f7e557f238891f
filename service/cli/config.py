"""``python -m service config``: the effective configuration, or the README's table of settings."""

from __future__ import annotations

import os

import click

from service.cli.base import friendly_errors
from service.settings import (
    BROKER_URL,
    HTTP_URL,
    RESULT_BACKEND_URL,
    SENTRY_DSN,
    SETTINGS,
    Setting,
    load,
    redact_dsn,
    redact_url,
)

#: The kinds of setting that are URLs, which may carry a password.
URL_KINDS = (BROKER_URL, RESULT_BACKEND_URL, HTTP_URL)


def shown(setting: Setting, value: str) -> str:
    """``value`` of ``setting`` as ``config`` prints it: the password of a URL, the key of a DSN hidden."""
    if setting.kind in URL_KINDS:
        return redact_url(value)
    if setting.kind == SENTRY_DSN:
        return redact_dsn(value)
    return value


def markdown_table() -> str:
    """The README's configuration table: every setting, its default, what it accepts and does."""
    lines = ["| Variable | Default | Accepted | What it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        lines.append(f"| `{s.name}` | {default} | {s.accepted()} | {s.description} |")
    return "\n".join(lines)


@click.command()
@click.option("--markdown", is_flag=True,
              help="Print the table of variables, defaults and accepted values (as in README.md).")
@friendly_errors
def config(markdown: bool) -> None:
    """Show the effective configuration (passwords hidden), or the documented defaults."""
    if markdown:
        click.echo(markdown_table())
        return
    load()  # validates every value
    for s in SETTINGS:
        value = os.environ.get(s.name, s.default)
        click.echo(f"{s.name}={shown(s, value)}{'' if s.name in os.environ else '   (default)'}")
