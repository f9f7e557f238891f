"""``python -m service topology declare|verify``: the exchanges and queues of service/queues.py on the broker."""

from __future__ import annotations

import sys

import click

from service import queues
from service.cli.base import EXIT_FAILED, connected, friendly_errors
from service.settings import load


@click.group()
def topology() -> None:
    """Declare or verify the exchanges and queues of service/queues.py."""


@topology.command("declare")
@friendly_errors
def topology_declare() -> None:
    """Declare every exchange, queue and binding (idempotent)."""
    from service.topology import declare_on

    declare_on(load())
    click.echo(
        f"declared {len(queues.EXCHANGES)} exchanges and {len(queues.ALL_QUEUES)} queues "
        f"({len(queues.WORK_QUEUES)} work, {len(queues.DEAD_LETTER_QUEUES)} dead-letter, "
        f"{len(queues.WAIT_QUEUES)} wait)"
    )


@topology.command("verify")
@friendly_errors
def topology_verify() -> None:
    """Compare the live broker with the code; exit 1 when they differ. Creates nothing."""
    from service.topology import verify

    with connected(load()) as conn:
        drift = verify(conn)
    if not drift:
        click.echo(f"ok: {len(queues.EXCHANGES)} exchanges and {len(queues.ALL_QUEUES)} queues match the code")
        return
    for item in drift:
        click.echo(f"drift: {item.describe()}")
    click.echo(f"{len(drift)} difference(s) between the broker and service/queues.py", err=True)
    sys.exit(EXIT_FAILED)
