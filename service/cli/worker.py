"""``python -m service worker`` and ``beat``: Celery's own worker and beat, with the kit's settings.

Both replace this process with ``celery -A service.app ...`` (os.execv), after
the checks that make a misconfiguration one ``error:`` line.
"""

from __future__ import annotations

import os
import shutil
import sys

import click

from service import queues
from service.cli.base import friendly_errors
from service.settings import load


def _queue_list(value: str | None) -> list[str]:
    """The work queues of --queues; an unknown one is one ``error:`` line (StartupError), not a usage block."""
    from service.startup import work_queues

    return work_queues((value or "").split(","))


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--queues", "queue_names", metavar="Q1,Q2",
              help=f"Work queues to consume (default: all of {','.join(queues.WORK_QUEUE_NAMES)}).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Processes (default: KIT_CONCURRENCY).")
@click.option("--name", "node_name", help="Node name (default: <queues>@<host>).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def worker(queue_names: str | None, concurrency: int | None, node_name: str | None,
           celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker on work queues only (never dead-letter or wait queues).

    Extra arguments after -- go to `celery worker` unchanged.
    """
    settings = load()
    names = _queue_list(queue_names)
    node = node_name or f"{'-'.join(names)}@%h"
    # prometheus-client multiprocess mode: one fresh directory per worker node.
    metrics_dir = settings.state_dir / "metrics" / node.replace("%h", "host").replace("@", "_")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    argv = [
        sys.executable, "-m", "celery", "-A", "service.app", "worker",
        "-Q", ",".join(names),
        "-c", str(concurrency or settings.concurrency),
        "-n", node,
        "-l", settings.log_level,
        *celery_args,
    ]
    os.execv(sys.executable, argv)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def beat(celery_args: tuple[str, ...]) -> None:
    """Run Celery beat; with two, the one holding the schedule lease schedules, the other stands by.

    Its schedule file lives in KIT_STATE_DIR (one per beat: never share it).
    """
    from service.startup import check_beat

    settings = load()
    # Before Celery prints its banner: a broker that refuses beat is then one line (beat checks again).
    check_beat(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "service.app", "beat", "-l", settings.log_level, *celery_args]
    os.execv(sys.executable, argv)
