"""Bringing the local stack up and down, and what runs: the library behind ``stack up|down|status``.

Each step returns data (or yields it as it happens); the command line
(``service.cli.stack``) prints it. ``up`` starts RabbitMQ through
scripts/broker.sh when it does not answer, makes the secrets, provisions the
vhost, users and topology (``provision``), writes the mapped config files and
starts every component that is not running (``start_all``), then waits for
their health checks (``wait_healthy``). ``down`` stops only what ``up``
started. ``status`` reads the components' health and the broker's queue depths.
``console_login`` says where the dead-letter console is and how to add its
first operator.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kombu import Connection

from service import queues
from service.errors import KitError
from service.settings import ConfigError, Settings
from service.stack import files, processes
from service.stack import provision as provisioning
from service.stack.model import REPO, Component, Options, Stack, StackError

#: The broker's ports the stack needs: AMQP, the management API and the prometheus plugin.
BROKER_PORTS = (5672, 15672, 15692)
#: The compose service of the dead-letter console (service/console/).
CONSOLE_SERVICE = "console"
#: The console's role that may replay and purge (KIT_CONSOLE_USERS_FILE lines are name:role:hash).
OPERATOR_ROLE = "operator"


@dataclass(frozen=True)
class ComponentState:
    """One component as ``stack up`` or ``stack status`` found it."""

    name: str
    pid: int | None
    healthy: bool
    detail: str
    #: Not running, and only run with ``stack up --demo``: not a failure.
    optional_and_off: bool = False


@dataclass(frozen=True)
class Started:
    """A component ``start_all`` started, or found running."""

    name: str
    pid: int
    started: bool


@dataclass
class StackStatus:
    """What ``stack status`` reports: components, the broker's queues, and whether anything is down."""

    components: list[ComponentState] = field(default_factory=list)
    #: False when the stack's admin password is not there yet (``stack up`` never ran).
    provisioned: bool = True
    #: (queue, messages ready, consumers) of the work and dead-letter queues, in order.
    queues: list[tuple[str, int, int]] = field(default_factory=list)
    #: Messages waiting for their retry in the wait queues (None when not read).
    waiting: int | None = None
    #: Why the broker could not be read as the stack's admin ("" when it could).
    broker_error: str = ""
    #: (node, AMQP port, management port, prometheus port, running) of a local cluster's nodes.
    nodes: list[tuple[str, int, int, int, bool]] = field(default_factory=list)

    @property
    def unhealthy(self) -> int:
        """Components failing their health check, plus one for an unreachable broker and each node down."""
        failing = sum(not c.healthy for c in self.components if not c.optional_and_off)
        return failing + bool(self.broker_error) + sum(not running for *_, running in self.nodes)


@dataclass(frozen=True)
class ConsoleLogin:
    """Where the stack's dead-letter console is, and how to add a user to it."""

    url: str
    #: KIT_CONSOLE_USERS_FILE of the stack's console.
    users_file: Path
    #: Operators in the users file (0: none yet, nobody can log in to replay or purge).
    operators: int
    #: The command that adds an operator (it asks for the password): NAME is the user's name.
    add_operator: str


def console_login(current: Stack) -> ConsoleLogin | None:
    """The console's URL, users file and add-user command; None when the stack runs no console."""
    if CONSOLE_SERVICE not in current.local_services:
        return None
    component = current.component(CONSOLE_SERVICE)
    users_file = Path(component.env.get("KIT_CONSOLE_USERS_FILE", current.state_dir / "console_users"))
    operators = 0
    try:
        for line in users_file.read_text(encoding="utf-8").splitlines():
            if line.split(":")[1:2] == [OPERATOR_ROLE]:
                operators += 1
    except (OSError, UnicodeDecodeError):
        pass
    python = Path(component.argv[0])
    shown = os.path.relpath(python) if python.is_relative_to(Path.cwd()) else str(python)
    command = (f"KIT_CONSOLE_USERS_FILE={shlex.quote(str(users_file))} {shlex.quote(shown)} -m service console "
               f"add-user NAME --role {OPERATOR_ROLE}")
    url = current.urls().get(CONSOLE_SERVICE, "")
    return ConsoleLogin(url, users_file, operators, command)


def local_stack(settings: Settings, port_offset: int | None = None, vhost: str | None = None,
                user_prefix: str | None = None, demo: bool = False, cluster: int | None = None) -> Stack:
    """The stack of KIT_STATE_DIR: the options given, else those of its last ``up``.

    ``cluster`` is the number of nodes of a local RabbitMQ cluster (0: the
    machine's single broker; None: as the last ``up``). Raises StackError when
    components run and the options would change its port offset, vhost, user
    prefix or cluster (``stack down`` first).
    """
    saved = processes.saved_options(settings.state_dir) or Options()
    options = Options(
        port_offset=saved.port_offset if port_offset is None else port_offset,
        vhost=vhost or saved.vhost,
        user_prefix=user_prefix or saved.user_prefix,
        demo=demo,
        cluster=saved.cluster if cluster is None else cluster,
    )
    current = Stack(settings.state_dir, saved)
    running = [c.name for c in current.all_components() if processes.running_pid(current, c.name)]
    changed = (options.port_offset, options.vhost, options.user_prefix, options.cluster) != (
        saved.port_offset, saved.vhost, saved.user_prefix, saved.cluster)
    if running and changed:
        nodes = f"a {saved.cluster}-node cluster" if saved.cluster else "the single broker"
        raise StackError(
            f"the stack in {settings.state_dir} runs with port offset {saved.port_offset}, vhost "
            f"{current.vhost!r}, user prefix {current.user_prefix!r} on {nodes} ({', '.join(running)}); "
            "run `stack down` first to change them")
    if "demo" in running:
        options = Options(options.port_offset, options.vhost, options.user_prefix, demo=True,
                          cluster=options.cluster)
    return Stack(settings.state_dir, options)


