"""End to end: a drill's alert from a real Prometheus through a real Alertmanager and the relay to fake bots.

Real processes: Debian's Prometheus running the production rules (durations
scaled by ``service.monitoring.timescale``), Debian's Alertmanager running the
committed routes (``service.monitoring.alertmanager_config``: loopback receivers,
1 s group_wait/group_interval), and ``python -m service alert-relay`` with the
committed deploy/alertmanager/relay.yml. The bots are loopback fakes
(tests/chatbots.py) that check the key, the signature and the format as their
platforms do. The drill: celery-exporter's target does not answer, so
CeleryExporterDown fires; then a stand-in exporter answers and it resolves.
Each step prints the time from Prometheus firing (or resolving) to the message
at each bot.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from service.monitoring import alertmanager_config, timescale
from tests.chatbots import FakeBot, FakeWecomApp
from tests.helpers import REPO, wait_until
from tests.observability import Process, Prometheus, WebhookReceiver, free_port, http_json

#: Rule durations times this (for: 5m -> 3s); nothing shorter than FLOOR.
FACTOR = 0.01
FLOOR = "2s"
#: The relay's deadline per notification: under Alertmanager's 10 s window (group_interval 1s, at least 10 s).
RELAY_DEADLINE = "4"
ZONE = "Asia/Shanghai"
GRAFANA = "https://grafana.example/d/kit-celery-overview"
RUNBOOK_BASE = "https://git.example.com/celery-rabbitmq-kit/-/blob/main"  # prometheus.yml's runbook_base_url
#: The bots of the committed relay.yml and their secret files.
BOTS = {"wecom": ("ops-wecom", "relay_wecom_ops"), "dingtalk": ("oncall-dingtalk", "relay_dingtalk_oncall"),
        "feishu": ("team-feishu", "relay_feishu_team")}
DELIVERY_TIMEOUT = 30.0


class _Exporter:
    """A stand-in celery-exporter on a fixed port: started, its target is up and CeleryExporterDown resolves."""

    def __init__(self, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = b"celery_workers 0\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Drill:
    """Prometheus, Alertmanager, the relay and the three fake bots of one module."""

    def __init__(self, workdir: Path) -> None:
        self.closers: list[Any] = []
        self.bots = {
            "wecom": FakeBot("wecom", uuid.uuid4().hex),
            "dingtalk": FakeBot("dingtalk", uuid.uuid4().hex, "SEC" + uuid.uuid4().hex + uuid.uuid4().hex),
            "feishu": FakeBot("feishu", uuid.uuid4().hex, uuid.uuid4().hex[:22]),
        }
        self.closers += self.bots.values()
        self.wecom_app = FakeWecomApp("ww" + uuid.uuid4().hex[:16], uuid.uuid4().hex)  # WeCom app messages
        self.closers.append(self.wecom_app)
        self.sink = WebhookReceiver()  # Slack and PagerDuty (not under test here)
        self.closers.append(self.sink)
        secrets = workdir / "secrets"
        secrets.mkdir(mode=0o700)
        self.token = f"relay-{uuid.uuid4().hex}"
        for name, value in {"alertmanager_slack_api_url": f"{self.sink.url}/slack",
                            "alertmanager_pagerduty_routing_key": "drill", "alertmanager_smtp_password": "drill",
                            "alertmanager_webhook_token": self.token}.items():
            (secrets / name).write_text(value + "\n")
        (workdir / "wecom_app_secret").write_text(self.wecom_app.secret + "\n")
        for kind, (_, secret_file) in BOTS.items():
            (secrets / secret_file).write_text(self.bots[kind].secret_file_text())

        self.relay_port = free_port()
        self.relay_url = f"http://127.0.0.1:{self.relay_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KIT_", "SENTRY_"))}
        env.update({
            "PYTHONPATH": str(REPO), "KIT_ALERT_RELAY_CONFIG": str(REPO / "deploy/alertmanager/relay.yml"),
            "KIT_ALERT_RELAY_SECRETS_DIR": str(secrets),
            "KIT_ALERT_RELAY_TOKEN_FILE": str(secrets / "alertmanager_webhook_token"),
            "KIT_ALERT_TIMEZONE": ZONE, "KIT_ALERT_GRAFANA_URL": GRAFANA,
            "KIT_ALERT_RELAY_DEADLINE": RELAY_DEADLINE, "KIT_ALERT_RELAY_TIMEOUT": "1",
            "KIT_STATE_DIR": str(workdir / "state"),
        })
        self.relay = Process("alert-relay", [sys.executable, "-m", "service", "alert-relay", "--host", "127.0.0.1",
                                             "--port", str(self.relay_port)], workdir, env)
        self.closers.append(self.relay)

        self.am_port = free_port()
        self.am_url = f"http://127.0.0.1:{self.am_port}"
        am_config = alertmanager_config.write(
            workdir / "alertmanager.yml", secrets_dir=secrets, smtp_smarthost="127.0.0.1:9", smtp_require_tls=False,
            pagerduty_url=f"{self.sink.url}/pagerduty", webhook_url=f"{self.relay_url}/alertmanager",
            group_wait="1s", group_interval="1s",
            wecom_app=alertmanager_config.WecomApp(self.wecom_app.corp_id, "1000002",
                                                   str(workdir / "wecom_app_secret"), to_party="2",
                                                   api_url=self.wecom_app.api_url),
        )
        self.alertmanager = Process("alertmanager", [
            "prometheus-alertmanager", f"--config.file={am_config}", f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.am_port}", f"--web.external-url={self.am_url}",
            "--cluster.listen-address=", "--log.level=debug",
        ], workdir)
        self.closers.append(self.alertmanager)

        self.exporter_port = free_port()
        self.exporter: _Exporter | None = _Exporter(self.exporter_port)  # up until the drill stops it
        prom_config = timescale.write_drill_config(
            REPO / "deploy" / "prometheus" / "prometheus.yml", workdir / "prometheus", factor=FACTOR, floor=FLOOR,
            scrape_interval="1s", evaluation_interval="1s",
            targets={
                "targets/celery-exporter.json": [{"targets": [f"127.0.0.1:{self.exporter_port}"]}],
                "targets/kit-alert-relay.json": [{"targets": [f"127.0.0.1:{self.relay_port}"]}],
                "targets/alertmanager.json": [{"targets": [f"127.0.0.1:{self.am_port}"]}],
                **{f"targets/{n}.json": [] for n in ("rabbitmq", "kit-workers", "kit-web", "kit-console")},
            },
        )
        self.wait_http(f"{self.relay_url}/healthz", self.relay)
        self.wait_http(f"{self.am_url}/-/ready", self.alertmanager)
        self.prometheus = Prometheus(prom_config, workdir)
        self.closers.append(self.prometheus)
        self.prometheus.wait_ready()

    @staticmethod
    def wait_http(url: str, process: Process) -> None:
        def ready() -> bool:
            assert process.alive(), f"{process.name} exited:\n{process.log()}"
            try:
                return urllib.request.urlopen(url, timeout=1).status == 200
            except OSError:
                return False

        wait_until(ready, 30, f"{process.name} at {url}", interval=0.1)

    def prometheus_alert(self, name: str) -> dict[str, Any] | None:
        for alert in http_json(f"{self.prometheus.url}/api/v1/alerts")["data"]["alerts"]:
            if alert["labels"]["alertname"] == name:
                return alert
        return None

    def post_alert(self, name: str, ends: bool = False, **labels: str) -> None:
        now = datetime.now().astimezone()
        alert = {"labels": {"alertname": name, **labels},
                 "annotations": {"summary": f"{name} summary", "description": f"{name} description",
                                 "runbook_url": f"https://runbooks.example/{name}"},
                 "startsAt": now.isoformat()}
        if ends:
            alert["endsAt"] = now.isoformat()
        http_json(f"{self.am_url}/api/v2/alerts", [alert])

    def arrival(self, kind: str, text: str, timeout: float = DELIVERY_TIMEOUT) -> float:
        """Monotonic time of the first message at ``kind``'s bot containing ``text``."""
        bot = self.bots[kind]
        try:
            return wait_until(lambda: next((m.at for m in bot.messages(text)), None), timeout,
                              f"{text!r} at the fake {kind} bot", interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; refused: {bot.refused}; relay log:\n{self.relay.log()[-3000:]}") from None

    @staticmethod
    def arrival_at(messages: Any, text: str, timeout: float = DELIVERY_TIMEOUT) -> float:
        return wait_until(lambda: next((m.at for m in messages(text)), None), timeout, f"{text!r}", interval=0.05)

    def relay_post(self, body: Any, token: str | None) -> int:
        request = urllib.request.Request(f"{self.relay_url}/alertmanager", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"{self.relay_url}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
        for closer in reversed(self.closers):
            try:
                closer.close()
            except Exception:  # noqa: BLE001 - tear everything down regardless
                pass


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    running = Drill(tmp_path_factory.mktemp("relay"))
    try:
        yield running
    finally:
        running.close()


def _utc(stamp: str) -> datetime:
    """Prometheus' RFC 3339 time (nanoseconds, Z), to the second."""
    return datetime.strptime(stamp.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


def _started(text: str) -> datetime:
    """The start time a message shows (in ZONE, as ``started 2026-12-02 02:37:19 CST``)."""
    match = re.search(r"started (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) CST", text)
    assert match, f"no start time in {ZONE} (CST) in:\n{text}"
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZoneInfo(ZONE))


def test_drill_firing_and_resolution_reach_every_bot_in_its_format(drill: Drill) -> None:
    name = "CeleryExporterDown"
    # Before the drill: Prometheus scrapes the stand-in exporter, and nothing about it fires.
    wait_until(lambda: drill.prometheus.targets_up().get("celery-exporter") and drill.prometheus_alert(name) is None,
               30, "the exporter scraped and no CeleryExporterDown", interval=0.1)
    assert drill.exporter is not None
    drill.exporter.close()  # the drill: celery-exporter stops answering
    drill.exporter = None
    stopped = time.monotonic()
    alert = wait_until(lambda: (a := drill.prometheus_alert(name)) and a["state"] == "firing" and a, 30,
                       f"{name} firing in Prometheus", interval=0.02)
    fired = time.monotonic()
    for kind in drill.bots:
        at = drill.arrival(kind, f"**FIRING** {name}")
        print(f"\nDRILL {name} firing in Prometheus -> {kind} bot: {at - fired:.2f}s "
              f"(exporter stopped -> bot: {at - stopped:.2f}s, `for:` 3s included)")
    active = _utc(alert["activeAt"])
    for kind, bot in drill.bots.items():
        message = bot.messages(f"**FIRING** {name}")[0]
        for expected in (f"[FIRING:1] {name}", "severity **warning**", "queue **-**",
                         f"celery-exporter 127.0.0.1:{drill.exporter_port} is down or not scraped",
                         "for 5 minutes: task failure, retry and worker alerts cannot fire",
                         f"[Runbook]({RUNBOOK_BASE}/docs/runbooks/celery-exporter-down.md)", f"[Grafana]({GRAFANA})"):
            assert expected in message.text, f"{kind}: {expected!r} not in:\n{message.text}"
        # Prometheus sends the time it fired (active, then `for:` later) as startsAt.
        assert 0 <= (_started(message.text) - active).total_seconds() <= 10, (active, message.text)
    assert set(drill.bots["wecom"].messages(name)[0].body) == {"msgtype", "markdown"}
    assert drill.bots["dingtalk"].messages(name)[0].body["markdown"]["title"].startswith("[FIRING")
    assert drill.bots["feishu"].messages(name)[0].body["card"]["header"]["template"] == "red"
    assert all(not bot.refused for bot in drill.bots.values()), {k: b.refused for k, b in drill.bots.items()}

    drill.exporter = _Exporter(drill.exporter_port)  # it answers again
    recovered = time.monotonic()
    wait_until(lambda: drill.prometheus_alert(name) is None, 30, f"{name} resolved in Prometheus", interval=0.02)
    for kind in drill.bots:
        elapsed = drill.arrival(kind, f"**RESOLVED** {name}") - recovered
        print(f"DRILL {name} exporter back -> resolved at {kind} bot: {elapsed:.2f}s (a 1 s scrape included)")
    # WeCom application messages: Alertmanager's own wechat_configs, to the app API's test server.
    (app_message,) = drill.wecom_app.messages(f"[FIRING:1] {name}")
    assert app_message.body["msgtype"] == "markdown" and app_message.body["agentid"] == "1000002"
    assert app_message.body["toparty"] == "2"
    assert f"{RUNBOOK_BASE}/docs/runbooks/celery-exporter-down.md" in app_message.text
    print(f"DRILL {name} firing in Prometheus -> WeCom app: {app_message.at - fired:.2f}s")
    drill.arrival_at(drill.wecom_app.messages, f"[RESOLVED] {name}")
    assert not drill.wecom_app.refused
    (message,) = drill.bots["feishu"].messages(f"**RESOLVED** {name}")
    assert message.body["card"]["header"]["template"] == "green" and "resolved 20" in message.text


def test_a_bot_failing_twice_then_succeeding_gets_the_message_once(drill: Drill) -> None:
    name = f"RelayRetry{uuid.uuid4().hex[:8]}"
    wecom = drill.bots["wecom"]
    wecom.fail(2, containing=name)
    errors_before = drill.metric("kit_alert_relay_attempts_total", bot="ops-wecom", result="error")
    posted = time.monotonic()
    drill.post_alert(name, severity="warning", queue="bulk")
    for kind in drill.bots:
        took = drill.arrival(kind, f"**FIRING** {name}") - posted
        print(f"\nRETRY posted to Alertmanager -> {kind} bot: {took:.2f}s{' (2 failures)' if kind == 'wecom' else ''}")
    time.sleep(3)  # three more group_intervals: nothing is sent again
    assert wecom.failed_posts >= 2
    assert {kind: len(bot.messages(name)) for kind, bot in drill.bots.items()} == {"wecom": 1, "dingtalk": 1,
                                                                                   "feishu": 1}
    assert drill.metric("kit_alert_relay_attempts_total", bot="ops-wecom", result="error") - errors_before == 2


def test_a_bot_down_past_the_deadline_gets_it_once_alertmanager_retries_and_the_failure_alerts(drill: Drill) -> None:
    name = f"RelayDown{uuid.uuid4().hex[:8]}"
    dingtalk = drill.bots["dingtalk"]
    dingtalk.fail_for(float(RELAY_DEADLINE) + 2, containing=name)  # the relay gives up once: 503 to Alertmanager
    posted = time.monotonic()
    drill.post_alert(name, severity="critical", queue="urgent")
    for kind in ("wecom", "feishu", "dingtalk"):
        took = drill.arrival(kind, f"**FIRING** {name}") - posted
        print(f"\nDOWN posted to AM -> {kind} bot: {took:.2f}s{' (down past deadline)' * (kind == 'dingtalk')}")
    time.sleep(2)
    # Alertmanager's retries reached the relay again; bots that had it were not sent it twice.
    assert {kind: len(bot.messages(name)) for kind, bot in drill.bots.items()} == {"wecom": 1, "dingtalk": 1,
                                                                                   "feishu": 1}
    assert drill.metric("kit_alert_relay_deliveries_total", bot="oncall-dingtalk", outcome="failed") >= 1
    assert drill.metric("kit_alert_relay_deliveries_total", bot="ops-wecom", outcome="duplicate") >= 1
    assert "not delivered to oncall-dingtalk; Alertmanager will retry" in drill.relay.log()
    # The relay's own failure is an alert of its own, which reaches the chat groups too.
    drill.arrival("wecom", "**FIRING** AlertRelayDeliveriesFailing")
    message = drill.bots["wecom"].messages("**FIRING** AlertRelayDeliveriesFailing")[0]
    assert "could not deliver notifications to the bot oncall-dingtalk" in message.text


def test_a_wrong_or_missing_bearer_token_is_refused(drill: Drill) -> None:
    name = f"RelayToken{uuid.uuid4().hex[:8]}"
    body = {"version": "4", "status": "firing", "groupKey": name, "alerts": [
        {"status": "firing", "labels": {"alertname": name, "severity": "critical"}, "annotations": {},
         "startsAt": "2026-12-01T10:00:00Z", "fingerprint": name}]}
    refused_before = drill.metric("kit_alert_relay_notifications_total", result="unauthorized")
    assert drill.relay_post(body, "wrong-" + drill.token) == 401
    assert drill.relay_post(body, drill.token[:-1]) == 401
    assert drill.relay_post(body, None) == 401
    assert drill.relay_post({"not": "a notification"}, drill.token) == 400
    assert drill.metric("kit_alert_relay_notifications_total", result="unauthorized") - refused_before == 3
    time.sleep(0.5)
    assert all(not bot.messages(name) for bot in drill.bots.values())
    # The right token: delivered (the relay answers only once every bot has it).
    assert drill.relay_post(body, drill.token) == 200
    assert all(len(bot.messages(name)) == 1 for bot in drill.bots.values())
