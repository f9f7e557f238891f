"""The command line: ``python -m service ...``.

Errors the operator can act on are printed as one message and exit with a
non-zero status; no stack traces.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from service import queues
from service.errors import KitError
from service.settings import ConfigError, load

EXIT_ERROR = 2
EXIT_DRIFT = 1


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (KitError, ConfigError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Celery on RabbitMQ kit: topology, publishing, workers and beat.

    Configuration comes from KIT_* environment variables (see README.md).
    """


def _register_subcommands() -> None:
    from service.cli_dlq import dlq

    main.add_command(dlq)


@main.command()
@click.option("--markdown", is_flag=True, help="Print the table of variables and defaults (as in README.md).")
@_friendly_errors
def config(markdown: bool) -> None:
    """Show the effective configuration (passwords hidden), or the documented defaults."""
    from service.settings import SETTINGS, redact_url

    if markdown:
        click.echo("| Variable | Default | What it does |")
        click.echo("|---|---|---|")
        for s in SETTINGS:
            default = f"`{s.default}`" if s.default else "(empty)"
            click.echo(f"| `{s.name}` | {default} | {s.description} |")
        return
    load()  # validates every value
    for s in SETTINGS:
        value = os.environ.get(s.name, s.default)
        shown = redact_url(value) if s.name == "KIT_BROKER_URL" else value
        if s.name == "SENTRY_DSN" and "@" in value:
            shown = value.split("://", 1)[0] + "://***@" + value.rsplit("@", 1)[1]
        click.echo(f"{s.name}={shown}{'' if s.name in os.environ else '   (default)'}")


@main.group()
def topology() -> None:
    """Declare or verify the exchanges and queues of service/queues.py."""


@topology.command("declare")
@_friendly_errors
def topology_declare() -> None:
    """Declare every exchange, queue and binding (idempotent)."""
    from service.topology import connect, declare

    conn = connect(load())
    try:
        declare(conn)
    finally:
        conn.release()
    click.echo(
        f"declared {len(queues.EXCHANGES)} exchanges and {len(queues.ALL_QUEUES)} queues "
        f"({len(queues.WORK_QUEUES)} work, {len(queues.DEAD_LETTER_QUEUES)} dead-letter, "
        f"{len(queues.WAIT_QUEUES)} wait)"
    )


@topology.command("verify")
@_friendly_errors
def topology_verify() -> None:
    """Compare the live broker with the code; exit 1 when they differ. Creates nothing."""
    from service.topology import connect, verify

    conn = connect(load())
    try:
        drift = verify(conn)
    finally:
        conn.release()
    if not drift:
        click.echo(f"ok: {len(queues.EXCHANGES)} exchanges and {len(queues.ALL_QUEUES)} queues match the code")
        return
    for item in drift:
        click.echo(f"drift: {item.describe()}")
    click.echo(f"{len(drift)} difference(s) between the broker and service/queues.py", err=True)
    sys.exit(EXIT_DRIFT)