def start_cluster(current: Stack) -> list[str]:
    """Start the stack's cluster nodes that do not run (and have them join node 1); their names."""
    cluster = current.cluster()
    if cluster is None:
        return []
    try:
        cluster.start()
    except KitError as exc:
        raise StackError(f"the local RabbitMQ cluster did not start: {exc}") from None
    return [node.name for node in cluster.nodes]


def cluster_admin_url(current: Stack) -> str:
    """Node 1's address with no password: ``provision`` then creates the stack's admin with rabbitmqctl."""
    node = current.broker_nodes()[0]
    return f"pyamqp://{current.host}:{node.amqp_port}/"


def closed_broker_port(current: Stack) -> int | None:
    """The first of BROKER_PORTS on which RabbitMQ does not answer, or None when all do."""
    for port in BROKER_PORTS:
        try:
            socket.create_connection((current.host, current.local_port("rabbitmq", port)), timeout=3).close()
        except OSError:
            return port
    return None


def start_broker() -> None:
    """Start RabbitMQ and its plugins with scripts/broker.sh; raises StackError when it fails."""
    if subprocess.run(["bash", str(REPO / "scripts" / "broker.sh"), "start"]).returncode != 0:
        raise StackError("scripts/broker.sh could not start RabbitMQ (see its output above)")


def provision(current: Stack, admin_url: str) -> str:
    """Make the missing secrets, then provision the vhost, users and topology; returns the admin it used."""
    provisioning.make_secrets(current)
    return provisioning.provision(current, admin_url)


def start_all(current: Stack) -> Iterator[Started]:
    """Write the mapped config files, save the options, and start each component not running yet."""
    files.prepare_files(current)
    processes.save_options(current)
    for component in current.components():
        pid, started = processes.start(current, component)
        yield Started(component.name, pid, started)


def wait_healthy(current: Stack, timeout: float) -> list[ComponentState]:
    """Wait up to ``timeout`` seconds for every component's health check; the state of each."""
    components = current.components()
    results = processes.wait_healthy(current, components, timeout)
    return [ComponentState(c.name, processes.running_pid(current, c.name), *results[c.name]) for c in components]


def down(current: Stack) -> Iterator[tuple[str, bool]]:
    """Stop what ``up`` started, last first: (name, whether it was running) per component.

    Processes started from an older docker-compose.yml are stopped too, and
    reported only when they ran.
    """
    components: list[Component] = current.all_components()
    for component in reversed(components):
        yield component.name, processes.stop(current, component)
    names = {c.name for c in components}
    for name in processes.started_names(current):
        if name not in names and processes.stop_name(current, name):
            yield name, True
    cluster = current.cluster()
    if cluster is not None:  # the stack started its cluster: it stops it
        for node in reversed(cluster.nodes):
            running = cluster.vm_pid(node) is not None
            if running:
                cluster.stop_node(node)
            yield node.name, running


def status(current: Stack) -> StackStatus:
    """Every component's health, then the queue depths as the stack's admin."""
    result = StackStatus()
    for component in current.all_components():
        pid = processes.running_pid(current, component.name)
        if not pid and current.optional(component.name):
            result.components.append(ComponentState(component.name, None, False, "not running", True))
            continue
        healthy, detail = processes.health(current, component)
        result.components.append(ComponentState(component.name, pid, healthy, detail))
    try:
        url = provisioning.admin_broker_url(current)
    except ConfigError:
        result.provisioned = False
        return result
    cluster = current.cluster()
    if cluster is not None:
        result.nodes = [(n.name, n.amqp_port, n.management_port, n.prometheus_port, cluster.is_running(n))
                        for n in cluster.nodes]
    if current.options.cluster:
        url = current.cluster_broker_url(url)
    conn = Connection(url, connect_timeout=5)
    profile = queues.topology(current.queue_type)
    try:
        channel = conn.channel()
        for queue in profile.work_queues + profile.lanes + profile.dead_letter_queues:
            _, ready, consumers = channel.queue_declare(queue.name, passive=True)
            result.queues.append((queue.name, ready, consumers))
        result.waiting = sum(channel.queue_declare(q.name, passive=True)[1] for q in profile.wait_queues)
    except Exception as exc:  # noqa: BLE001 - any failure means the broker is not usable
        from service.connection import refusal

        result.broker_error = str(refusal(exc, url) or exc)  # a refused login or missing vhost says what to do
    finally:
        conn.release()
    return result
