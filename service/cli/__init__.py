"""The command line: ``python -m service ...``, one module per command group.

What lives here: ``main`` (the top-level group, which checks the settings
before a command runs), ``base`` (one-line errors, exit codes, JSON
parameters, the broker connection) and one module per group: ``config``,
``topology``, ``publish``, ``worker`` (worker and beat), ``demo``, ``stack``,
``broker``, ``dlq``, ``task``, ``web``, ``flower`` and ``relay`` (``alert-relay``).
Commands parse and print; the library acts. A new group
is a module here with one ``main.add_command`` line below.

May import anything of the kit; nothing of the kit imports it (only
``service.__main__``).
"""

from __future__ import annotations

import click

from service.cli import (
    broker,
    config,
    console,
    demo,
    dlq,
    flower,
    publish,
    relay,
    stack,
    task,
    topology,
    web,
    worker,
)
from service.cli.base import friendly_errors
from service.cli.config import markdown_table
from service.settings import load

#: Top-level commands that run without valid settings (`config` validates them itself).
NEEDS_NO_SETTINGS = frozenset({"config"})
_CHECK_SETTINGS = "kit.check_settings"


def needs_settings(group: click.Group, ctx: click.Context, args: list[str]) -> bool:
    """Whether the command line ``args`` (after the group's name) runs a command that uses the settings.

    It does not when it asks for help (-h/--help before any ``--``), names a group
    without its subcommand (click prints the group's help), names an unknown
    command (click reports it), or runs a command of NEEDS_NO_SETTINGS.
    """
    words = args[: args.index("--")] if "--" in args else args
    if any(word in ctx.help_option_names for word in words):
        return False
    command: click.Command | None = group
    for word in args:
        if not isinstance(command, click.Group):
            break
        if command is group and word in NEEDS_NO_SETTINGS:
            return False
        command = command.get_command(ctx, word)
        if command is None:
            return False
    return not isinstance(command, click.Group)


class KitGroup(click.Group):
    """The top-level group: notes whether the command it is about to run needs the settings."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does, after noting (in ``ctx.meta``) whether to validate the settings."""
        ctx.meta[_CHECK_SETTINGS] = needs_settings(self, ctx, args)
        return super().parse_args(ctx, args)


@click.group(cls=KitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Celery on RabbitMQ kit: topology, publishing, workers and beat.

    Configuration comes from KIT_* environment variables (see README.md); every
    command checks them before it connects anywhere.
    """
    if ctx.meta.get(_CHECK_SETTINGS, True):
        friendly_errors(load)()  # a bad value: one `error: KIT_X=...` line, exit status 2


main.add_command(config.config)
main.add_command(topology.topology)
main.add_command(publish.publish)
main.add_command(worker.worker)
main.add_command(worker.beat)
main.add_command(demo.demo)
main.add_command(stack.stack)
main.add_command(broker.broker)
main.add_command(dlq.dlq)
main.add_command(task.task)
main.add_command(web.web)
main.add_command(console.console)
main.add_command(flower.flower)
main.add_command(relay.alert_relay)

__all__ = ["main", "markdown_table", "needs_settings"]
