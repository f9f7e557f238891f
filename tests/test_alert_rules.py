"""The Prometheus side: config, alert rules and their promtool unit tests, runbooks,
the dead-letter alerts' console links, and the time-scale override that drills use
(service/monitoring/timescale.py).

Needs promtool and prometheus (Debian package ``prometheus``); no broker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from service import queues
from service.monitoring import timescale
from service.stack.cluster import ClusterLayout
from tests.helpers import spawn, wait_until
from tests.observability import free_port, http_json

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "deploy" / "prometheus"
CONFIG = PROM / "prometheus.yml"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
RUNBOOKS = REPO / "docs" / "runbooks"

ALERT_RE = re.compile(r"^\s*-\s+alert:\s*(\S+)\s*$", re.M)


def promtool(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is not installed (Debian: apt-get install prometheus)"
    return subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def kebab(name: str) -> str:
    """CeleryQueueNoConsumers -> celery-queue-no-consumers."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()


def alert_names() -> list[str]:
    names: list[str] = []
    for path in RULE_FILES:
        for name in ALERT_RE.findall(path.read_text()):
            if name not in names:
                names.append(name)
    return names


# --------------------------------------------------------------------------- promtool


def test_files_are_there() -> None:
    assert CONFIG.is_file()
    assert RULE_FILES, "no rule files in deploy/prometheus/rules"
    assert TEST_FILES, "no promtool tests in deploy/prometheus/tests"


def test_promtool_check_config() -> None:
    result = promtool("check", "config", CONFIG.relative_to(REPO))
    assert_ok(result)
    assert f"{len(RULE_FILES)} rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    assert_ok(promtool("check", "rules", *(p.relative_to(REPO) for p in RULE_FILES)))


def test_promtool_test_rules() -> None:
    assert_ok(promtool("test", "rules", *(p.relative_to(REPO) for p in TEST_FILES)))


def test_target_files_are_valid_file_sd() -> None:
    jobs = {"rabbitmq", "celery-exporter", "kit-workers", "kit-web", "kit-console", "alertmanager"}
    for job in jobs:
        groups = json.loads((PROM / "targets" / f"{job}.json").read_text())
        assert groups and all(g["targets"] for g in groups), job
    config = CONFIG.read_text()
    for job in jobs - {"alertmanager"}:
        assert re.search(rf"^\s*- job_name: {re.escape(job)}$", config, re.M), job


def test_cluster_target_file_lists_every_node_with_the_single_nodes_labels(tmp_path: Path) -> None:
    """targets-cluster/rabbitmq.json: the local 3-node cluster, each endpoint of each node, as targets/rabbitmq.json."""
    single = json.loads((PROM / "targets" / "rabbitmq.json").read_text())
    cluster = json.loads((PROM / "targets-cluster" / "rabbitmq.json").read_text())
    assert [g["labels"] for g in cluster] == [g["labels"] for g in single], "same endpoints, same vhost"
    nodes = [f"127.0.0.1:{node.prometheus_port}" for node in ClusterLayout().nodes(tmp_path)]
    assert len(nodes) == 3
    for group in cluster:
        assert group["targets"] == nodes
    # Dropped in over targets/rabbitmq.json, the configuration still checks.
    etc = tmp_path / "etc"
    shutil.copytree(PROM, etc, ignore=shutil.ignore_patterns("tests"))
    shutil.copy(PROM / "targets-cluster" / "rabbitmq.json", etc / "targets" / "rabbitmq.json")
    assert_ok(promtool("check", "config", "prometheus.yml", cwd=etc))


# --------------------------------------------------------------------------- rules, tests, runbooks


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a promtool case where it fires and one where it must stay quiet."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        cases = re.split(r"^\s*- eval_time:", path.read_text(), flags=re.M)[1:]
        for case in cases:
            m = re.search(r"^\s*alertname:\s*(\S+)\s*$", case, re.M)
            assert m, f"{path.name}: an alert_rule_test without alertname"
            (firing if re.search(r"^\s*exp_alerts:\s*$", case, re.M) else quiet).add(m.group(1))
    names = set(alert_names())
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - names == set(), "tests name alerts that do not exist"


def test_every_alert_has_severity_and_annotations() -> None:
    for path in RULE_FILES:
        text = path.read_text()
        anchors = dict(re.findall(r"annotations: &(\w+)\n((?:\s{10}.*\n)+)", text))
        for block in re.split(r"^\s*- alert:", text, flags=re.M)[1:]:
            name = block.split()[0]
            assert re.search(r"^\s+severity: (critical|warning|info)\s*$", block, re.M), name
            alias = re.search(r"annotations: \*(\w+)", block)
            annotations = anchors[alias.group(1)] if alias else block
            for key in ("summary", "description", "runbook_url"):
                assert re.search(rf"^\s+{key}:", annotations, re.M), f"{name}: no {key}"
            url = re.search(r"runbook_url: \"(.*)\"", annotations).group(1)
            assert url == f"{{{{ $externalLabels.runbook_base_url }}}}/docs/runbooks/{kebab(name)}.md", name


