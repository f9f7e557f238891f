"""The local stack: docker-compose.yml's services as processes on one machine, without Docker.

docker-compose.yml is the one source of every component's command, flags,
environment, config files and health check. This module reads it (through
service.stack.compose) and runs the services that its ``x-local-stack`` extension
lists, with the same commands, mapped to one machine by a few fixed rules:

- ``python`` is the virtual environment's (``venv``); an image entrypoint such
  as ``/bin/alertmanager`` is the Debian binary named in ``executables``.
- Every compose service name used as a host (``rabbitmq:5672``) and every
  all-interfaces address (``0.0.0.0``) becomes ``x-local-stack.host``. A
  service's own ports (``ports`` and ``expose``) move by ``--port-offset``
  (default 0), so a second stack can run beside the first. This machine's
  address at a port that compose publishes for another service
  (``http://localhost:5580``, where people open the console) becomes that
  service's port here.
- Container paths become local paths: bind mounts of this repository map back
  to the repository (a mount nested in another one gets an overlay directory of
  symlinks), and the paths listed under ``x-local-stack.paths`` (named volumes,
  ``/run/secrets``, ``/var/lib/kit``) map into KIT_STATE_DIR. Files under a
  ``rewrite-hosts`` path are copied with their hosts and ports mapped
  (Prometheus' target files), and with the stack's vhost as their
  ``kit_vhost`` label (service.stack.files writes them).
- Broker URLs keep their role's user and get the stack's vhost and user prefix
  (``--vhost``, ``--user-prefix``, defaults from docker-compose.yml); passwords
  are files in KIT_STATE_DIR/secrets, made by scripts/make-secrets.sh on the
  first ``up``, and the vhost, users and topology are created over RabbitMQ's
  management API by service.broker, as ``python -m service broker provision``
  does (service.stack.provision).
- ``environment`` values are compose's; a value left empty in compose is passed
  through from the caller's environment, as compose does. Other KIT_* and
  SENTRY_* variables of the caller are not passed on.

``up`` starts what is not running yet (running it twice is harmless), ``down``
stops only the processes ``up`` started (pid files in KIT_STATE_DIR/run hold
each pid with its start time, so a reused pid is never signalled), ``status``
says what runs and what fails its health check (service.stack.processes and service.stack.lifecycle).
RabbitMQ itself is Debian's, started by ``scripts/broker.sh`` when it is not
reachable, and never stopped. With ``--cluster N`` it is a local cluster of N
nodes (service.stack.cluster) that the stack starts and stops: every broker URL
then lists every node, Prometheus scrapes each, and KIT_QUEUE_TYPE is quorum.

Why this module is over 400 lines (about 500): every rule that maps one
compose service to this machine (hosts, ports, paths, URLs, the cluster's
nodes, commands, health checks) is here, side by side, so the rules can be
read against each other and against docker-compose.yml.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from service.errors import KitError
from service.stack.cluster import ClusterLayout, LocalCluster, Node
from service.stack.compose import (
    COMPOSE_FILE,
    container_ports,
    full_command,
    load_compose,
    mounts,
    parse_duration,
    path_under,
    published_ports,
)

REPO = Path(__file__).resolve().parents[2]
#: The compose extension that says how to run services locally.
LOCAL_KEY = "x-local-stack"
#: The Prometheus target label naming the vhost whose queues are scraped (deploy/prometheus/prometheus.yml).
VHOST_TARGET_LABEL = "kit_vhost"
#: URL schemes whose user and vhost the stack rewrites.
AMQP_SCHEMES = ("pyamqp", "amqp", "amqps")
#: The user prefix of the compose file (service.broker.DEFAULT_USER_PREFIX).
COMPOSE_USER_PREFIX = "kit-"
#: The compose service of the broker.
BROKER_SERVICE = "rabbitmq"
#: Redis' port: its URL is redis://, not http:// (``urls``).
REDIS_PORT = 6380
#: First ports of ``stack up --cluster N``'s nodes (node K: the port + K - 1, plus --port-offset).
CLUSTER_AMQP_PORT = 5681
CLUSTER_DIST_PORT = 25681
CLUSTER_MANAGEMENT_PORT = 15681
CLUSTER_PROMETHEUS_PORT = 15781
#: Where the nodes of ``stack up --cluster N`` keep their data and logs: the rabbitmq user's own directory.
CLUSTER_DATA_DIR = Path("/var/lib/rabbitmq/kit-clusters")
#: The broker's container ports and the Node attribute of each on a cluster.
_NODE_PORTS = {5672: "amqp_port", 15672: "management_port", 15692: "prometheus_port"}
#: Addresses that mean "this machine" or "every interface" in a service's own flags.
_OWN_HOSTS = ("0.0.0.0", "127.0.0.1", "localhost")

_HOST_PORT = re.compile(r"(?<![\w.-])(?P<host>[A-Za-z0-9_][A-Za-z0-9_.-]*):(?P<port>\d{1,5})(?!\d)")
_ALL_INTERFACES = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d.])")
_ABS_PATH = re.compile(r"(?<![\w/.:-])/[\w./-]*")
_FLAG_VALUE = re.compile(r"^(?P<flag>--?[\w.-]+=)(?P<value>.*)$")
_URL = re.compile(r"https?://[^\s'\"]+")


class StackError(KitError):
    """docker-compose.yml cannot be run locally as written, or a component cannot be started."""


# ---------------------------------------------------------------------------
# Health checks


@dataclass(frozen=True)
class Probe:
    """A component's health check: its compose healthcheck, mapped (an HTTP GET or a command)."""

    url: str | None = None
    argv: tuple[str, ...] | None = None
    timeout: float = 10.0

    def check(self, env: Mapping[str, str]) -> tuple[bool, str]:
        """(healthy, detail)."""
        if self.url:
            try:
                with urllib.request.urlopen(self.url, timeout=self.timeout) as response:
                    return 200 <= response.status < 300, f"GET {self.url}: {response.status}"
            except urllib.error.HTTPError as exc:
                return False, f"GET {self.url}: {exc.code}"
            except OSError as exc:
                return False, f"GET {self.url}: {getattr(exc, 'reason', exc)}"
        if self.argv:
            try:
                done = subprocess.run(self.argv, env=dict(env), cwd=REPO, capture_output=True,
                                      timeout=self.timeout, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return False, f"health command failed: {exc}"
            output = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
            return done.returncode == 0, output[-1] if output else f"exit {done.returncode}"
        return True, "no health check"


# ---------------------------------------------------------------------------
# The components


@dataclass(frozen=True)
class Component:
    """One local process of the stack, derived from a compose service."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(compare=False)
    stop_timeout: float
    probe: Probe | None
    ports: tuple[int, ...]  # local ports it listens on

    @property
    def description(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True)
class Options:
    """What may differ between two local stacks on one machine."""

    port_offset: int = 0
    vhost: str | None = None  # default: the vhost of docker-compose.yml's broker URLs
    user_prefix: str | None = None  # default: kit-
    demo: bool = False
    cluster: int = 0  # nodes of a local RabbitMQ cluster (quorum profile); 0: the machine's single broker

    def as_dict(self) -> dict[str, Any]:
        return {"port_offset": self.port_offset, "vhost": self.vhost, "user_prefix": self.user_prefix,
                "demo": self.demo, "cluster": self.cluster}


class Stack:
    """docker-compose.yml mapped to one machine, under one KIT_STATE_DIR."""

    def __init__(self, state_dir: Path, options: Options = Options(), compose_file: Path = COMPOSE_FILE,
                 environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.compose = load_compose(compose_file, self.environ)
        self.services: dict[str, dict[str, Any]] = self.compose["services"]
        local = self.compose.get(LOCAL_KEY)
        if not isinstance(local, dict) or not isinstance(local.get("services"), dict):
            raise StackError(f"{compose_file} has no {LOCAL_KEY}.services")
        self.local = local
        self.host: str = local.get("host", "127.0.0.1")
        self.external: list[str] = list(local.get("external", []))
        self.local_services: dict[str, dict[str, Any]] = {k: dict(v or {}) for k, v in local["services"].items()}
        for name in [*self.external, *self.local_services]:
            if name not in self.services:
                raise StackError(f"{LOCAL_KEY} names {name!r}, which is not a service of {compose_file}")
        self.state_dir = Path(state_dir).resolve()
        self.options = options
        self.port_offset = options.port_offset
        self.vhost = options.vhost or self.compose_vhost()
        self.user_prefix = options.user_prefix or COMPOSE_USER_PREFIX
        self.secrets_dir = self.state_path("/run/secrets")
        self.run_dir = self.state_dir / "run"
        self.log_dir = self.state_dir / "log"
        self.work_dir = self.state_dir / "stack"

    @property
    def queue_type(self) -> str:
        """The topology profile (KIT_QUEUE_TYPE): quorum on a cluster, else classic."""
        return "quorum" if self.options.cluster else "classic"

    # -- a local RabbitMQ cluster (``stack up --cluster N``) ------------------

    def cluster_layout(self) -> ClusterLayout | None:
        """Names and ports of the stack's cluster nodes (ports moved by the port offset); None without one."""
        if not self.options.cluster:
            return None
        o = self.port_offset
        return ClusterLayout(size=self.options.cluster, prefix=f"kit-o{o}-c" if o else "kit-c",
                             first_amqp_port=CLUSTER_AMQP_PORT + o, first_dist_port=CLUSTER_DIST_PORT + o,
                             first_management_port=CLUSTER_MANAGEMENT_PORT + o,
                             first_prometheus_port=CLUSTER_PROMETHEUS_PORT + o)

    def cluster(self) -> LocalCluster | None:
        """The stack's RabbitMQ cluster (its nodes' data in CLUSTER_DATA_DIR/<node prefix>); None without one.

        Not in KIT_STATE_DIR: the nodes run as the ``rabbitmq`` user, which often
        cannot reach it (a home directory or a test's temporary directory is 0700).
        """
        layout = self.cluster_layout()
        return LocalCluster(CLUSTER_DATA_DIR / layout.prefix, layout) if layout else None

    def broker_nodes(self) -> list[Node]:
        """The cluster's nodes, first to last (empty without a cluster)."""
        cluster = self.cluster()
        return cluster.nodes if cluster else []

    def _expand_to_nodes(self, text: str, port_attribute: str) -> list[str]:
        """``text`` once per cluster node, node 1's address replaced by each node's."""
        first = self.broker_nodes()[0]
        address = f"{self.host}:{getattr(first, port_attribute)}"
        return [text.replace(address, f"{self.host}:{getattr(node, port_attribute)}") for node in self.broker_nodes()]

    def cluster_broker_url(self, url: str) -> str:
        """A mapped broker URL of node 1 as every node's URL, joined by ``;`` (kombu's failover syntax)."""
        return ";".join(self._expand_to_nodes(url, "amqp_port"))

    def cluster_targets(self, targets: list[Any]) -> list[Any]:
        """A Prometheus target list with node 1's prometheus endpoint expanded to every node's."""
        first = f"{self.host}:{self.broker_nodes()[0].prometheus_port}"
        expanded: list[Any] = []
        for target in targets:
            if target == first:
                expanded += self._expand_to_nodes(target, "prometheus_port")
            else:
                expanded.append(target)
        return expanded

    # -- facts from docker-compose.yml ------------------------------------

    def compose_vhost(self) -> str:
        """The vhost of the broker URLs in docker-compose.yml (they must agree)."""
        vhosts = {unquote(urlsplit(url).path[1:]) for url in self.broker_urls().values()}
        if len(vhosts) != 1:
            raise StackError(f"docker-compose.yml's broker URLs name different vhosts: {sorted(vhosts)}")
        return vhosts.pop()

    def broker_urls(self) -> dict[str, str]:
        """service -> its KIT_BROKER_URL in docker-compose.yml (services that have one)."""
        found = {}
        for name, service in self.services.items():
            url = (service.get("environment") or {}).get("KIT_BROKER_URL")
            if url:
                found[name] = str(url)
        return found

    def state_path(self, container_path: str) -> Path:
        """A container path listed under x-local-stack.paths, in KIT_STATE_DIR."""
        for prefix, local in sorted(self.local.get("paths", {}).items(), key=lambda kv: -len(kv[0])):
            rel = path_under(container_path, prefix)
            if rel is not None:
                base = self.state_dir / str(local)
                return (base / rel) if rel else base
        raise StackError(f"{LOCAL_KEY}.paths does not map the container path {container_path}")

    def local_port(self, service: str, port: int) -> int:
        """Where ``service``'s container port listens on this machine (on a cluster, rabbitmq's are node 1's)."""
        if service == BROKER_SERVICE and self.options.cluster and port in _NODE_PORTS:
            return getattr(self.broker_nodes()[0], _NODE_PORTS[port])
        if service in self.external:
            return port
        return port + self.port_offset

    def own_ports(self, service: str) -> dict[int, int]:
        return {p: self.local_port(service, p) for p in container_ports(self.services[service])}

    def published_here(self) -> dict[int, int]:
        """Host port compose publishes -> where it listens here, for the services this stack runs or uses."""
        found: dict[int, int] = {}
        for name in [*self.external, *self.local_services]:
            for port, host_port in published_ports(self.services[name]).items():
                found[host_port] = self.local_port(name, port)
        return found

    def components(self, demo: bool | None = None) -> list[Component]:
        """The local processes, in start order; ``demo`` (default: the options') includes only-with --demo ones."""
        demo = self.options.demo if demo is None else demo
        return [self.component(name) for name, spec in self.local_services.items()
                if demo or spec.get("only-with") != "--demo"]

    def all_components(self) -> list[Component]:
        return self.components(demo=True)

    def optional(self, name: str) -> bool:
        return self.local_services.get(name, {}).get("only-with") == "--demo"

    # -- mapping one service ----------------------------------------------

    def mount_table(self, name: str) -> list[tuple[str, Path]]:
        """(container path, local path) of a service's bind mounts and x-local-stack paths, longest first."""
        table: list[tuple[str, Path]] = []
        service_mounts = mounts(self.services[name])
        rewrite = set(self.local_services.get(name, {}).get("rewrite-hosts", []))
        for m in service_mounts:
            if not m.bind:
                continue
            nested = [n for n in service_mounts if n is not m and n.bind and path_under(n.target, m.target)]
            inside_other = any(path_under(m.target, o.target) for o in service_mounts if o is not m and o.bind)
            if nested or inside_other or m.target in rewrite:
                table.append((m.target, self.work_dir / "overlay" / name / m.target.lstrip("/")))
            else:
                table.append((m.target, (REPO / m.source).resolve()))
        for m in service_mounts:
            if not m.bind:
                self.state_path(m.target)  # a named volume must be mapped
        for prefix in self.local.get("paths", {}):
            table.append((prefix, self.state_path(prefix)))
        return sorted(table, key=lambda item: -len(item[0]))

    def map_path(self, name: str, container_path: str) -> str:
        for prefix, local in self.mount_table(name):
            rel = path_under(container_path, prefix)
            if rel is not None:
                return str(local / rel) if rel else str(local)
        return container_path

    def map_text(self, name: str, text: str) -> str:
        """Hosts, ports and container paths of ``text`` mapped for service ``name`` on this machine."""
        own = self.own_ports(name)
        published = self.published_here()

        def host_port(m: re.Match[str]) -> str:
            host, port = m["host"], int(m["port"])
            if host in self.services:
                return f"{self.host}:{self.local_port(host, port)}"
            if host in _OWN_HOSTS and port in own:
                return f"{self.host}:{own[port]}"
            if host in _OWN_HOSTS and port in published:
                return f"{self.host}:{published[port]}"
            return m.group(0)

        text = _HOST_PORT.sub(host_port, text)
        text = _ALL_INTERFACES.sub(self.host, text)
        return _ABS_PATH.sub(lambda m: self.map_path(name, m.group(0)), text)

    def map_token(self, name: str, token: str) -> str:
        """One command-line argument: map_text, and a bare own port (``9808``, ``--port=5555``) moved."""
        own = self.own_ports(name)
        if token.isdigit() and int(token) in own:
            return str(own[int(token)])
        m = _FLAG_VALUE.match(token)
        if m and m["value"].isdigit() and int(m["value"]) in own:
            return m["flag"] + str(own[int(m["value"])])
        return self.map_text(name, token)

    def map_broker_url(self, url: str) -> str:
        """A compose broker URL with the stack's user prefix and vhost."""
        parts = urlsplit(url)
        if parts.scheme not in AMQP_SCHEMES:
            return url
        netloc = parts.netloc
        if "@" in netloc:
            credentials, hostport = netloc.rsplit("@", 1)
            user, sep, password = credentials.partition(":")
            user = unquote(user)
            if user.startswith(COMPOSE_USER_PREFIX):
                user = self.user_prefix + user[len(COMPOSE_USER_PREFIX):]
            netloc = f"{quote(user, safe='')}{sep}{password}@{hostport}"
        return urlunsplit((parts.scheme, netloc, "/" + quote(self.vhost, safe=""), parts.query, parts.fragment))

    def environment(self, name: str) -> dict[str, str]:
        """The process environment of service ``name``: compose's values, mapped."""
        spec = self.local_services.get(name, {})
        env = {k: v for k, v in self.environ.items()
               if not k.startswith(("KIT_", "SENTRY_")) and k != "PROMETHEUS_MULTIPROC_DIR"}
        own = self.own_ports(name)
        for key, value in (self.services[name].get("environment") or {}).items():
            if value is None:  # compose passes these through from its own environment
                if key in self.environ:
                    env[key] = self.environ[key]
                continue
            value = str(value)
            if value.isdigit() and int(value) in own:
                env[key] = str(own[int(value)])
                continue
            if urlsplit(value).scheme in AMQP_SCHEMES:
                value = self.map_broker_url(value)
                if self.options.cluster:
                    env[key] = self.cluster_broker_url(self.map_text(name, value))
                    env["KIT_QUEUE_TYPE"] = self.queue_type
                    continue
            env[key] = self.map_text(name, value)
        if spec.get("venv"):
            env["PATH"] = str(REPO / spec["venv"] / "bin") + os.pathsep + env.get("PATH", os.defpath)
            env["PYTHONUNBUFFERED"] = "1"
            env.pop("VIRTUAL_ENV", None)
        env["HOSTNAME"] = socket.gethostname()  # what Docker sets, and what Celery's %h expands to
        return env

    def command(self, name: str, env: Mapping[str, str]) -> list[str]:
        spec = self.local_services.get(name, {})
        argv = full_command(self.services[name])
        if not argv:
            raise StackError(f"service {name} has no entrypoint/command in docker-compose.yml")
        executables = spec.get("executables", {})
        argv = [executables.get(argv[0], argv[0])] + [self.map_token(name, a) for a in argv[1:]]
        resolved = shutil.which(argv[0], path=env.get("PATH"))
        if resolved:
            argv[0] = resolved
        if spec.get("alertmanager-config"):
            argv = [self._alertmanager_flag(name, a) for a in argv]
        return argv

    def _alertmanager_flag(self, name: str, token: str) -> str:
        if token.startswith("--config.file="):
            return "--config.file=" + str(self.work_dir / name / "alertmanager.yml")
        return token

    def probe(self, name: str) -> Probe | None:
        check = self.services[name].get("healthcheck")
        if not check or check.get("disable"):
            return None
        test = check.get("test")
        timeout = parse_duration(check.get("timeout"), 30.0)
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if not test or test[0] == "NONE":
            return None
        kind, args = test[0], [str(a) for a in test[1:]]
        text = " ".join(args)
        url = _URL.search(text)
        if url:
            return Probe(url=self.map_text(name, url.group(0)), timeout=timeout)
        if kind == "CMD-SHELL":
            return Probe(argv=("sh", "-c", self.map_text(name, text)), timeout=timeout)
        return Probe(argv=tuple(self.map_token(name, a) for a in args), timeout=timeout)

    def component(self, name: str) -> Component:
        service = self.services[name]
        env = self.environment(name)
        return Component(
            name=name,
            argv=tuple(self.command(name, env)),
            env=env,
            stop_timeout=parse_duration(service.get("stop_grace_period")),
            probe=self.probe(name),
            ports=tuple(self.own_ports(name).values()),
        )

    # -- URLs -----------------------------------------------------------------

    def urls(self) -> dict[str, str]:
        """What a person opens: each published port of the services this stack has, on this machine."""
        found = {}
        for name in [*self.external, *self.local_services]:
            if self.optional(name) or name not in self.services:
                continue
            for port in published_ports(self.services[name]):
                local = self.local_port(name, port)
                if port in (5671, 5672):
                    found[f"{name} (AMQP)"] = f"amqp://{self.host}:{local}/{quote(self.vhost, safe='')}"
                elif port == REDIS_PORT:
                    found[name] = f"redis://{self.host}:{local}"
                else:
                    found[name] = f"http://{self.host}:{local}"
        return found

    def management_url(self) -> str:
        """RabbitMQ's management API: node 1's on a cluster, else KIT_ADMIN_URL, else the rabbitmq service's here."""
        if self.environ.get("KIT_ADMIN_URL") and not self.options.cluster:
            return self.environ["KIT_ADMIN_URL"]
        return f"http://{self.host}:{self.local_port('rabbitmq', 15672)}"

    def user(self, role: str) -> str:
        return f"{self.user_prefix}{role}"
