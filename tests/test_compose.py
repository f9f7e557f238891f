"""docker-compose.yml without a Docker engine: Debian's docker-compose validates it,
every file it mounts exists and passes its own validator (promtool, amtool,
JSON, YAML), and the local stack (service/stack/) runs the same commands with
the same configuration, read from it. Needs docker-compose, promtool and amtool
(scripts/install.sh); no broker. The 3-node cluster (docker-compose.cluster.yml on
top of docker-compose.yml) is checked the same way, merged as Docker Compose merges it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service import broker, queues
from service import stack as local
from service.monitoring import alertmanager_config
from service.setting_rules import parse
from service.settings import SETTINGS
from service.stack import compose, files
from tests.helpers import REPO

COMPOSE = REPO / "docker-compose.yml"
#: The 3-node cluster: an override of COMPOSE (docker-compose -f COMPOSE -f CLUSTER).
CLUSTER = REPO / "docker-compose.cluster.yml"
#: The cluster's nodes: service name -> host name (node N is rabbit@rabbitmq-N).
CLUSTER_NODES = {"rabbitmq": "rabbitmq-1", "rabbitmq-2": "rabbitmq-2", "rabbitmq-3": "rabbitmq-3"}
HARD_TIME_LIMIT_DEFAULT = float(next(s.default for s in SETTINGS if s.name == "KIT_HARD_TIME_LIMIT"))
#: Services that run until stopped (everything but the one-shot broker-definitions).
LONG_RUNNING = ("rabbitmq", "redis", "worker-urgent", "worker-default-bulk", "beat", "web", "console",
                "alert-relay", "celery-exporter", "prometheus", "alertmanager", "grafana", "flower", "demo")
#: Long-running services without a health check, and why.
NO_HEALTHCHECK = {
    "beat": "no endpoint; its schedule file is written only when it sends a task",
    "demo": "a traffic generator",
}


def size(text: str) -> int:
    """Bytes of a size: 2g (compose: binary), 2GiB or 2G (RabbitMQ: binary), 2GB (RabbitMQ: decimal)."""
    number, unit, decimal = re.fullmatch(r"(\d+)\s*([kmgt]?)(i?b?)", text.strip(), re.I).groups()
    power = " kmgt".index(unit.lower() or " ")
    return int(number) * (1000 if decimal.lower() == "b" else 1024) ** power


def run(*argv: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(str(argv[0]))
    assert exe, f"{argv[0]} is not installed: run scripts/install.sh"
    return subprocess.run([exe, *map(str, argv[1:])], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """`docker-compose config`: the file as Docker Compose resolves it."""
    result = run("docker-compose", "-f", COMPOSE, "config")
    assert_ok(result)
    assert "WARNING" not in result.stderr, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    """`docker-compose -f docker-compose.yml -f docker-compose.cluster.yml config`: the cluster as Compose merges it."""
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed: run scripts/install.sh")
    result = run("docker-compose", "-f", COMPOSE, "-f", CLUSTER, "config")
    assert_ok(result)
    assert "WARNING" not in result.stderr, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """docker-compose.yml as the local stack reads it (extensions included)."""
    return compose.load_compose(COMPOSE, environ={})


def prepared_stack(state_dir: Path, options: local.Options) -> local.Stack:
    """The local stack of a fresh state directory, its files written."""
    made = local.Stack(state_dir, options, environ={"PATH": os.environ["PATH"]})
    made.secrets_dir.mkdir(parents=True)
    files.prepare_files(made)
    return made


@pytest.fixture
def stack(tmp_path: Path) -> local.Stack:
    """The default local stack (demo on) of a fresh state directory, its files written."""
    return prepared_stack(tmp_path / "state", local.Options(demo=True))


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["services"]


def command(service: dict[str, Any]) -> list[str]:
    return list(service.get("entrypoint") or []) + list(service.get("command") or [])


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE``."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def workers(config: dict[str, Any]) -> dict[str, list[str]]:
    """service -> its work queues, for every service running `python -m service worker`."""
    found = {}
    for name, service in services(config).items():
        argv = command(service)
        if argv[:4] == ["python", "-m", "service", "worker"]:
            found[name] = flag(argv, "--queues").split(",")
    return found


# --------------------------------------------------------------------------- the compose file


def test_docker_compose_config_is_valid(config: dict[str, Any]) -> None:
    assert set(LONG_RUNNING) | {"broker-definitions"} == set(services(config))


def test_images_are_pinned(config: dict[str, Any]) -> None:
    for name, service in services(config).items():
        image = service.get("image", "")
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
    stages = re.findall(r"^FROM \S+ AS (\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM ") and line.split()[1] not in stages:
            image = line.split()[1]
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), f"Dockerfile: {image} is not pinned"


def test_workers_are_split_so_urgent_work_never_waits_behind_bulk(config: dict[str, Any]) -> None:
    consumed = workers(config)
    assert ["urgent"] in consumed.values(), "urgent needs workers of its own"
    every = [q for names in consumed.values() for q in names]
    assert sorted(every) == sorted(queues.WORK_QUEUE_NAMES), "each work queue is consumed by exactly one service"
    for name, names in consumed.items():
        if "urgent" in names:
            assert names == ["urgent"], f"{name} mixes urgent with {names}"


def test_exactly_one_beat(config: dict[str, Any]) -> None:
    beats = [n for n, s in services(config).items() if command(s)[:4] == ["python", "-m", "service", "beat"]]
    assert beats == ["beat"]
    assert "deploy" not in services(config)["beat"] and "scale" not in services(config)["beat"]


def test_stop_grace_period_outlasts_the_hard_time_limit(config: dict[str, Any]) -> None:
    for name in workers(config):
        service = services(config)[name]
        hard = float(service["environment"].get("KIT_HARD_TIME_LIMIT") or HARD_TIME_LIMIT_DEFAULT)
        grace = compose.parse_duration(service.get("stop_grace_period"))
        assert grace > hard, f"{name}: stop_grace_period {grace:g}s <= KIT_HARD_TIME_LIMIT {hard:g}s"
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", "SIGTERM is Celery's warm shutdown"


def test_health_checks_restart_policies_and_resource_limits(config: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        service = services(config)[name]
        assert service.get("restart") == "unless-stopped", f"{name}: no restart policy"
        if name not in NO_HEALTHCHECK:
            assert service.get("healthcheck", {}).get("test"), f"{name}: no health check"
    assert services(config)["broker-definitions"]["restart"] == "no"
    for name, service in services(config).items():
        assert service.get("mem_limit") and service.get("cpus"), f"{name}: no resource limits"


def test_services_wait_for_a_healthy_broker(config: dict[str, Any]) -> None:
    for name, service in services(config).items():
        if "KIT_BROKER_URL" in service.get("environment", {}):
            assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name


def test_flower_and_demo_are_optional_profiles(config: dict[str, Any]) -> None:
    assert services(config)["flower"]["profiles"] == ["flower"]
    assert services(config)["demo"]["profiles"] == ["demo"]
    for name in set(LONG_RUNNING) - {"flower", "demo"}:
        assert not services(config)[name].get("profiles"), f"{name} must start by default"


# --------------------------------------------------------------------------- no guest, secrets


def test_no_guest_and_one_user_per_role(config: dict[str, Any]) -> None:
    code = "\n".join(line.split("#")[0] for line in COMPOSE.read_text().splitlines())
    assert "guest" not in code.lower()
    users = set()
    for name, service in services(config).items():
        env = service.get("environment", {})
        assert not any(k.startswith("RABBITMQ_DEFAULT") for k in env), name
        if "KIT_BROKER_URL" in env:
            url = env["KIT_BROKER_URL"]
            user = re.match(r"pyamqp://([^:@]+)@rabbitmq:5672/kit$", url)
            assert user, f"{name}: {url} (no password in the URL; user@rabbitmq:5672/kit)"
            role = user.group(1).removeprefix("kit-")
            assert role in broker.ROLES, f"{name}: {user.group(1)} is not a kit role"
            assert env["KIT_BROKER_PASSWORD_FILE"] == f"/run/secrets/{broker.SECRET_FILE.format(role=role)}"
            assert {"source": broker.SECRET_FILE.format(role=role)} in service["secrets"], name
            users.add(role)
    assert users == {"worker", "publisher", "monitor", "console"}
    roles = {n: workers(config).get(n) for n in services(config)}
    for name, queue_names in roles.items():
        if queue_names:
            assert "kit-worker@" in services(config)[name]["environment"]["KIT_BROKER_URL"]
            assert services(config)[name]["environment"]["KIT_DECLARE_TOPOLOGY"] == "false"


def rabbitmq_conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (sysctl format) as key -> value."""
    return dict(
        (k.strip(), v.strip()) for k, v in
        (line.split("=", 1) for line in path.read_text().splitlines()
         if line.strip() and not line.lstrip().startswith("#"))
    )


