"""``python -m service stack up|down|status``: print what service.stack.lifecycle does and finds."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from service.broker import ROLES
from service.cli.base import EXIT_FAILED, friendly_errors
from service.settings import load

if TYPE_CHECKING:
    from service.stack import Stack


@click.group()
def stack() -> None:
    """Run docker-compose.yml's services on this machine without Docker.

    The same commands, flags, environment and config files as docker-compose.yml
    (see service/stack/): workers, beat, the web service, the dead-letter console,
    celery-exporter, Prometheus, Alertmanager, Flower, and with --demo a steady mix
    of demo tasks. RabbitMQ is Debian's (scripts/broker.sh); KIT_STATE_DIR holds
    pids, logs, data and secrets.
    """


def _show_health(name: str, pid: int | None, healthy: bool, detail: str) -> None:
    if not pid:
        click.echo(f"{name:22} NOT RUNNING" + ("" if detail == "not running" else f": {detail}"))
    elif healthy:
        click.echo(f"{name:22} running, pid {pid:<7} healthy")
    else:
        click.echo(f"{name:22} running, pid {pid:<7} UNHEALTHY: {detail}")


def _show_urls(current: Stack) -> None:
    from service.stack import lifecycle

    for name, url in current.urls().items():
        click.echo(f"{name:22} {url}")
    click.echo(f"{'log in to RabbitMQ as':22} {current.user('admin')} "
               f"(password in {current.secrets_dir / 'rabbitmq_admin_password'})")
    if "flower" in current.local_services:
        click.echo(f"{'log in to Flower as':22} user:password in {current.secrets_dir / 'flower_basic_auth'}")
    console = lifecycle.console_login(current)
    if console is not None:
        if console.operators:
            click.echo(f"{'console users':22} {console.operators} operator(s) in {console.users_file}; add one with:")
        else:
            click.echo(f"{'console users':22} none yet: add the first operator (it asks for the password) with:")
        click.echo(f"{'':22} {console.add_operator}")
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
@click.option("--cluster", "cluster_size", type=click.IntRange(0, 9), metavar="N",
              help="Run the stack on a local RabbitMQ cluster of N nodes (3 for quorum queues: a majority "
                   "survives one node's loss) with KIT_QUEUE_TYPE=quorum; AMQP ports 5681.., management "
                   "15681.., prometheus 15781.. (plus --port-offset). 0: the machine's single broker. "
                   "Default: as the last `up`.")
@friendly_errors
def stack_up(demo: bool, port_offset: int | None, vhost: str | None, user_prefix: str | None,
             wait_seconds: float, cluster_size: int | None) -> None:
    """Start RabbitMQ if needed, provision its users and topology, start what is not running.

    Running it again is harmless: what runs keeps running. Exits 1 when a
    component is not healthy within --wait seconds.
    """
    from service.stack import lifecycle, processes

    settings = load()
    current = lifecycle.local_stack(settings, port_offset, vhost, user_prefix, demo, cluster_size)
    with processes.locked(current):
        if current.options.cluster:
            click.echo(f"starting a {current.options.cluster}-node RabbitMQ cluster (or finding it running) ...")
            for name in lifecycle.start_cluster(current):
                click.echo(f"{name:22} running")
            admin_url = lifecycle.cluster_admin_url(current)
        else:
            closed = lifecycle.closed_broker_port(current)
            if closed:
                click.echo(f"RabbitMQ does not answer on port {closed}: running scripts/broker.sh start")
                lifecycle.start_broker()
            admin_url = settings.broker_url
        admin = lifecycle.provision(current, admin_url)
        users = ", ".join(current.user(role) for role in ROLES)
        click.echo(f"{'rabbitmq':22} vhost {current.vhost}: users {users} and the topology provisioned (as {admin})")
        for started in lifecycle.start_all(current):
            click.echo(f"{started.name:22} pid {started.pid:<7} {'started' if started.started else 'already running'}")
        click.echo(f"waiting up to {wait_seconds:g}s for the health checks ...")
        states = lifecycle.wait_healthy(current, wait_seconds)
        for state in states:
            _show_health(state.name, state.pid, state.healthy, state.detail)
        _show_urls(current)
        unhealthy = sum(not state.healthy for state in states)
        if unhealthy:
            click.echo(f"{unhealthy} component(s) not healthy; see their logs in {current.log_dir}", err=True)
            sys.exit(EXIT_FAILED)


@stack.command("down")
@friendly_errors
def stack_down() -> None:
    """Stop the processes that `stack up` started (workers: warm shutdown), and the nodes of its cluster.

    The machine's single RabbitMQ keeps running.
    """
    from service.stack import lifecycle, processes

    current = lifecycle.local_stack(load())
    with processes.locked(current):
        for name, stopped in lifecycle.down(current):
            click.echo(f"{name:22} {'stopped' if stopped else 'not running'}")


@stack.command("status")
@friendly_errors
def stack_status() -> None:
    """What runs, what fails its health check, the broker's queue depths, the URLs. Exit 1 if anything is down."""
    from service.stack import lifecycle

    current = lifecycle.local_stack(load())
    found = lifecycle.status(current)
    for state in found.components:
        if state.optional_and_off:
            click.echo(f"{state.name:22} not running (only with stack up --demo)")
        else:
            _show_health(state.name, state.pid, state.healthy, state.detail)
    if not found.provisioned:
        click.echo(f"{'rabbitmq':22} NOT PROVISIONED: run `stack up`")
        sys.exit(EXIT_FAILED)
    for node, amqp_port, management_port, prometheus_port, running in found.nodes:
        click.echo(f"{node:22} {'running' if running else 'NOT RUNNING'}: AMQP {amqp_port}, management "
                   f"http://{current.host}:{management_port}, prometheus {prometheus_port}")
    for name, ready, consumers in found.queues:
        click.echo(f"queue {name:16} ready {ready:<7} consumers {consumers}")
    if found.waiting is not None:
        click.echo(f"waiting for retry      {found.waiting}")
    if found.broker_error:
        click.echo(f"{'rabbitmq':22} UNREACHABLE as {current.user('admin')} in vhost {current.vhost}: "
                   f"{found.broker_error}")
    _show_urls(current)
    if found.unhealthy:
        sys.exit(EXIT_FAILED)
