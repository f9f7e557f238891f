"""A RabbitMQ cluster of several nodes on this machine, from Debian's rabbitmq-server.

Each node gets its own name (``<prefix>1@localhost`` ...), ports and
directories under ``base_dir``; the second and later nodes join the first
(``stop_app; join_cluster; start_app``). Every node has the management and
prometheus plugins. The nodes share the machine's Erlang cookie and epmd with
the default node, and do not disturb it.

``LocalCluster`` is what ``python -m service stack up --cluster 3`` starts and
what the cluster tests and ``bench/cluster.py`` run on. Nothing here knows
about queues or the kit's users: it runs nodes, and stops, kills and restarts
them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.errors import KitError

#: Debian's scripts; started as root they switch to the ``rabbitmq`` user.
RABBITMQ_SERVER = "rabbitmq-server"
RABBITMQCTL = "rabbitmqctl"
#: The user whose directories the nodes write to.
RABBITMQ_USER = "rabbitmq"
#: Plugins every node runs.
PLUGINS = ("rabbitmq_management", "rabbitmq_prometheus")
#: How long one node may take to boot, and the others to join.
BOOT_TIMEOUT_S = 90.0


class ClusterError(KitError):
    """A node would not start, join or stop in time; the message names it and its log."""


@dataclass(frozen=True)
class Node:
    """One node of a local cluster: its Erlang name, ports and directories."""

    index: int  # 1-based
    name: str  # e.g. kit-c1@localhost
    amqp_port: int
    dist_port: int
    management_port: int
    prometheus_port: int
    base_dir: Path

    @property
    def log_dir(self) -> Path:
        """Where the node writes its logs."""
        return self.base_dir / "log"

    @property
    def pid_file(self) -> Path:
        """The pid file the node writes once it runs (the Erlang VM's pid)."""
        return self.base_dir / "pid"

    def environment(self) -> dict[str, str]:
        """The RABBITMQ_* variables that make Debian's scripts run this node (and not the default one)."""
        return {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq"),
            # Erlang distribution on loopback only (it listens on every interface by default).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }


@dataclass(frozen=True)
class ClusterLayout:
    """Names and ports of a local cluster: node K listens on ``first_amqp_port + K - 1`` and so on."""

    size: int = 3
    prefix: str = "kit-c"
    first_amqp_port: int = 5681
    first_dist_port: int = 25681
    first_management_port: int = 15681
    first_prometheus_port: int = 15781  # 15782, 15783: clear of 15692 and the kit's other ports

    def nodes(self, base_dir: Path) -> list[Node]:
        """The nodes, each with its directory under ``base_dir``."""
        return [
            Node(
                index=k,
                name=f"{self.prefix}{k}@localhost",
                amqp_port=self.first_amqp_port + k - 1,
                dist_port=self.first_dist_port + k - 1,
                management_port=self.first_management_port + k - 1,
                prometheus_port=self.first_prometheus_port + k - 1,
                base_dir=base_dir / f"{self.prefix}{k}",
            )
            for k in range(1, self.size + 1)
        ]


def _wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class LocalCluster:
    """Start, stop, kill and restart the nodes of a ``ClusterLayout`` under ``base_dir``.

    ``launcher`` starts a node's process from its argv and environment (the
    tests pass one that binds the process to the test run); by default the
    node runs detached. Nodes are found by name, so a cluster started by one
    process can be stopped by another.
    """

    def __init__(self, base_dir: Path, layout: ClusterLayout | None = None,
                 launcher: Callable[[Sequence[str], dict[str, str]], object] | None = None) -> None:
        self.layout = layout or ClusterLayout()
        self.base_dir = Path(base_dir)
        self.nodes = self.layout.nodes(self.base_dir)
        self._launcher = launcher

    # -- addresses -----------------------------------------------------------------
    def amqp_urls(self, user: str, password: str, vhost: str, host: str = "127.0.0.1") -> list[str]:
        """One pyamqp:// URL per node, for KIT_BROKER_URL joined with ``;``."""
        from urllib.parse import quote

        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return [f"pyamqp://{auth}@{host}:{n.amqp_port}/{quote(vhost, safe='')}" for n in self.nodes]

    # -- control -------------------------------------------------------------------
    def ctl(self, node: Node, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` and return its output; ClusterError when it fails and ``check``."""
        try:
            done = subprocess.run([RABBITMQCTL, "-q", "-n", node.name, *args], capture_output=True, text=True,
                                  timeout=timeout, env=self._env(node))
        except subprocess.TimeoutExpired:
            command = f"rabbitmqctl -n {node.name} {' '.join(args)}"
            raise ClusterError(f"`{command}` did not answer in {timeout:g}s") from None
        if check and done.returncode != 0:
            raise ClusterError(
                f"`rabbitmqctl -n {node.name} {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def is_running(self, node: Node) -> bool:
        """Whether the node's RabbitMQ application runs (it answers and has booted)."""
        try:
            done = subprocess.run([RABBITMQCTL, "-q", "-n", node.name, "await_startup", "--timeout", "2"],
                                  capture_output=True, text=True, timeout=10, env=self._env(node))
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def running_nodes(self) -> list[str]:
        """Names of the cluster's running nodes, as any running node sees them."""
        for node in self.nodes:
            if self.is_running(node):
                out = self.ctl(node, "eval", "rabbit_nodes:all_running().", check=False)
                return [n for n in self.nodes_named(out)]
        return []

    def nodes_named(self, text: str) -> list[str]:
        """The names of this cluster's nodes that appear in ``text``, in node order."""
        return [n.name for n in self.nodes if n.name in text]

    def start(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Start every node that does not run, and have each join the first. Safe to run again."""
        self._check_tools()
        started = [node for node in self.nodes if not self.is_running(node) and self._launch(node)]
        for node in started:
            self._await_boot(node, timeout)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            if first.name in self.ctl(node, "cluster_status"):
                members = self.ctl(node, "eval", "rabbit_mnesia:cluster_nodes(all).")
                if first.name in members:
                    continue
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name, timeout=timeout)
            self.ctl(node, "start_app", timeout=timeout)
        _wait(lambda: len(self.running_nodes()) == len(self.nodes), timeout,
              f"all {len(self.nodes)} nodes to run in one cluster")

    def start_node(self, node: Node, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Start a stopped or killed node again; it rejoins the cluster it was a member of."""
        if not self.is_running(node):
            self._launch(node)
            self._await_boot(node, timeout)

    def stop_node(self, node: Node, timeout: float = 60.0) -> None:
        """Stop one node cleanly (its Erlang VM exits)."""
        self.ctl(node, "stop", timeout=timeout, check=False)
        _wait(lambda: not self._vm_alive(node), timeout, f"node {node.name} to stop")

    def kill_node(self, node: Node) -> int:
        """kill -9 the node's Erlang VM, as a crash or a pulled plug would; returns the pid killed."""
        pid = self.vm_pid(node)
        if pid is None:
            raise ClusterError(f"node {node.name} does not run (no pid in {node.pid_file})")
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _pid_alive(pid), 30, f"node {node.name} (pid {pid}) to die")
        return pid

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every node (the ones that run); the directories stay for the next start."""
        for node in reversed(self.nodes):
            if self._vm_alive(node):
                self.stop_node(node, timeout)

    def vm_pid(self, node: Node) -> int | None:
        """The pid of the node's Erlang VM, or None when it does not run."""
        try:
            pid = int(node.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    # -- internals -----------------------------------------------------------------
    def _vm_alive(self, node: Node) -> bool:
        return self.vm_pid(node) is not None

    def _env(self, node: Node) -> dict[str, str]:
        env = dict(os.environ)
        env.update(node.environment())
        return env

    def _check_tools(self) -> None:
        for tool in (RABBITMQ_SERVER, RABBITMQCTL):
            if shutil.which(tool) is None:
                raise ClusterError(f"{tool} is not installed: run `bash scripts/install.sh` (Debian's rabbitmq-server)")

    def _check_reachable(self) -> None:
        """ClusterError when the rabbitmq user could not reach ``base_dir`` (a 0700 directory above it)."""
        if os.geteuid() != 0:
            return
        for parent in [self.base_dir, *self.base_dir.parents]:
            if not parent.exists():
                continue
            mode = parent.stat().st_mode
            if not mode & 0o001 and parent.owner() != RABBITMQ_USER:
                raise ClusterError(
                    f"the {RABBITMQ_USER} user that runs the nodes cannot enter {parent} (mode "
                    f"{mode & 0o777:o}), above the nodes' directory {self.base_dir}; put it elsewhere")

    def _prepare(self, node: Node) -> None:
        self._check_reachable()
        for directory in (node.base_dir, node.log_dir, node.base_dir / "mnesia"):
            directory.mkdir(parents=True, exist_ok=True)
        (node.base_dir / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
        # Loopback only: the nodes are for this machine.
        (node.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {node.management_port}\n"
            f"prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {node.prometheus_port}\n"
        )
        node.pid_file.unlink(missing_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base_dir, RABBITMQ_USER, RABBITMQ_USER)
            for path in [node.base_dir, *node.base_dir.rglob("*")]:  # a restarted node's files too
                shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)

    def _launch(self, node: Node) -> bool:
        self._prepare(node)
        if self._launcher is not None:
            self._launcher([RABBITMQ_SERVER], self._env(node))
        else:
            subprocess.run([RABBITMQ_SERVER, "-detached"], env=self._env(node), check=True,
                           capture_output=True, timeout=60)
        return True

    def _await_boot(self, node: Node, timeout: float) -> None:
        try:
            _wait(lambda: self.is_running(node), timeout, f"node {node.name} to boot")
        except ClusterError as exc:
            raise ClusterError(f"{exc}; see its log in {node.log_dir}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True