def test_rabbitmq_loads_the_definitions_at_boot(config: dict[str, Any]) -> None:
    conf = rabbitmq_conf(REPO / "deploy/rabbitmq/rabbitmq.conf")
    assert "default_user" not in conf and "default_pass" not in conf
    assert conf["loopback_users.guest"] == "true"
    assert conf.get("loopback_users") != "none"
    definitions = services(config)["broker-definitions"]
    argv = command(definitions)
    assert argv[:5] == ["python", "-m", "service", "broker", "definitions"]
    assert flag(argv, "--vhost") == "kit"
    assert flag(argv, "--secrets-dir") == "/run/secrets"
    assert conf["load_definitions"] == flag(argv, "--out")
    volume = lambda service: next(v for v in service["volumes"] if v.startswith("rabbitmq-definitions:"))  # noqa: E731
    out_dir = str(Path(flag(argv, "--out")).parent)
    assert volume(definitions).split(":")[1] == out_dir
    assert volume(services(config)["rabbitmq"]).split(":")[1] == out_dir
    assert services(config)["rabbitmq"]["depends_on"]["broker-definitions"] == {
        "condition": "service_completed_successfully"}
    secrets = {s["source"] for s in definitions["secrets"]}
    assert secrets == {broker.SECRET_FILE.format(role=r) for r in broker.ROLES}
    mem_limit = services(config)["rabbitmq"]["mem_limit"]
    assert size(conf["total_memory_available_override_value"]) == size(mem_limit), (
        "RabbitMQ's memory alarm must be computed against the container's mem_limit")
    plugins = (REPO / "deploy/rabbitmq/enabled_plugins").read_text()
    assert re.fullmatch(r"\s*\[\s*[a-z_]+(\s*,\s*[a-z_]+)*\s*\]\.\s*", plugins), "not an Erlang list term"
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins


