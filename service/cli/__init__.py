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
from typing import Any

import click

from service import queues
from service.cli_errors import friendly_errors
from service.settings import ConfigError, load

EXIT_DRIFT = 1

#: Top-level commands that run without valid settings (`config` validates them itself).
NEEDS_NO_SETTINGS = frozenset({"config"})
_CHECK_SETTINGS = "kit.check_settings"


def _needs_settings(group: click.Group, ctx: click.Context, args: list[str]) -> bool:
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


class _KitGroup(click.Group):
    """The top-level group: notes whether the command it is about to run needs the settings."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does, after noting (in ``ctx.meta``) whether to validate the settings."""
        ctx.meta[_CHECK_SETTINGS] = _needs_settings(self, ctx, args)
        return super().parse_args(ctx, args)


@click.group(cls=_KitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Celery on RabbitMQ kit: topology, publishing, workers and beat.

    Configuration comes from KIT_* environment variables (see README.md); every
    command checks them before it connects anywhere.
    """
    if ctx.meta.get(_CHECK_SETTINGS, True):
        friendly_errors(load)()  # a bad value: one `error: KIT_X=...` line, exit status 2


def _register_subcommands() -> None:
    from service.cli_dlq import dlq

    main.add_command(dlq)


def markdown_table() -> str:
    """The README's configuration table: every setting, its default, what it accepts and does."""
    from service.settings import SETTINGS

    lines = ["| Variable | Default | Accepted | What it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        lines.append(f"| `{s.name}` | {default} | {s.accepted()} | {s.description} |")
    return "\n".join(lines)


@main.command()
@click.option("--markdown", is_flag=True,
              help="Print the table of variables, defaults and accepted values (as in README.md).")
@friendly_errors
def config(markdown: bool) -> None:
    """Show the effective configuration (passwords hidden), or the documented defaults."""
    from service.settings import SETTINGS, redact_dsn, redact_url

    if markdown:
        click.echo(markdown_table())
        return
    load()  # validates every value
    for s in SETTINGS:
        value = os.environ.get(s.name, s.default)
        shown = redact_url(value) if s.name == "KIT_BROKER_URL" else value
        if s.name == "SENTRY_DSN":
            shown = redact_dsn(value)
        click.echo(f"{s.name}={shown}{'' if s.name in os.environ else '   (default)'}")


@main.group()
def topology() -> None:
    """Declare or verify the exchanges and queues of service/queues.py."""


@topology.command("declare")
@friendly_errors
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
@friendly_errors
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
@friendly_errors
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
    """The work queues of --queues; an unknown one is one ``error:`` line (StartupError), not a usage block."""
    from service.startup import work_queues

    return work_queues((value or "").split(","))


@main.command(context_settings={"ignore_unknown_options": True})
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


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def beat(celery_args: tuple[str, ...]) -> None:
    """Run Celery beat (exactly one per deployment); its schedule file lives in KIT_STATE_DIR."""
    from service.startup import check_beat

    settings = load()
    # Before Celery prints its banner: a broker that refuses beat is then one line (beat checks again).
    check_beat(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "service.app", "beat", "-l", settings.log_level, *celery_args]
    os.execv(sys.executable, argv)


@main.command()
@click.option("--count", type=click.IntRange(min=1), default=50, show_default=True, help="Tasks to publish.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="Tasks per second.")
@click.option("--webhook-url", default="http://127.0.0.1:9/hook", show_default=True,
              help="Webhook target of the demo (the default refuses connections, so those retry and dead-letter).")
@friendly_errors
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
    """Run docker-compose.yml's services on this machine without Docker.

    The same commands, flags, environment and config files as docker-compose.yml
    (see service/stack.py): workers, beat, celery-exporter, Prometheus,
    Alertmanager, Flower, and with --demo a steady mix of demo tasks. RabbitMQ is
    Debian's (scripts/broker.sh); KIT_STATE_DIR holds pids, logs, data and secrets.
    """


def _local_stack(port_offset: int | None = None, vhost: str | None = None, user_prefix: str | None = None,
                 demo: bool = False) -> Any:
    """The stack of KIT_STATE_DIR: the options given, else those of its last `up`."""
    from service import stack as local
    from service import stack_processes as processes

    settings = load()
    saved = processes.saved_options(settings.state_dir) or local.Options()
    options = local.Options(
        port_offset=saved.port_offset if port_offset is None else port_offset,
        vhost=vhost or saved.vhost,
        user_prefix=user_prefix or saved.user_prefix,
        demo=demo,
    )
    current = local.Stack(settings.state_dir, saved)
    running = [c.name for c in current.all_components() if processes.running_pid(current, c.name)]
    changed = (options.port_offset, options.vhost, options.user_prefix) != (
        saved.port_offset, saved.vhost, saved.user_prefix)
    if running and changed:
        raise local.StackError(
            f"the stack in {settings.state_dir} runs with port offset {saved.port_offset}, vhost "
            f"{current.vhost!r}, user prefix {current.user_prefix!r} ({', '.join(running)}); "
            "run `stack down` first to change them")
    if "demo" in running:
        options = local.Options(options.port_offset, options.vhost, options.user_prefix, demo=True)
    return local.Stack(settings.state_dir, options)


def _show_health(name: str, pid: int | None, healthy: bool, detail: str) -> None:
    if not pid:
        click.echo(f"{name:22} NOT RUNNING" + ("" if detail == "not running" else f": {detail}"))
    elif healthy:
        click.echo(f"{name:22} running, pid {pid:<7} healthy")
    else:
        click.echo(f"{name:22} running, pid {pid:<7} UNHEALTHY: {detail}")


def _show_urls(current: Any) -> None:
    for name, url in current.urls().items():
        click.echo(f"{name:22} {url}")
    click.echo(f"{'log in to RabbitMQ as':22} {current.user('admin')} "
               f"(password in {current.secrets_dir / 'rabbitmq_admin_password'})")
    click.echo(f"{'logs':22} {current.log_dir}")


@stack.command("up")
@click.option("--demo", is_flag=True, help="Also run the demo service: a steady mix of tasks (mostly succeeding, "
                                           "some retried, some dead-lettered, mixed priorities).")
@click.option("--port-offset", type=click.IntRange(0, 50000),
              help="Add this to every port the stack's processes listen on (default 0, or the last `up`'s).")
@click.option("--vhost", help="RabbitMQ vhost (default: docker-compose.yml's, or the last `up`'s).")
@click.option("--user-prefix", help="Prefix of the broker users (default kit-: kit-worker, kit-monitor, ...).")
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=120, show_default=True,
              help="Seconds to wait for every component to pass its health check.")
@friendly_errors
def stack_up(demo: bool, port_offset: int | None, vhost: str | None, user_prefix: str | None,
             wait_seconds: float) -> None:
    """Start RabbitMQ if needed, provision its users and topology, start what is not running.

    Running it again is harmless: what runs keeps running. Exits 1 when a
    component is not healthy within --wait seconds.
    """
    from service import stack_processes as processes

    current = _local_stack(port_offset, vhost, user_prefix, demo)
    with processes.locked(current):
        _stack_up(current, wait_seconds)


def _stack_up(current: Any, wait_seconds: float) -> None:
    import socket
    import subprocess

    from service import stack as local
    from service import stack_processes as processes
    from service import stack_provision as provisioning

    admin_url = load().broker_url
    # AMQP, the management API and the prometheus plugin: scripts/broker.sh starts
    # the broker if needed and enables the plugins.
    for port in (5672, 15672, 15692):
        try:
            socket.create_connection((current.host, current.local_port("rabbitmq", port)), timeout=3).close()
        except OSError:
            closed = port
            break
    else:
        closed = None
    if closed:
        click.echo(f"RabbitMQ does not answer on port {closed}: running scripts/broker.sh start")
        if subprocess.run(["bash", str(local.REPO / "scripts" / "broker.sh"), "start"]).returncode != 0:
            raise local.StackError("scripts/broker.sh could not start RabbitMQ (see its output above)")
    provisioning.make_secrets(current)
    admin = provisioning.provision(current, admin_url)
    click.echo(f"{'rabbitmq':22} vhost {current.vhost}: users {current.user('admin')}, "
               f"{current.user('publisher')}, {current.user('worker')}, {current.user('monitor')} "
               f"and the topology provisioned (as {admin})")
    current.prepare_files()
    processes.save_options(current)
    components = current.components()
    for component in components:
        pid, started = processes.start(current, component)
        click.echo(f"{component.name:22} pid {pid:<7} {'started' if started else 'already running'}")
    click.echo(f"waiting up to {wait_seconds:g}s for the health checks ...")
    results = processes.wait_healthy(current, components, wait_seconds)
    unhealthy = 0
    for component in components:
        healthy, detail = results[component.name]
        unhealthy += not healthy
        _show_health(component.name, processes.running_pid(current, component.name), healthy, detail)
    _show_urls(current)
    if unhealthy:
        click.echo(f"{unhealthy} component(s) not healthy; see their logs in {current.log_dir}", err=True)
        sys.exit(EXIT_DRIFT)


@stack.command("down")
@friendly_errors
def stack_down() -> None:
    """Stop the processes that `stack up` started (workers: warm shutdown). RabbitMQ keeps running."""
    from service import stack_processes as processes

    current = _local_stack()
    with processes.locked(current):
        components = current.all_components()
        for component in reversed(components):
            stopped = processes.stop(current, component)
            click.echo(f"{component.name:22} {'stopped' if stopped else 'not running'}")
        for name in processes.started_names(current):  # started from an older docker-compose.yml
            if name not in {c.name for c in components} and processes.stop_name(current, name):
                click.echo(f"{name:22} stopped")


@stack.command("status")
@friendly_errors
def stack_status() -> None:
    """What runs, what fails its health check, the broker's queue depths, the URLs. Exit 1 if anything is down."""
    from service import stack_processes as processes
    from service import stack_provision as provisioning

    current = _local_stack()
    unhealthy = 0
    for component in current.all_components():
        pid = processes.running_pid(current, component.name)
        if not pid and current.optional(component.name):
            click.echo(f"{component.name:22} not running (only with stack up --demo)")
            continue
        healthy, detail = processes.health(current, component)
        unhealthy += not healthy
        _show_health(component.name, pid, healthy, detail)
    try:
        url = provisioning.admin_broker_url(current)
    except ConfigError:
        click.echo(f"{'rabbitmq':22} NOT PROVISIONED: run `stack up`")
        sys.exit(EXIT_DRIFT)
    from kombu import Connection

    conn = Connection(url, connect_timeout=5)
    try:
        channel = conn.channel()
        for queue in queues.WORK_QUEUES + queues.DEAD_LETTER_QUEUES:
            _, ready, consumers = channel.queue_declare(queue.name, passive=True)
            click.echo(f"queue {queue.name:16} ready {ready:<7} consumers {consumers}")
        waiting = sum(channel.queue_declare(q.name, passive=True)[1] for q in queues.WAIT_QUEUES)
        click.echo(f"waiting for retry      {waiting}")
    except Exception as exc:  # noqa: BLE001 - any failure means the broker is not usable
        from service.connection import refusal

        detail = refusal(exc, url) or exc  # a refused login or missing vhost says what to do
        click.echo(f"{'rabbitmq':22} UNREACHABLE as {current.user('admin')} in vhost {current.vhost}: {detail}")
        unhealthy += 1
    finally:
        conn.release()
    _show_urls(current)
    if unhealthy:
        sys.exit(EXIT_DRIFT)


@main.group()
def broker() -> None:
    """Broker users, permissions and topology as RabbitMQ definitions (no guest user).

    Passwords are read from DIR/rabbitmq_<role>_password for the roles admin,
    publisher, worker and monitor (see deploy/rabbitmq/definitions-README.md).
    """


_secrets_dir = click.option("--secrets-dir", required=True, type=click.Path(file_okay=False),
                            help="Directory of the rabbitmq_<role>_password files.")
_vhost = click.option("--vhost", default="kit", show_default=True, help="The kit's vhost.")
_user_prefix = click.option("--user-prefix", default="kit-", show_default=True,
                            help="Prefix of the user names: <prefix>admin, <prefix>publisher, ...")


@broker.command("definitions")
@_secrets_dir
@_vhost
@_user_prefix
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="File to write (mode 0600: it holds password hashes); for load_definitions.")
@friendly_errors
def broker_definitions(secrets_dir: str, vhost: str, user_prefix: str, out: str) -> None:
    """Write the definitions: vhost, users, permissions and the whole topology."""
    from service.broker import definitions, read_passwords, write_definitions

    defs = definitions(vhost, read_passwords(secrets_dir), user_prefix)
    write_definitions(defs, out)
    click.echo(f"wrote {out}: vhost {vhost}, users {', '.join(u['name'] for u in defs['users'])}, "
               f"{len(defs['exchanges'])} exchanges, {len(defs['queues'])} queues")


@broker.command("provision")
@_secrets_dir
@_vhost
@_user_prefix
@click.option("--management-url", envvar="KIT_ADMIN_URL", default="http://127.0.0.1:15672", show_default=True,
              help="RabbitMQ's management API (env KIT_ADMIN_URL), without credentials.")
@click.option("--admin-user", envvar="KIT_ADMIN_USER", default="kit-admin", show_default=True,
              help="An administrator of the broker (env KIT_ADMIN_USER).")
@click.option("--admin-password-file", envvar="KIT_ADMIN_PASSWORD_FILE", type=click.Path(dir_okay=False),
              help="File with that administrator's password (env KIT_ADMIN_PASSWORD_FILE; "
                   "default: the admin role's file in --secrets-dir).")
@friendly_errors
def broker_provision(secrets_dir: str, vhost: str, user_prefix: str, management_url: str, admin_user: str,
                     admin_password_file: str | None) -> None:
    """Create or update the vhost, users, permissions and topology over the management API (idempotent)."""
    from pathlib import Path

    from service.broker import SECRET_FILE, definitions, provision, read_passwords

    if "@" in management_url.split("://", 1)[-1].split("/", 1)[0]:
        raise ConfigError("--management-url/KIT_ADMIN_URL must not hold credentials; use --admin-password-file")
    defs = definitions(vhost, read_passwords(secrets_dir), user_prefix)
    path = Path(admin_password_file or Path(secrets_dir) / SECRET_FILE.format(role="admin"))
    try:
        admin_password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"the admin password file {str(path)!r} cannot be read: {exc.strerror}") from None
    if not admin_password:
        raise ConfigError(f"the admin password file {str(path)!r} is empty")
    provision(defs, management_url, admin_user, admin_password)
    click.echo(f"provisioned vhost {vhost} at {management_url}: users "
               f"{', '.join(u['name'] for u in defs['users'])}, {len(defs['exchanges'])} exchanges, "
               f"{len(defs['queues'])} queues")


_register_subcommands()