def test_every_alert_has_a_runbook_and_every_runbook_is_linked() -> None:
    pages = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    expected = {f"{kebab(name)}.md" for name in alert_names()}
    assert expected - pages == set(), "alerts without a runbook"
    assert pages - expected == set(), "runbooks of no alert"
    index = (RUNBOOKS / "README.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    assert pages - linked == set(), "runbooks not linked from docs/runbooks/README.md"
    for name in alert_names():
        page = (RUNBOOKS / f"{kebab(name)}.md").read_text()
        assert page.startswith(f"# {name}\n"), f"{kebab(name)}.md should start with '# {name}'"
        assert f"| {name} |" in index, f"{name} missing from the index table"


def test_rules_name_exactly_the_work_queues() -> None:
    """Every work-queue selector lists service/queues.py's work queues, and per-queue rules cover each."""
    text = "".join(p.read_text() for p in RULE_FILES)
    work = set(queues.WORK_QUEUE_NAMES)
    selectors = re.findall(r'queue=~"([^"]+)"', text)
    assert selectors
    for selector in selectors:
        assert set(selector.split("|")) == work, selector
    for alert in ("CeleryQueueBacklogHigh", "CeleryQueueWaitTimeHigh"):
        blocks = [b for b in re.split(r"^\s*- alert:", text, flags=re.M) if b.split()[0] == alert]
        covered = {q for b in blocks for q in re.findall(r'\{queue="([^"]+)"\}', b)}
        assert covered == work, alert


RECORD_RE = re.compile(r"^\s*-\s+record:\s*(\S+)\s*$", re.M)


def test_recording_rules_come_before_the_alerts_and_are_used() -> None:
    """A recorded series is defined before the first alert of its file (same group: evaluated first), and read."""
    text = "".join(p.read_text() for p in RULE_FILES)
    dashboards = "".join(p.read_text() for p in (REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
    for path in RULE_FILES:
        body = path.read_text()
        first_alert = body.find("- alert:")
        for m in RECORD_RE.finditer(body):
            assert first_alert == -1 or m.start() < first_alert, f"{path.name}: {m.group(1)} after an alert"
            name = m.group(1)
            assert text.count(name) > 1 or name in dashboards, f"{name} is recorded but never read"


def test_cluster_alerts_stay_in_the_cluster_file() -> None:
    """The node, quorum queue and partition alerts live in rules/cluster.yml; BrokerDown stays in rabbitmq.yml."""
    cluster = set(ALERT_RE.findall((PROM / "rules" / "cluster.yml").read_text()))
    assert cluster == {"BrokerNodeDown", "QuorumQueueUnavailable", "QuorumQueueUnderReplicated",
                       "BrokerNetworkPartition"}
    assert "BrokerDown" in ALERT_RE.findall((PROM / "rules" / "rabbitmq.yml").read_text())
    # One node of several down must not mute the worker and queue alerts as BrokerDown does: no
    # cluster alert matches an inhibition's source (Alertmanager matches names by suffix).
    routes = yaml.safe_load((REPO / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    sources = [re.fullmatch(r'alertname=~"(.*)"', m) for rule in routes["inhibit_rules"]
               for m in rule["source_matchers"]]
    patterns = [re.compile(s.group(1)) for s in sources if s]
    assert any(p.fullmatch("BrokerDown") for p in patterns)
    assert [(n, p.pattern) for n in sorted(cluster) for p in patterns if p.fullmatch(n)] == []


# --------------------------------------------------------------------------- the dead-letter console's links

#: Alerts on dead letters -> the console filters their annotation sets (service/console/: /letters).
CONSOLE_LINKS = {
    "DeadLetterQueueGrowing": "/letters?queue={{ $labels.dead_letter_queue | urlquery }}",
    "CeleryTasksUnroutable": "/letters?queue={{ $labels.queue | urlquery }}",
    "CeleryTasksDeadLettered": "/letters?queue={{ $labels.queue | urlquery }}&reason={{ $labels.reason | urlquery }}",
}
CONSOLE_BASE = "{{ $externalLabels.console_url }}"


def _alert_rules() -> dict[str, dict]:
    return {rule["alert"]: rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule}


def test_dead_letter_alerts_link_the_console_on_their_queue_and_reason() -> None:
    rules = _alert_rules()
    with_link = {name for name, rule in rules.items() if "console" in rule.get("annotations", {})}
    assert with_link == set(CONSOLE_LINKS), "exactly the dead-letter alerts link the console"
    for name, path in CONSOLE_LINKS.items():
        rule = rules[name]
        assert rule["annotations"]["console"] == CONSOLE_BASE + path, name
        assert re.search(r"\.dead|kit_dead_letters_total", rule["expr"]), f"{name} is no dead-letter alert"
        # The labels it filters on are the alert's own: its expression names or makes them.
        for label in re.findall(r"\$labels\.(\w+)", path):
            assert label in rule["expr"], f"{name}: {label} is not a label of its expression"
    # The base is the console_url external label, read from KIT_CONSOLE_URL (expand-external-labels).
    external = yaml.safe_load(CONFIG.read_text())["global"]["external_labels"]
    assert external["console_url"] == "${KIT_CONSOLE_URL}"


def test_prometheus_scrapes_the_console() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kit-console"]
    assert job["file_sd_configs"] == [{"files": ["targets/kit-console.json"]}]
    assert "metrics_path" not in job, "the console serves /metrics, Prometheus' default"
    web = next(j for j in config["scrape_configs"] if j["job_name"] == "kit-web")
    assert set(job) == set(web), "scraped like kit-web"
    assert json.loads((PROM / "targets" / "kit-console.json").read_text()) == [{"targets": ["127.0.0.1:5580"]}]


class _Exporter:
    """A loopback /metrics endpoint whose dead-letter counter and dead-letter queue grow on every scrape."""

    def __init__(self) -> None:
        scrapes = [0]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                scrapes[0] += 1
                n = scrapes[0]
                body = (f'kit_dead_letters_total{{queue="default",task="t",reason="retries-exhausted"}} {n}\n'
                        f'rabbitmq_queue_messages_ready{{vhost="kit",queue="urgent.dead"}} {n}\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_a_real_prometheus_fills_in_the_console_url_from_kit_console_url(tmp_path: Path) -> None:
    """prometheus.yml as compose runs it (--enable-feature=expand-external-labels, KIT_CONSOLE_URL set):
    the firing dead-letter alerts carry the whole console link."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["prometheus"]
    flags = [f for f in compose["command"] if f.startswith("--enable-feature=")]
    assert flags == ["--enable-feature=expand-external-labels"]
    exporter = _Exporter()
    console = "https://dlq.example.com:8443"
    process = None
    try:
        # Only loopback targets of this test: nothing of a stack running on this machine is scraped or alerted.
        config = timescale.write_drill_config(CONFIG, tmp_path / "prometheus", factor=0.02, targets={
            "targets/rabbitmq.json": [{"targets": [exporter.address], "labels": {"kit_vhost": "kit"}}],
            "targets/kit-workers.json": [{"targets": [exporter.address]}],
            **{f"targets/{name}.json": [] for name in ("celery-exporter", "kit-web", "kit-console", "alertmanager")},
        })
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KIT_")}
        env["KIT_CONSOLE_URL"] = console
        with (tmp_path / "prometheus.log").open("wb") as log:
            process = spawn([shutil.which("prometheus") or "prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def firing() -> dict[str, dict]:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                alerts = http_json(f"{url}/api/v1/alerts")["data"]["alerts"]
            except OSError:
                return {}
            return {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}

        wait_until(lambda: {"CeleryTasksDeadLettered", "DeadLetterQueueGrowing"} <= set(firing()), 60,
                   "the dead-letter alerts to fire", interval=0.5)
        alerts = firing()
        assert alerts["CeleryTasksDeadLettered"]["annotations"]["console"] == (
            f"{console}/letters?queue=default&reason=retries-exhausted")
        assert alerts["DeadLetterQueueGrowing"]["annotations"]["console"] == f"{console}/letters?queue=urgent.dead"
        assert http_json(f"{url}/api/v1/status/config")["data"]["yaml"].count(f"console_url: {console}") == 1
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        exporter.close()


# --------------------------------------------------------------------------- timescale


@pytest.mark.parametrize(
    ("duration", "factor", "expected"),
    [
        ("5m", 0.02, "6s"),
        ("10m", 0.02, "12s"),
        ("1h", 0.02, "1m12s"),
        ("1m", 0.02, "1s200ms"),
        ("30s", 0.02, "1s"),  # 600ms, floored
        ("1h30m", 1, "1h30m"),
        ("90s", 1, "1m30s"),
        ("2d", 0.5, "1d"),
        ("0s", 0.02, "0s"),
    ],
)
def test_scale_duration(duration: str, factor: float, expected: str) -> None:
    assert timescale.scale_duration(duration, factor) == expected


def test_scale_duration_floor_and_errors() -> None:
    assert timescale.scale_duration("10s", 0.01, floor="500ms") == "500ms"
    assert timescale.scale_duration("10s", 0.01, floor="2s") == "2s"
    with pytest.raises(ValueError):
        timescale.scale_duration("5 minutes", 0.1)
    with pytest.raises(ValueError):
        timescale.scale_duration("5m", 0)


def test_parse_and_format_duration_round_trip() -> None:
    for text in ("1ms", "1s", "1m30s", "2h", "1d12h", "1w", "1y", "1h1m1s1ms"):
        assert timescale.format_duration(timescale.parse_duration(text)) == text


RULE = """\
groups:
  - name: g
    rules:
      # for: 5m in a comment stays
      - alert: A
        expr: |
          sum(rate(x{q=~"[5m]", l='[1h]', r=`[2m]`}[5m])) / 10 > 0.10   # [10m] comment
          and max_over_time(y[1h:1m]) offset 10m >= 3
        for: 5m
        labels:
          severity: warning
        annotations:
          description: |
            over [10m]
            for: 5m
      - alert: B
        expr: increase(z[10m]) > 100
        for: "10m"  # quoted
      - record: r
        expr: avg_over_time(y[30s])
"""


def test_scale_rules_changes_only_durations() -> None:
    scaled = timescale.scale_rules(RULE, 0.02)
    assert scaled == (
        RULE.replace('`[2m]`}[5m]))', '`[2m]`}[6s]))')
        .replace("y[1h:1m]) offset 10m", "y[1m12s:1s200ms]) offset 12s")
        .replace(">= 3\n        for: 5m\n", ">= 3\n        for: 6s\n")
        .replace("z[10m]", "z[12s]")
        .replace('for: "10m"', 'for: "12s"')
        .replace("y[30s]", "y[1s]")
    )


def test_scale_rules_keeps_thresholds_and_everything_else() -> None:
    """On the real rule files: only for: lines and expr lines change, and those only in their durations."""
    duration = re.compile(r"(?:[0-9]+(?:ms|[smhdwy]))+")
    for path in RULE_FILES:
        original = path.read_text()
        scaled = timescale.scale_rules(original, 0.02)
        assert scaled.count("\n") == original.count("\n")
        in_expr = False
        changed = 0
        for before, after in zip(original.splitlines(), scaled.splitlines(), strict=True):
            key = re.match(r"^\s*(?:-\s+)?(\w+):", before)
            if key:
                in_expr = key.group(1) == "expr"
            if before == after:
                continue
            changed += 1
            assert in_expr or re.match(r"^\s*for: ", before), f"{path.name}: {before!r} changed"
            assert duration.sub("D", before) == duration.sub("D", after), f"{path.name}: {before!r} -> {after!r}"
            numbers = re.compile(r"(?<![\w\[:])[0-9]+(?:\.[0-9]+)?(?![\w\]:])")
            assert numbers.findall(before) == numbers.findall(after), f"thresholds changed: {before!r}"
        assert changed, f"{path.name}: nothing scaled"


def test_scale_rules_refuses_quoted_expr() -> None:
    with pytest.raises(ValueError, match="quoted"):
        timescale.scale_rules('groups:\n- name: g\n  rules:\n  - alert: A\n    expr: "up[5m] > 0"\n', 0.1)


def test_scaled_rules_pass_promtool(tmp_path: Path) -> None:
    for path in RULE_FILES:
        (tmp_path / path.name).write_text(timescale.scale_rules(path.read_text(), 0.02))
    assert_ok(promtool("check", "rules", *sorted(tmp_path.glob("*.yml"))))


def test_write_drill_config(tmp_path: Path) -> None:
    out = tmp_path / "drill"
    kit_targets = [{"targets": ["127.0.0.1:41234"]}]
    config = timescale.write_drill_config(
        CONFIG, out, factor=0.02, scrape_interval="1s", evaluation_interval="2s",
        targets={"targets/kit-workers.json": kit_targets},
    )
    assert config == out / "prometheus.yml"
    text = config.read_text()
    assert re.search(r"^  scrape_interval: 1s$", text, re.M)
    assert re.search(r"^  evaluation_interval: 2s$", text, re.M)
    assert "15s" not in text
    # Everything else is the production file.
    original = CONFIG.read_text()
    assert [line for line in text.splitlines() if "_interval" not in line] == [
        line for line in original.splitlines() if "_interval" not in line
    ]
    for path in RULE_FILES:
        assert (out / "rules" / path.name).read_text() == timescale.scale_rules(path.read_text(), 0.02)
    assert json.loads((out / "targets" / "kit-workers.json").read_text()) == kit_targets
    assert (out / "targets" / "rabbitmq.json").read_text() == (PROM / "targets" / "rabbitmq.json").read_text()
    result = promtool("check", "config", config, cwd=tmp_path)
    assert_ok(result)
    assert f"{len(RULE_FILES)} rule files found" in result.stdout + result.stderr