def test_grafana_admin_password_comes_from_a_secret(config: dict[str, Any]) -> None:
    grafana = services(config)["grafana"]
    env = grafana["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert {"source": "grafana_admin_password"} in grafana["secrets"]
    assert env["PROMETHEUS_URL"] == "http://prometheus:9090"


def test_make_secrets_creates_every_compose_secret(config: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "secrets"
    assert_ok(run("bash", REPO / "scripts/make-secrets.sh", target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    for name, secret in config["secrets"].items():
        assert Path(secret["file"]).parent == REPO / "secrets", f"{name}: secrets live in ./secrets/"
        assert (target / name).is_file(), f"make-secrets.sh did not create {name}"
    passwords = broker.read_passwords(target)  # long enough, not a well-known default
    assert len(set(passwords.values())) == len(passwords)
    assert len((target / "grafana_admin_password").read_text()) >= 32
    before = {p.name: p.read_text() for p in target.iterdir()}
    assert_ok(run("bash", REPO / "scripts/make-secrets.sh", target))
    assert before == {p.name: p.read_text() for p in target.iterdir()}, "a second run changed a secret"


def test_secrets_are_never_committed_nor_built_into_images() -> None:
    result = subprocess.run(["git", "check-ignore", "-q", "secrets/rabbitmq_admin_password"], cwd=REPO)
    assert result.returncode == 0, "add secrets/ to .gitignore"
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    assert dockerignore[[line.strip() for line in dockerignore].index("*")] == "*", "the build context is opt-in"
    assert not any("secret" in line for line in dockerignore if line.startswith("!"))


# --------------------------------------------------------------------------- mounted files and their validators


def test_every_mounted_and_built_file_exists(config: dict[str, Any]) -> None:
    for name, service in services(config).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"
                assert Path(source).resolve().is_relative_to(REPO), f"{name} mounts {source} from outside the repo"
        if "build" in service:
            assert Path(service["build"]["context"]) == REPO
            dockerfile = REPO / service["build"].get("dockerfile", "Dockerfile")
            assert re.search(rf"^FROM \S+ AS {service['build']['target']}$", dockerfile.read_text(), re.M), name
    allowed = [line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"{source} is excluded from the build context by .dockerignore")


def _compose_prometheus_dir(tmp_path: Path) -> Path:
    """/etc/prometheus as compose assembles it from its two mounts."""
    etc = tmp_path / "etc-prometheus"
    shutil.copytree(REPO / "deploy/prometheus", etc)
    shutil.rmtree(etc / "targets")
    shutil.copytree(REPO / "deploy/compose/prometheus-targets", etc / "targets")
    return etc


def test_prometheus_config_as_compose_mounts_it(config: dict[str, Any], tmp_path: Path) -> None:
    prometheus = services(config)["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command(prometheus)
    etc = _compose_prometheus_dir(tmp_path)
    assert_ok(run("promtool", "check", "config", "prometheus.yml", cwd=etc))
    assert_ok(run("promtool", "check", "rules", *sorted((etc / "rules").glob("*.yml"))))
    hosts = set(services(config))
    for path in sorted((etc / "targets").glob("*.json")):
        for group in json.loads(path.read_text()):
            for target in group["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in hosts, f"{path.name}: {target} is not a compose service"
                assert int(port) in compose.container_ports(services(config)[host]) or host == "rabbitmq", target


def test_prometheus_config_as_the_local_stack_runs_it(stack: local.Stack) -> None:
    prometheus = stack.component("prometheus")
    config_file = Path(flag(list(prometheus.argv), "--config.file"))
    assert config_file.resolve() == REPO / "deploy/prometheus/prometheus.yml", "the repo's own file, not a copy"
    assert (config_file.parent / "rules").resolve() == REPO / "deploy/prometheus/rules"
    assert_ok(run("promtool", "check", "config", config_file.name, cwd=config_file.parent))


def test_local_targets_are_the_compose_targets_mapped(stack: local.Stack) -> None:
    """deploy/prometheus/targets/ is what the stack derives from compose's targets at port offset 0."""
    generated = Path(flag(list(stack.component("prometheus").argv), "--config.file")).parent / "targets"
    committed = sorted(p.name for p in (REPO / "deploy/prometheus/targets").glob("*.json"))
    assert sorted(p.name for p in generated.glob("*.json")) == committed
    for name in committed:
        assert json.loads((generated / name).read_text()) == json.loads(
            (REPO / "deploy/prometheus/targets" / name).read_text()), name


def test_prometheus_scrapes_the_vhost_of_the_stack(stack: local.Stack, tmp_path: Path) -> None:
    """Every RabbitMQ target group names the stack's vhost as kit_vhost (compose's, or --vhost)."""
    assert stack.vhost == stack.compose_vhost()
    for targets in (REPO / "deploy/compose/prometheus-targets", REPO / "deploy/prometheus/targets"):
        groups = json.loads((targets / "rabbitmq.json").read_text())
        assert [g["labels"][local.VHOST_TARGET_LABEL] for g in groups] == [stack.vhost] * len(groups), targets
    other = prepared_stack(tmp_path / "other", local.Options(vhost="other-vhost"))
    generated = Path(flag(list(other.component("prometheus").argv), "--config.file")).parent / "targets"
    groups = json.loads((generated / "rabbitmq.json").read_text())
    assert {g["labels"][local.VHOST_TARGET_LABEL] for g in groups} == {"other-vhost"}


def test_alertmanager_config_as_compose_and_the_local_stack_run_it(config: dict[str, Any],
                                                                   stack: local.Stack) -> None:
    alertmanager = services(config)["alertmanager"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in command(alertmanager)
    assert {s["source"] for s in alertmanager["secrets"]} == set(alertmanager_config.SECRET_FILES)
    assert_ok(run("amtool", "check-config", REPO / "deploy/alertmanager/alertmanager.yml"))
    rendered = Path(flag(list(stack.component("alertmanager").argv), "--config.file"))
    assert_ok(run("amtool", "check-config", rendered))
    text = rendered.read_text()
    assert "pagerduty.com" not in text and "example.com:587" not in text, "local alerts stay on this machine"
    assert str(stack.secrets_dir) in text
    committed = (REPO / "deploy/alertmanager/alertmanager.yml").read_text()
    section = lambda t: t[t.index("\nroute:"):t.index("\nreceivers:")]  # noqa: E731
    assert section(text) == section(committed), "routing and inhibition are the committed ones"


def test_grafana_files_parse(config: dict[str, Any]) -> None:
    grafana = services(config)["grafana"]
    sources = {v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"] if v.startswith("/")}
    provisioning = sources["/etc/grafana/provisioning"]
    for path in sorted(provisioning.rglob("*.yml")):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1, path
    dashboards_path = yaml.safe_load((provisioning / "dashboards/kit.yml").read_text())
    assert dashboards_path["providers"][0]["options"]["path"] in sources, "the dashboards directory is mounted"
    dashboards = sorted(sources["/var/lib/grafana/dashboards"].glob("*.json"))
    assert dashboards
    for path in dashboards:
        assert json.loads(path.read_text())["uid"], path


# --------------------------------------------------------------------------- one source: compose and the stack


def test_every_service_is_placed_in_the_local_stack(raw: dict[str, Any]) -> None:
    spec = raw[local.LOCAL_KEY]
    placed = list(spec["services"]) + spec["external"] + spec["not-local"]
    assert sorted(placed) == sorted(raw["services"]), "each service runs locally, externally, or not locally"


def test_the_stack_runs_the_compose_commands(config: dict[str, Any], stack: local.Stack) -> None:
    for component in stack.all_components():
        compose_argv = command(services(config)[component.name])
        argv = list(component.argv)
        assert len(argv) == len(compose_argv), component.name
        spec = stack.local_services[component.name]
        if spec.get("venv"):
            assert argv[0] == str(REPO / spec["venv"] / "bin" / "python"), component.name
        else:
            assert Path(argv[0]).name == spec["executables"][compose_argv[0]], component.name
        for ours, theirs in zip(argv[1:], compose_argv[1:], strict=True):
            if ours == theirs:
                continue
            # Only hosts and container paths differ, in the documented ways.
            ours_norm = ours.replace("127.0.0.1", "HOST")
            theirs_norm = re.sub(r"(0\.0\.0\.0|localhost|127\.0\.0\.1)", "HOST", theirs)
            if ours_norm == theirs_norm:
                continue
            if theirs.startswith("/"):  # a container path on its own (redis-server --dir /data)
                assert Path(ours).is_relative_to(stack.state_dir), (component.name, ours)
                continue
            flag_name = theirs.split("=", 1)[0]
            assert ours.startswith(flag_name + "=/"), f"{component.name}: {theirs} became {ours}"
            assert Path(ours.split("=", 1)[1]).is_relative_to(stack.state_dir), (component.name, ours)
    # Kit services run exactly the compose command.
    for name in ("worker-urgent", "worker-default-bulk", "beat", "demo"):
        assert list(stack.component(name).argv[1:]) == command(services(config)[name])[1:]


def test_the_stack_uses_the_compose_environment(config: dict[str, Any], stack: local.Stack) -> None:
    for component in stack.all_components():
        env = services(config)[component.name].get("environment", {})
        for key, value in env.items():
            if value is None:
                assert key not in component.env, f"{component.name}: {key} is passed through only when set"
                continue
            ours = component.env[key]
            if key == "KIT_BROKER_URL":
                assert ours == value.replace("@rabbitmq:", "@127.0.0.1:"), component.name
            elif key == "KIT_CONSOLE_URL":  # where people open the console: its port here
                assert ours == value.replace("//localhost:", "//127.0.0.1:"), component.name
            elif key == "KIT_RESULT_BACKEND":
                assert ours == value.replace("//redis:", "//127.0.0.1:"), component.name
            elif value == "0.0.0.0":  # every interface: the stack's host
                assert ours == "127.0.0.1", (component.name, key)
            elif value.startswith("/"):
                assert Path(ours).is_relative_to(stack.state_dir), (component.name, key, ours)
            else:
                assert ours == value, (component.name, key)


def test_ports_move_with_the_offset_and_the_broker_stays(tmp_path: Path) -> None:
    base = local.Stack(tmp_path, local.Options(demo=True))
    moved = local.Stack(tmp_path, local.Options(port_offset=1000, vhost="v", user_prefix="p-", demo=True))
    for a, b in zip(base.all_components(), moved.all_components(), strict=True):
        assert [p + 1000 for p in a.ports] == list(b.ports), a.name
        if a.probe and a.probe.url:
            assert a.probe.url != b.probe.url
    env = moved.component("worker-urgent").env
    assert env["KIT_BROKER_URL"] == "pyamqp://p-worker@127.0.0.1:5672/v"
    assert env["KIT_METRICS_PORT"] == "10810"
    assert moved.management_url() == "http://127.0.0.1:15672"
    urls = moved.urls()
    assert urls["prometheus"] == "http://127.0.0.1:10090" and urls["rabbitmq"] == "http://127.0.0.1:15672"


def test_the_console_listens_where_compose_publishes_it(config: dict[str, Any], raw: dict[str, Any]) -> None:
    console = services(config)["console"]
    assert command(console) == ["python", "-m", "service", "console"]
    env = console["environment"]
    assert env["KIT_BROKER_URL"] == "pyamqp://kit-console@rabbitmq:5672/kit"
    assert env["KIT_BROKER_PASSWORD_FILE"] == "/run/secrets/rabbitmq_console_password"
    assert {s["source"] for s in console["secrets"]} == {"rabbitmq_console_password"}
    assert env["KIT_CONSOLE_HOST"] == "0.0.0.0"
    port = int(env["KIT_CONSOLE_PORT"])
    assert raw["services"]["console"]["ports"] == [f"127.0.0.1:{port}:{port}"], "the host's loopback only"
    for name in ("KIT_CONSOLE_PORT", "KIT_CONSOLE_URL", "KIT_CONSOLE_USERS_FILE", "KIT_CONSOLE_ARCHIVE_DIR"):
        parse(next(s for s in SETTINGS if s.name == name), env[name])  # the kit's own rules accept them
    # Its users and purge archives survive a new container: a volume of their own.
    state = next(v for v in console["volumes"] if v.split(":")[1] == "/var/lib/kit")
    assert state.split(":")[0] == "console-state"
    for name in ("KIT_CONSOLE_USERS_FILE", "KIT_CONSOLE_ARCHIVE_DIR"):
        assert compose.path_under(env[name], "/var/lib/kit"), name
    # The health check: /healthz (no login) on its port; the dead-letter links point at it by default.
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(console["healthcheck"]["test"])
    default_url = raw["services"]["console"]["environment"]["KIT_CONSOLE_URL"]  # KIT_CONSOLE_URL unset
    assert default_url == f"http://localhost:{port}"
    assert raw["services"]["prometheus"]["environment"]["KIT_CONSOLE_URL"] == default_url
    assert services(config)["prometheus"]["environment"]["KIT_CONSOLE_URL"] == env["KIT_CONSOLE_URL"]
    assert "--enable-feature=expand-external-labels" in command(services(config)["prometheus"])
    assert raw[local.LOCAL_KEY]["services"]["console"] == {"venv": ".venv"}


def test_the_stack_runs_the_console_on_its_own_ports_and_files(tmp_path: Path) -> None:
    moved = local.Stack(tmp_path / "state", local.Options(port_offset=1000), environ={"PATH": os.environ["PATH"]})
    console = moved.component("console")
    assert console.env["KIT_CONSOLE_HOST"] == "127.0.0.1" and console.env["KIT_CONSOLE_PORT"] == "6580"
    assert console.env["KIT_CONSOLE_URL"] == "http://127.0.0.1:6580"
    assert console.env["KIT_BROKER_URL"] == "pyamqp://kit-console@127.0.0.1:5672/kit"
    assert console.env["KIT_BROKER_PASSWORD_FILE"] == str(moved.secrets_dir / "rabbitmq_console_password")
    assert console.env["KIT_CONSOLE_USERS_FILE"] == str(moved.state_dir / "console_users")
    assert console.env["KIT_CONSOLE_ARCHIVE_DIR"] == str(moved.state_dir / "console-archives")
    assert console.probe is not None and console.probe.url == "http://127.0.0.1:6580/healthz"
    assert moved.urls()["console"] == "http://127.0.0.1:6580"
    # Prometheus' console_url: the console of this stack, unless the caller says where people reach it.
    assert moved.component("prometheus").env["KIT_CONSOLE_URL"] == "http://127.0.0.1:6580"
    proxied = local.Stack(tmp_path / "state", local.Options(port_offset=1000),
                          environ={"PATH": os.environ["PATH"], "KIT_CONSOLE_URL": "https://dlq.example.com"})
    for name in ("prometheus", "console"):
        assert proxied.component(name).env["KIT_CONSOLE_URL"] == "https://dlq.example.com", name


def test_stack_tells_how_to_add_the_first_console_operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.stack import lifecycle

    monkeypatch.chdir(REPO)
    made = local.Stack(tmp_path / "state", local.Options(), environ={"PATH": os.environ["PATH"]})
    login = lifecycle.console_login(made)
    assert login is not None and login.url == "http://127.0.0.1:5580" and login.operators == 0
    users = made.state_dir / "console_users"
    assert login.users_file == users
    assert login.add_operator == (f"KIT_CONSOLE_USERS_FILE={users} .venv/bin/python -m service console "
                                  "add-user NAME --role operator")
    users.parent.mkdir(parents=True)
    users.write_text("ann:viewer:scrypt$x\nbob:operator:scrypt$y\n")
    assert lifecycle.console_login(made).operators == 1


def test_flower_runs_behind_its_login(config: dict[str, Any], stack: local.Stack, tmp_path: Path) -> None:
    from service.cli import flower as flower_cli

    flower = services(config)["flower"]
    argv = command(flower)
    assert argv[:4] == ["python", "-m", "service", "flower"], "the kit's launcher, never bare celery flower"
    assert not any("basic" in a.lower() or "auth" in a.lower() for a in argv), "no login on the command line"
    assert flower["environment"]["KIT_FLOWER_AUTH_FILE"] == "/run/secrets/flower_basic_auth"
    assert {"source": "flower_basic_auth"} in flower["secrets"]
    # The health check needs no login (Flower exempts /healthcheck).
    assert "http://127.0.0.1:5555/healthcheck" in " ".join(flower["healthcheck"]["test"])
    local_flower = stack.component("flower")
    assert local_flower.env["KIT_FLOWER_AUTH_FILE"] == str(stack.secrets_dir / "flower_basic_auth")
    # make-secrets.sh writes a login that `python -m service flower` accepts.
    target = tmp_path / "secrets"
    assert_ok(run("bash", REPO / "scripts/make-secrets.sh", target))
    login = flower_cli.read_login(str(target / "flower_basic_auth"))
    assert re.fullmatch(r"kit:[0-9a-f]{48}", login), "user kit, a random password"


def test_exporter_watches_every_work_and_dead_letter_queue(config: dict[str, Any]) -> None:
    argv = command(services(config)["celery-exporter"])
    expected = [q.name for q in queues.WORK_QUEUES + queues.DEAD_LETTER_QUEUES]
    assert flag(argv, "--queues").split(",") == expected
    assert not any(a.startswith("--broker-url") for a in argv), "the password stays out of the command line"


def test_exporter_launcher_puts_the_password_file_into_the_url(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("celery_exporter", REPO / "scripts/celery_exporter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    secret = tmp_path / "password"
    secret.write_text("p@ss/w:rd\n")
    url = module.broker_url({"KIT_BROKER_URL": "pyamqp://kit-monitor@rabbitmq:5672/kit",
                             "KIT_BROKER_PASSWORD_FILE": str(secret)})
    assert url == "pyamqp://kit-monitor:p%40ss%2Fw%3Ard@rabbitmq:5672/kit"
    assert module.broker_url({"KIT_BROKER_URL": "pyamqp://u:x@h:1/v"}) == "pyamqp://u:x@h:1/v"


# --------------------------------------------------------------------------- the 3-node cluster (override file)


def node_url_parts(url: str) -> list[tuple[str, str, str, int, str]]:
    """(scheme, user, host, port, vhost) of each node of a KIT_BROKER_URL, in order."""
    found = []
    for node in url.split(";"):
        match = re.fullmatch(r"(pyamqp)://([^:@/]+)@([\w.-]+):(\d+)/([^/;]+)", node)
        assert match, f"{node!r}: scheme://user@host:port/vhost, without a password"
        scheme, user, host, port, vhost = match.groups()
        found.append((scheme, user, host, int(port), vhost))
    return found


def host_names(service_name: str, service: dict[str, Any]) -> set[str]:
    """The names other containers reach a service by: its name and its network aliases."""
    names = {service_name}
    for network in (service.get("networks") or {}).values():
        names.update((network or {}).get("aliases") or [])
    return names


def kit_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository (the kit's images), broker-definitions included."""
    return {n: s for n, s in services(config).items() if "build" in s}


def test_cluster_merged_config_is_valid_and_adds_two_nodes(config: dict[str, Any],
                                                           cluster_config: dict[str, Any]) -> None:
    assert set(services(cluster_config)) == set(services(config)) | {"rabbitmq-2", "rabbitmq-3"}
    assert set(CLUSTER_NODES) <= set(services(cluster_config))
    assert "x-local-stack" not in yaml.safe_load(CLUSTER.read_text()), "the local stack reads docker-compose.yml only"
    # The single node's service is node 1: nothing that waits for `rabbitmq` is left without a broker.
    for name, service in services(cluster_config).items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services(cluster_config), f"{name} waits for {dependency}, which is not defined"


def test_cluster_gives_every_kit_service_all_three_nodes_and_quorum_queues(config: dict[str, Any],
                                                                           cluster_config: dict[str, Any]) -> None:
    url_setting = next(s for s in SETTINGS if s.name == "KIT_BROKER_URL")
    type_setting = next(s for s in SETTINGS if s.name == "KIT_QUEUE_TYPE")
    node_hosts = list(CLUSTER_NODES.values())
    with_url = set()
    for name, service in kit_services(cluster_config).items():
        env = service.get("environment", {})
        assert env.get("KIT_QUEUE_TYPE") == "quorum", f"{name}: KIT_QUEUE_TYPE is not quorum"
        parse(type_setting, env["KIT_QUEUE_TYPE"])
        single_env = services(config)[name].get("environment", {})
        if "KIT_BROKER_URL" not in single_env:
            assert "KIT_BROKER_URL" not in env, name
            continue
        with_url.add(name)
        url = env["KIT_BROKER_URL"]
        parse(url_setting, url)  # the kit's own rule accepts it: same scheme, user and vhost on every node
        nodes = node_url_parts(url)
        assert [host for _, _, host, _, _ in nodes] == node_hosts, f"{name}: {url}"
        (scheme, user, _, port, vhost), = node_url_parts(single_env["KIT_BROKER_URL"])
        assert {(s, u, p, v) for s, u, _, p, v in nodes} == {(scheme, user, port, vhost)}, (
            f"{name}: the nodes keep the single node's scheme, user, port and vhost")
        assert env["KIT_BROKER_PASSWORD_FILE"] == single_env["KIT_BROKER_PASSWORD_FILE"], name
        for node_service in CLUSTER_NODES:
            assert service["depends_on"][node_service] == {"condition": "service_healthy"}, (name, node_service)
    assert with_url == {n for n, s in services(config).items() if "KIT_BROKER_URL" in s.get("environment", {})}
    assert {"worker-urgent", "worker-default-bulk", "beat", "celery-exporter", "flower", "demo"} <= with_url
    # Every node host is reachable by that name inside the compose network.
    for node_service, host in CLUSTER_NODES.items():
        assert host in host_names(node_service, services(cluster_config)[node_service]), host
    # Nothing else is reached at the single node's name.
    for name, service in services(cluster_config).items():
        assert "@rabbitmq:" not in json.dumps(service.get("environment", {})), name


def test_cluster_nodes_name_each_other_and_share_the_single_nodes_settings(
        config: dict[str, Any], cluster_config: dict[str, Any]) -> None:
    cluster_conf = rabbitmq_conf(REPO / "deploy/rabbitmq/cluster.conf")
    shared = rabbitmq_conf(REPO / "deploy/rabbitmq/rabbitmq.conf")
    assert not set(cluster_conf) & set(shared), "cluster.conf repeats a setting of rabbitmq.conf"
    assert cluster_conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in cluster_conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{host}" for host in CLUSTER_NODES.values()}
    assert int(cluster_conf["quorum_queue.continuous_membership_reconciliation.target_group_size"]) == len(listed)
    assert cluster_conf["quorum_queue.continuous_membership_reconciliation.enabled"] == "true"
    assert cluster_conf["cluster_partition_handling"] == "pause_minority"
    single = services(config)["rabbitmq"]
    definitions_dir = str(Path(shared["load_definitions"]).parent)
    data_volumes = set()
    published = []
    for name, host in CLUSTER_NODES.items():
        node = services(cluster_config)[name]
        assert node["image"] == single["image"], f"{name}: not the single node's image"
        assert node["hostname"] == host, f"{name}: its node name must be rabbit@{host}"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
        conf_d = sorted(target for target in mounts if target.startswith("/etc/rabbitmq/conf.d/"))
        assert [Path(mounts[target]) for target in conf_d] == [
            REPO / "deploy/rabbitmq/rabbitmq.conf", REPO / "deploy/rabbitmq/cluster.conf"], (
            f"{name}: the shared settings, then the cluster's (conf.d is read in name order)")
        assert mounts["/etc/rabbitmq/enabled_plugins"] == str(REPO / "deploy/rabbitmq/enabled_plugins")
        assert mounts[definitions_dir] == "rabbitmq-definitions", f"{name}: loads the one definitions file"
        assert node["depends_on"]["broker-definitions"] == {"condition": "service_completed_successfully"}
        data_volumes.add(mounts["/var/lib/rabbitmq"])
        # The shared Erlang cookie, installed as Erlang demands, then the image's own entrypoint.
        assert {"source": "rabbitmq_erlang_cookie"} in node["secrets"], name
        script = node["entrypoint"][-1]
        assert "install -m 0400 -o rabbitmq" in script and "/run/secrets/rabbitmq_erlang_cookie" in script, name
        assert "/var/lib/rabbitmq/.erlang.cookie" in script and script.endswith(
            "exec docker-entrypoint.sh rabbitmq-server"), name
        assert node["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"], name
        assert node["restart"] == "unless-stopped", name
        assert size(shared["total_memory_available_override_value"]) == size(node["mem_limit"]), name
        published += [str(p["published"]) if isinstance(p, dict) else p.split(":")[-2] for p in node["ports"]]
    assert len(data_volumes) == len(CLUSTER_NODES), "each node has its own data volume"
    assert "rabbitmq-data" not in data_volumes, "the single node's data (another node name) is left alone"
    assert len(published) == len(set(published)), f"two nodes publish the same port: {published}"
    # The nodes start together (peer discovery's lock picks the seed): a node waiting for another's
    # health could lock out a restart, where each node waits for the peers it last saw.
    for name in CLUSTER_NODES:
        assert not set(services(cluster_config)[name]["depends_on"]) & set(CLUSTER_NODES), name


def test_cluster_definitions_are_written_by_one_service_and_read_by_every_node(cluster_config: dict[str, Any]) -> None:
    definitions = services(cluster_config)["broker-definitions"]
    assert definitions["restart"] == "no"
    writers = [n for n, s in services(cluster_config).items()
               if any(v.startswith("rabbitmq-definitions:") and not v.endswith(":ro") for v in s.get("volumes", []))]
    assert writers == ["broker-definitions"], "one service writes the definitions, every node only reads them"


def test_cluster_definitions_hold_the_quorum_topology(cluster_config: dict[str, Any], tmp_path: Path) -> None:
    """broker-definitions' command with its merged environment writes quorum queues, lanes included."""
    definitions = services(cluster_config)["broker-definitions"]
    argv = command(definitions)
    secrets_dir, out = tmp_path / "secrets", tmp_path / "definitions.json"
    assert_ok(run("bash", REPO / "scripts/make-secrets.sh", secrets_dir))
    local_argv = [str(REPO / ".venv/bin/python"), *argv[1:]]
    local_argv[local_argv.index("--secrets-dir") + 1] = str(secrets_dir)
    local_argv[local_argv.index("--out") + 1] = str(out)
    env = {"PATH": os.environ["PATH"], **{k: v for k, v in definitions["environment"].items() if v is not None}}
    result = subprocess.run(local_argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert_ok(result)
    declared = {q["name"]: q["arguments"] for q in json.loads(out.read_text())["queues"]}
    expected = queues.topology("quorum").all_queues
    assert set(declared) == {q.name for q in expected}
    for queue in expected:
        assert declared[queue.name] == dict(queue.arguments), queue.name


def test_cluster_exporter_watches_the_quorum_queues(config: dict[str, Any], cluster_config: dict[str, Any]) -> None:
    quorum = queues.topology("quorum")
    argv = command(services(cluster_config)["celery-exporter"])
    expected = [q.name for q in quorum.work_queues + quorum.lanes + quorum.dead_letter_queues]
    assert flag(argv, "--queues").split(",") == expected
    single = command(services(config)["celery-exporter"])
    assert len(argv) == len(single)
    for ours, theirs in zip(argv, single, strict=True):
        assert ours == theirs or theirs == flag(single, "--queues"), "only the queue list differs"


def test_cluster_prometheus_scrapes_every_node(cluster_config: dict[str, Any], tmp_path: Path) -> None:
    prometheus = services(cluster_config)["prometheus"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in prometheus["volumes"] if v.startswith("/")}
    targets = REPO / "deploy/compose/prometheus-targets-cluster/rabbitmq.json"
    assert mounts["/etc/prometheus/targets"] == REPO / "deploy/compose/prometheus-targets"
    assert mounts["/etc/prometheus/targets/rabbitmq.json"] == targets, "the cluster's nodes over the single node's"
    shared = rabbitmq_conf(REPO / "deploy/rabbitmq/rabbitmq.conf")
    expected = [f"{host}:{shared['prometheus.tcp.port']}" for host in CLUSTER_NODES.values()]
    single_groups = json.loads((REPO / "deploy/compose/prometheus-targets/rabbitmq.json").read_text())
    cluster_groups = json.loads(targets.read_text())
    assert [g["labels"] for g in cluster_groups] == [g["labels"] for g in single_groups], (
        "the same endpoints (per-object, aggregated) and vhost as on the single node")
    for group in cluster_groups:
        assert group["targets"] == expected, "every endpoint of every node"
    hosts = set().union(*(host_names(n, s) for n, s in services(cluster_config).items()))
    for target in expected:
        assert target.rsplit(":", 1)[0] in hosts, f"{target} is no host of the compose network"
    # /etc/prometheus as the merged compose file assembles it, checked by promtool.
    etc = _compose_prometheus_dir(tmp_path)
    shutil.copy(targets, etc / "targets" / "rabbitmq.json")
    assert_ok(run("promtool", "check", "config", "prometheus.yml", cwd=etc))


def test_make_secrets_creates_every_cluster_secret(cluster_config: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "secrets"
    assert_ok(run("bash", REPO / "scripts/make-secrets.sh", target))
    for name, secret in cluster_config["secrets"].items():
        assert Path(secret["file"]).parent == REPO / "secrets", f"{name}: secrets live in ./secrets/"
        assert (target / name).is_file(), f"make-secrets.sh did not create {name}"
    cookie = (target / "rabbitmq_erlang_cookie").read_text()
    assert re.fullmatch(r"[0-9a-f]{32,255}", cookie), "an Erlang cookie: one line of plain characters"
    assert cookie not in {(target / n).read_text() for n in cluster_config["secrets"] if n != "rabbitmq_erlang_cookie"}


def test_exporter_launcher_puts_the_password_into_every_node_url(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("celery_exporter", REPO / "scripts/celery_exporter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    secret = tmp_path / "password"
    secret.write_text("p@ss/w:rd\n")
    nodes = ";".join(f"pyamqp://kit-monitor@rabbitmq-{n}:5672/kit" for n in (1, 2, 3))
    url = module.broker_url({"KIT_BROKER_URL": nodes, "KIT_BROKER_PASSWORD_FILE": str(secret)})
    assert url.split(";") == [f"pyamqp://kit-monitor:p%40ss%2Fw%3Ard@rabbitmq-{n}:5672/kit" for n in (1, 2, 3)]
    assert module.redact(url) == ";".join(f"pyamqp://kit-monitor:***@rabbitmq-{n}:5672/kit" for n in (1, 2, 3))
    with pytest.raises(SystemExit):
        module.broker_url({"KIT_BROKER_URL": nodes + ";http://rabbitmq-4/kit"})


def test_exporter_launcher_start_up_check_takes_the_first_node_that_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster node that is down does not stop the exporter: the check goes on to the next node."""
    import amqp

    spec = importlib.util.spec_from_file_location("celery_exporter", REPO / "scripts/celery_exporter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tried: list[str] = []

    class Channel:
        def exchange_declare(self, *args: Any, **kwargs: Any) -> None: ...
        def queue_declare(self, *args: Any, **kwargs: Any) -> None: ...
        def queue_bind(self, *args: Any, **kwargs: Any) -> None: ...

    class Connection:
        def __init__(self, host: str, **kwargs: Any) -> None:
            self.host = host
            assert kwargs["userid"] == "kit-monitor" and kwargs["password"] == "pw" and kwargs["virtual_host"] == "kit"

        def connect(self) -> None:
            tried.append(self.host)
            if self.host == "rabbitmq-1:5672":
                raise ConnectionRefusedError("rabbitmq-1 is down")

        def channel(self) -> Channel:
            return Channel()

        def close(self) -> None: ...
        def collect(self) -> None: ...

    monkeypatch.setattr(amqp, "Connection", Connection)
    url = ";".join(f"pyamqp://kit-monitor:pw@rabbitmq-{n}:5672/kit" for n in (1, 2, 3))
    module.check_broker(url, [], {"KIT_CONNECT_TIMEOUT": "5"})
    assert tried == ["rabbitmq-1:5672", "rabbitmq-2:5672"]


def test_the_alert_relay_is_where_alertmanager_posts_with_its_secrets(config: dict[str, Any], tmp_path: Path) -> None:
    relay = services(config)["alert-relay"]
    assert command(relay) == ["python", "-m", "service", "alert-relay", "--host", "0.0.0.0", "--port", "8060"]
    bots = {s["source"] for s in relay["secrets"]} - {"alertmanager_webhook_token"}
    assert bots == {"relay_wecom_ops", "relay_dingtalk_oncall", "relay_feishu_team"}
    assert "alertmanager_webhook_token" in {s["source"] for s in relay["secrets"]}
    committed = (REPO / "deploy/alertmanager/alertmanager.yml").read_text()
    assert "url: 'http://alert-relay:8060/alertmanager'" in committed, "Alertmanager posts to this service"
    assert relay["expose"] == ["8060"] and "ports" not in relay, "the compose network only"
    # The bots' files are made empty (the relay skips them), the token random (both ends read it).
    target = tmp_path / "secrets"
    assert_ok(run("bash", REPO / "scripts/make-secrets.sh", target))
    assert all((target / name).read_text() == "" for name in bots)
    assert len((target / "alertmanager_webhook_token").read_text().strip()) >= 32
    # The local stack: its Alertmanager posts to its own relay, moved with the port offset.
    moved = local.Stack(tmp_path / "state", local.Options(port_offset=1000))
    from service.stack.files import prepare_files

    prepare_files(moved)
    rendered = Path(flag(list(moved.component("alertmanager").argv), "--config.file")).read_text()
    assert "url: 'http://127.0.0.1:9060/alertmanager'" in rendered
    component = moved.component("alert-relay")
    assert component.env["KIT_ALERT_RELAY_TOKEN_FILE"] == str(moved.secrets_dir / "alertmanager_webhook_token")
    assert component.probe is not None and component.probe.url == "http://127.0.0.1:9060/healthz"
