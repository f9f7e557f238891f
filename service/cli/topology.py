"""``python -m service topology declare|verify|migrate``: the exchanges and queues of service/queues.py."""

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

    settings = load()
    profile = queues.topology(settings.queue_type)
    declare_on(settings)
    lanes = f"{len(profile.lanes)} high lane, " if profile.lanes else ""
    click.echo(
        f"declared {len(queues.EXCHANGES)} exchanges and {len(profile.all_queues)} {profile.queue_type} queues "
        f"({len(profile.work_queues)} work, {lanes}{len(profile.dead_letter_queues)} dead-letter, "
        f"{len(profile.wait_queues)} wait)"
    )


@topology.command("verify")
@friendly_errors
def topology_verify() -> None:
    """Compare the live broker with the code (KIT_QUEUE_TYPE's profile); exit 1 when they differ. Creates nothing."""
    from service.topology import verify

    settings = load()
    profile = queues.topology(settings.queue_type)
    with connected(settings) as conn:
        drift = verify(conn, profile)
    if not drift:
        click.echo(f"ok: {len(queues.EXCHANGES)} exchanges and {len(profile.all_queues)} {profile.queue_type} "
                   "queues match the code")
        return
    for item in drift:
        click.echo(f"drift: {item.describe()}")
    click.echo(f"{len(drift)} difference(s) between the broker and service/queues.py", err=True)
    sys.exit(EXIT_FAILED)


@topology.command("migrate")
@click.option("--to", "target", type=click.Choice(queues.QUEUE_TYPES), required=True,
              help="The queue type every queue of the kit moves to.")
@click.option("--dry-run", is_flag=True,
              help="Show each queue's type now and after and the messages that would move; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def topology_migrate(target: str, dry_run: bool, yes: bool) -> None:
    """Move every queue, with its messages, to classic or quorum queues (stop the workers first).

    Each queue is re-created as the other type, its messages waiting meanwhile in
    <queue>.migrating; running it again finishes an interrupted migration.
    """
    from service.migration import MigrationError, migrate, plan, require_idle
    from service.topology import verify

    settings = load()
    with connected(settings) as conn:
        current = plan(conn, target)
        for item in current.queues:
            click.echo(item.describe())
        click.echo(current.summary() + (" (dry run: nothing changed)" if dry_run else ""))
        if dry_run:
            return
        if not current.changes:
            click.echo(f"nothing to migrate: every queue is a {target} queue already")
        else:
            require_idle(current)
            if not yes:
                if not sys.stdin.isatty():
                    raise MigrationError(f"{current.moving} message(s) would move; pass --yes to migrate without "
                                         "a prompt")
                click.confirm(f"Move {current.moving} message(s) and re-create the queues as {target} queues?",
                              abort=True)
            outcome = migrate(conn, settings, target, progress=lambda step: click.echo(step.describe()))
            click.echo(f"migrated {outcome.total} message(s) in {len(outcome.moved)} queue(s) to {target} queues "
                       f"in {outcome.seconds:.1f}s")
            if outcome.unroutable_after > outcome.unroutable_before:
                click.echo(f"warning: {outcome.unroutable_after - outcome.unroutable_before} task(s) reached "
                           f"{queues.UNROUTABLE_QUEUE} while their work queue was re-created; put them back with "
                           f"`python -m service dlq replay --queue unroutable`", err=True)
        profile = queues.topology(target)
        drift = verify(conn, profile)
    for item in drift:
        click.echo(f"drift: {item.describe()}")
    if not drift:
        click.echo(f"ok: {len(queues.EXCHANGES)} exchanges and {len(profile.all_queues)} {target} queues match "
                   "the code")
    if settings.queue_type != target:
        click.echo(f"next: set KIT_QUEUE_TYPE={target} for the workers, beat and every publisher, then start the "
                   "workers")
    if drift:
        sys.exit(EXIT_FAILED)
