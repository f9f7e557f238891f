"""``python -m service task ...``: the status of a published task, and cancelling it."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from service.cli.base import EXIT_FAILED, friendly_errors
from service.status import TaskStatus

#: Exit status of ``status --watch`` interrupted with Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: The order fields are printed in (besides the state line).
_FIELDS = ("name", "worker", "progress", "result", "error", "reason", "dead_letter_queue", "replayable", "attempt",
           "due_at", "updated_at", "source", "note")


@click.group()
def task() -> None:
    """Look up and cancel published tasks by id.

    With KIT_RESULT_BACKEND (Redis) every state is known: unknown, queued,
    running, progress, retrying, succeeded, dead-lettered, replayed, expired,
    revoked. Without it `status` answers only what the dead-letter and wait
    queues show, and `cancel` is not available.
    """


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _print(found: TaskStatus, as_json: bool, *, lines: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(found.to_dict(), default=str, indent=None if lines else 2))
        return
    data = found.to_dict()
    click.echo(f"{found.task_id}: {found.state}")
    for name in _FIELDS:
        value = data[name]
        if value is None or (name == "replayable" and found.dead_letter_queue is None):
            continue
        click.echo(f"  {name.replace('_', ' ')}: {_shown(value)}")


@task.command()
@click.argument("task_id")
@click.option("--watch", is_flag=True,
              help="Poll until the task reaches a final state (succeeded, dead-lettered, expired, revoked) and "
                   "print each change; exit 0 when it succeeded, 1 otherwise, 130 on Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.05, max=3600), default=1.0, show_default=True,
              help="Seconds between polls with --watch.")
@click.option("--timeout", type=click.FloatRange(min=0), help="With --watch: give up after this many seconds "
                                                               "(exit 1).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --watch: one object per line).")
@friendly_errors
def status(task_id: str, watch: bool, interval: float, timeout: float | None, as_json: bool) -> None:
    """Print the state of task TASK_ID (the id `publish` printed).

    Example: python -m service task status 6f1c... --watch --interval 0.5
    """
    from service.status import status as look_up

    if not watch:
        _print(look_up(task_id), as_json)
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    last: dict[str, Any] | None = None
    try:
        while True:
            found = look_up(task_id)
            if found.to_dict() != last:
                last = found.to_dict()
                _print(found, as_json, lines=True)
            if found.final:
                sys.exit(0 if found.state == "succeeded" else EXIT_FAILED)
            if deadline is not None and time.monotonic() >= deadline:
                click.echo(f"error: task {task_id} is still {found.state} after {timeout:g}s", err=True)
                sys.exit(EXIT_FAILED)
            time.sleep(interval)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


@task.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the state after the cancel as JSON.")
@friendly_errors
def cancel(task_id: str, as_json: bool) -> None:
    """Cancel task TASK_ID so it never runs, if it has not run yet.

    A queued or waiting task (retry, countdown) is dead-lettered with reason
    `revoked` by the next worker that receives it, also after a worker restart:
    the cancel is kept in KIT_RESULT_BACKEND (Redis), which it needs. A running
    task finishes its run but does not run again. `dlq replay` of a revoked task
    runs it. Exit status 0 when cancelled, 1 when the task had finished already.
    """
    from service.status import revoke

    found = revoke(task_id)
    _print(found, as_json)
    if found.final and found.state != "revoked":
        sys.exit(EXIT_FAILED)