def _json_option(value: str | None, what: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(parsed, kind):
        raise click.BadParameter(f"{what} must be a JSON {'array' if kind is list else 'object'}")
    return parsed


@main.command()
@click.argument("name")
@click.option("--args", "args_json", metavar="JSON", help="Positional arguments as a JSON array.")
@click.option("--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--priority", default=queues.DEFAULT_PRIORITY, show_default=True,
              type=click.Choice(list(queues.PRIORITIES)), help="Named priority.")
@click.option("--queue", type=click.Choice(list(queues.WORK_QUEUE_NAMES)),
              help="Work queue (default: the task's route in service/queues.py).")
@click.option("--countdown", type=click.FloatRange(min=0), help="Seconds to wait in the broker before it runs.")
@click.option("--task-id", help="Task id to use (default: a new UUID).")
@_friendly_errors
def publish(name: str, args_json: str | None, kwargs_json: str | None, priority: str,
            queue: str | None, countdown: float | None, task_id: str | None) -> None:
    """Publish task NAME and print its id once the broker confirmed it.

    Example: python -m service publish emails.send --kwargs '{"to": "a@example.com",
    "subject": "Hi", "body": "Hello"}' --priority high
    """
    from service.client import Publisher

    args = _json_option(args_json, "--args", list)
    kwargs = _json_option(kwargs_json, "--kwargs", dict)
    with Publisher() as publisher:
        click.echo(publisher.publish(name, args, kwargs, priority=priority, queue=queue,
                                     countdown=countdown, task_id=task_id))


def _queue_list(value: str | None) -> list[str]:
    names = [q.strip() for q in (value or ",".join(queues.WORK_QUEUE_NAMES)).split(",") if q.strip()]
    for name in names:
        try:
            queues.work_queue(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return names


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--queues", "queue_names", metavar="Q1,Q2",
              help=f"Work queues to consume (default: all of {','.join(queues.WORK_QUEUE_NAMES)}).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Processes (default: KIT_CONCURRENCY).")
@click.option("--name", "node_name", help="Node name (default: <queues>@<host>).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@_friendly_errors
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


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@_friendly_errors
def beat(celery_args: tuple[str, ...]) -> None:
    """Run Celery beat (exactly one per deployment); its schedule file lives in KIT_STATE_DIR."""
    settings = load()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "service.app", "beat", "-l", settings.log_level, *celery_args]
    os.execv(sys.executable, argv)


@main.command()
@click.option("--count", type=click.IntRange(min=1), default=50, show_default=True, help="Tasks to publish.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="Tasks per second.")
@click.option("--webhook-url", default="http://127.0.0.1:9/hook", show_default=True,
              help="Webhook target of the demo (the default refuses connections, so those retry and dead-letter).")
@_friendly_errors
def demo(count: int, rate: float, webhook_url: str) -> None:
    """Publish a mix of demo tasks: exports, clean-ups, e-mails and webhooks, mixed priorities."""
    from service.client import Publisher

    rng = random.Random()
    kinds: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
        ("reports.export", lambda i: {"report": f"demo_{i % 5}", "rows": [{"n": i, "square": i * i}]}),
        ("reports.export", lambda i: {"report": "bad name!", "rows": []}),  # dead-lettered: permanent
        ("maintenance.cleanup_reports", lambda i: {}),
        ("emails.send", lambda i: {"to": f"user{i}@example.com", "subject": "Demo", "body": "Hello"}),
        ("webhooks.deliver", lambda i: {"url": webhook_url, "payload": {"n": i}, "event": "demo"}),
    ]
    weights = [70, 5, 5, 10, 10]
    with Publisher() as publisher:
        for i in range(count):
            name, make = rng.choices(kinds, weights)[0]
            priority = rng.choices(list(queues.PRIORITIES), [30, 50, 15, 5])[0]
            task_id = publisher.publish(name, kwargs=make(i), priority=priority)
            click.echo(f"{name:28} {priority:8} {task_id}")
            time.sleep(1 / rate)


@main.group()
def stack() -> None:
    """Run the local stack without Docker: workers, beat and demo traffic."""


@stack.command("up")
@click.option("--demo", is_flag=True, help="Also publish a stream of mixed demo tasks.")
@click.option("--demo-count", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--demo-rate", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@_friendly_errors
def stack_up(demo: bool, demo_count: int, demo_rate: float) -> None:
    """Start RabbitMQ if needed, declare the topology, start what is not running."""
    import subprocess

    from service import stack as local
    from service.errors import BrokerUnavailable
    from service.topology import connect, declare

    settings = load()
    try:
        conn = connect(settings)
    except BrokerUnavailable:
        click.echo("broker not reachable: starting RabbitMQ with scripts/broker.sh")
        subprocess.run(["bash", str(local.REPO / "scripts" / "broker.sh"), "start"], check=True)
        conn = connect(settings)
    try:
        declare(conn)
    finally:
        conn.release()
    for component in local.components(demo, demo_count, demo_rate):
        pid, started = local.start(settings, component)
        click.echo(f"{component.name:22} pid {pid:<7} {'started' if started else 'already running'}")
    click.echo(f"logs in {settings.state_dir / 'log'}; RabbitMQ management: http://127.0.0.1:15672 (local only)")


@stack.command("down")
@_friendly_errors
def stack_down() -> None:
    """Stop (warm shutdown) the processes that `stack up` started. RabbitMQ keeps running."""
    from service import stack as local

    settings = load()
    for component in local.components(demo=True):
        stopped = local.stop(settings, component.name)
        click.echo(f"{component.name:22} {'stopped' if stopped else 'not running'}")


@stack.command("status")
@_friendly_errors
def stack_status() -> None:
    """Show which processes run, whether the broker answers, and the queue depths."""
    from service import stack as local
    from service.topology import connect

    settings = load()
    unhealthy = 0
    for component in local.components(demo=True):
        pid = local.running_pid(settings, component.name)
        if not pid and component.name == "demo":
            click.echo(f"{component.name:22} not running")
            continue
        unhealthy += 0 if pid else 1
        click.echo(f"{component.name:22} {'running, pid ' + str(pid) if pid else 'NOT RUNNING'}")
    try:
        conn = connect(settings)
    except KitError as exc:
        click.echo(f"broker                 UNREACHABLE: {exc}")
        sys.exit(EXIT_DRIFT)
    try:
        channel = conn.channel()
        for queue in queues.WORK_QUEUES + queues.DEAD_LETTER_QUEUES:
            _, ready, consumers = channel.queue_declare(queue.name, passive=True)
            click.echo(f"queue {queue.name:16} ready {ready:<7} consumers {consumers}")
        waiting = sum(channel.queue_declare(q.name, passive=True)[1] for q in queues.WAIT_QUEUES)
        click.echo(f"waiting for retry      {waiting}")
    finally:
        conn.release()
    if unhealthy:
        sys.exit(EXIT_DRIFT)


_register_subcommands()
