"""``python -m service console``: the dead-letter console (service/console/) and its users."""

from __future__ import annotations

import sys

import click

from service.cli.base import friendly_errors
from service.settings import load

_USERS_FILE = click.option("--users-file", metavar="FILE",
                           help="The users file (default: KIT_CONSOLE_USERS_FILE).")


@click.group(invoke_without_command=True)
@click.option("--host", help="Address to listen on (default: KIT_CONSOLE_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to listen on (default: KIT_CONSOLE_PORT, 5580).")
@click.pass_context
@friendly_errors
def console(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Run the dead-letter console: see, search, replay, purge and export dead letters in a browser.

    Log in with a user of KIT_CONSOLE_USERS_FILE (create the first with
    `console add-user NAME --role operator`). Viewers read; operators also
    replay, purge, export and see task arguments. Metrics at /metrics, health
    at /healthz. Stops on Ctrl-C or SIGTERM.
    """
    if ctx.invoked_subcommand is not None:
        return
    from service.console import read_users, serve

    settings = load()
    if not read_users(settings.console_users_file):
        click.echo(f"note: {settings.console_users_file} lists no user yet: create one with "
                   "`python -m service console add-user NAME --role operator`", err=True)

    def listening(url: str) -> None:
        click.echo(f"dead-letter console on {url}")

    serve(settings, host=host, port=port, on_listening=listening)


@console.command("add-user")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator"]), default="viewer", show_default=True,
              help="viewer reads; operator also replays, purges, exports and sees arguments.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (one line).")
@_USERS_FILE
@friendly_errors
def add_user(name: str, role: str, password_stdin: bool, users_file: str | None) -> None:
    """Add a console user (or change its role and password); asks for the password."""
    from service.console import add_user as add

    path = users_file or load().console_users_file
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    created = add(path, name, role, password)
    click.echo(f"{'added' if created else 'updated'} {name} ({role}) in {path}")


@console.command("remove-user")
@click.argument("name")
@_USERS_FILE
@friendly_errors
def remove_user(name: str, users_file: str | None) -> None:
    """Remove a console user (their open sessions end within KIT_CONSOLE_SESSION_TTL at the latest)."""
    from service.console import remove_user as remove

    path = users_file or load().console_users_file
    if not remove(path, name):
        raise click.ClickException(f"{path} has no user {name!r}")
    click.echo(f"removed {name} from {path}")


@console.command("users")
@_USERS_FILE
@friendly_errors
def users(users_file: str | None) -> None:
    """List the console's users and their roles."""
    from service.console import read_users

    path = users_file or load().console_users_file
    listed = read_users(path)
    for user in listed.values():
        click.echo(f"{user.name}\t{user.role}")
    click.echo(f"{len(listed)} user(s) in {path}", err=True)
