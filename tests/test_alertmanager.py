"""The Alertmanager configuration, run for real.

A real prometheus-alertmanager (Debian's 0.25) runs the committed
deploy/alertmanager/alertmanager.yml, changed only through the documented
override (service.monitoring.alertmanager_config.render): secret files in a
temporary directory holding loopback URLs and keys, the SMTP relay, the
PagerDuty endpoint and the chat-bot relay on loopback, group_wait and
group_interval of 1s. Slack, PagerDuty and the webhook are stdlib HTTP servers
in threads, e-mail is aiosmtpd requiring the password from the secret file.
Alerts go in through the v2 API; each test asserts what every channel received.

One Alertmanager serves the module. Each test uses its own alert names (a
random prefix, which the routing ignores and the inhibition rules allow) and its
own `cluster` label, so tests never see each other's groups or inhibitions.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import shutil
import socket
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from service.monitoring import alertmanager_config
from tests.helpers import spawn, wait_until

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")
CONFIG = alertmanager_config.PRODUCTION_CONFIG
SMTP_USER = "alertmanager@example.com"  # smtp_auth_username in the committed config

#: How long a notification may take: group_wait 1s plus the pipeline, with room for a slow CI machine.
DELIVERY_TIMEOUT = 20.0

#: The documented routing table (deploy/alertmanager/README.md): labels -> receivers, in routing order.
ROUTING_TABLE = [
    ({"severity": "critical", "queue": "urgent"}, ["chatbot-webhook", "pagerduty", "slack", "email"]),
    ({"severity": "critical", "queue": "bulk"}, ["chatbot-webhook", "pagerduty", "slack", "email"]),
    ({"severity": "critical"}, ["chatbot-webhook", "pagerduty", "slack", "email"]),
    ({"severity": "warning", "queue": "urgent"}, ["chatbot-webhook", "pagerduty", "slack", "email"]),
    ({"severity": "warning", "queue": "default"}, ["chatbot-webhook", "slack", "email"]),
    ({"severity": "warning", "queue": "urgent.dead"}, ["chatbot-webhook", "slack", "email"]),
    # DeadLetterQueueGrowing's own labels for urgent.dead: the work queue, and the queue that grew.
    ({"severity": "warning", "queue": "urgent", "dead_letter_queue": "urgent.dead"},
     ["chatbot-webhook", "slack", "email"]),
    ({"severity": "warning", "hostname": "celery@w1"}, ["chatbot-webhook", "slack", "email"]),
    ({"severity": "info", "queue": "urgent"}, ["chatbot-webhook"]),
    ({"severity": "info"}, ["chatbot-webhook"]),
    ({"queue": "default"}, ["chatbot-webhook", "slack", "email"]),  # no severity: still reaches people
]

# The loopback SMTP server takes AUTH without TLS on purpose (see the stack fixture).
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _binaries() -> None:
    """Fail (not skip) without Alertmanager: scripts/install.sh installs it, CI must run these tests."""
    assert ALERTMANAGER and AMTOOL, "prometheus-alertmanager and amtool are missing: run scripts/install.sh"


# --------------------------------------------------------------------------- receivers


@dataclass
class Delivery:
    """One notification as a channel received it."""

    channel: str
    alertname: str
    status: str  # "firing" or "resolved"
    text: str  # everything the notification says, for label checks
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""
    body: Any = None


class Inbox:
    """Thread-safe record of every notification, all channels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Delivery] = []

    def add(self, delivery: Delivery) -> None:
        with self._lock:
            self._items.append(delivery)

    def find(self, alertname: str, channel: str | None = None, status: str | None = None) -> list[Delivery]:
        with self._lock:
            return [
                d
                for d in self._items
                if d.alertname == alertname
                and (channel is None or d.channel == channel)
                and (status is None or d.status == status)
            ]

    def channels(self, alertname: str, status: str = "firing") -> set[str]:
        return {d.channel for d in self.find(alertname, status=status)}


_TITLE = re.compile(r"^\[(FIRING|RESOLVED)(?::\d+)?\] (\S+)")


def _from_title(title: str) -> tuple[str, str]:
    """(alertname, status) from the kit.title template's output."""
    match = _TITLE.match(title)
    assert match, f"unexpected notification title {title!r}"
    return match.group(2), match.group(1).lower()


class HttpReceiver:
    """A loopback HTTP server in a thread that turns each POST into a Delivery."""

    def __init__(self, channel: str, inbox: Inbox) -> None:
        self.channel = channel
        self.inbox = inbox
        self.pagerduty_keys: dict[str, str] = {}  # dedup_key -> alertname
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.record(self.path, dict(self.headers), body)
                status, reply = (202, {"status": "success"}) if channel == "pagerduty" else (200, "ok")
                data = json.dumps(reply).encode() if isinstance(reply, dict) else reply.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"{channel}-receiver", daemon=True)
        self.thread.start()

    def record(self, path: str, headers: dict[str, str], body: Any) -> None:
        if self.channel == "slack":
            attachment = body["attachments"][0]
            alertname, status = _from_title(attachment["title"])
            text = attachment["title"] + "\n" + attachment["text"]
        elif self.channel == "pagerduty":
            details = (body.get("payload") or {}).get("custom_details") or {}
            if details.get("alertname"):
                self.pagerduty_keys[body["dedup_key"]] = details["alertname"]
            alertname = self.pagerduty_keys.get(body["dedup_key"], "")
            status = "resolved" if body["event_action"] == "resolve" else "firing"
            text = json.dumps(body)
        else:  # generic webhook: Alertmanager's own JSON
            alertname = body["groupLabels"].get("alertname", "")
            status = body["status"]
            text = json.dumps(body)
        self.inbox.add(Delivery(self.channel, alertname, status, text, headers, path, body))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class SmtpHandler:
    """aiosmtpd handler: every message becomes a Delivery on the "email" channel."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's naming)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        alertname, status = _from_title(str(message["Subject"]))
        plain = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
        text = "\n".join([str(message["Subject"]), plain.get_content() if plain else "",
                          html.get_content() if html else ""])
        headers = {"To": str(message["To"]), "From": str(message["From"]), "X-Auth-Login": str(session.auth_data)}
        self.inbox.add(Delivery("email", alertname, status, text, headers, body=envelope.rcpt_tos))
        return "250 OK"


class PasswordAuthenticator:
    """Accepts only SMTP_USER with the password from the secret file."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.attempts: list[tuple[str, str, bool]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        ok = login == SMTP_USER and password == self.password
        self.attempts.append((mechanism, login, ok))
        return AuthResult(success=ok, auth_data=login if ok else None)


# --------------------------------------------------------------------------- Alertmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """The running Alertmanager, its channels and the secrets it was given."""

    url: str
    inbox: Inbox
    secrets: dict[str, str]
    slack: HttpReceiver
    pagerduty: HttpReceiver
    webhook: HttpReceiver
    smtp_auth: PasswordAuthenticator
    log_path: Path
    config_path: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def post(self, *alerts: dict[str, Any]) -> None:
        self.api("POST", "/api/v2/alerts", list(alerts))

    def alerts(self, alertname: str) -> list[dict[str, Any]]:
        query = urllib.request.quote(f'alertname="{alertname}"')
        return self.api("GET", f"/api/v2/alerts?filter={query}")

    def wait_delivered(self, alertname: str, channels: set[str], status: str = "firing") -> None:
        try:
            wait_until(lambda: channels <= self.inbox.channels(alertname, status), DELIVERY_TIMEOUT, "notifications")
        except AssertionError as exc:
            got = sorted(self.inbox.channels(alertname, status))
            raise AssertionError(
                f"{exc}: {status} {alertname} on {sorted(channels)}, got {got}; alertmanager log:\n{self.log_tail()}"
            ) from None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("alertmanager")
    inbox = Inbox()
    slack = HttpReceiver("slack", inbox)
    pagerduty = HttpReceiver("pagerduty", inbox)
    webhook = HttpReceiver("webhook", inbox)
    receivers = [slack, pagerduty, webhook]
    controller: Controller | None = None
    process: subprocess.Popen[bytes] | None = None
    try:
        # Secret files as an operator writes them: `echo value > file`, trailing newline included, which
        # Alertmanager 0.25 trims for all but the SMTP password: that one is written with `printf %s`.
        secrets_dir = root / "secrets"
        secrets_dir.mkdir(mode=0o700)
        token = uuid.uuid4().hex
        secrets = {
            "alertmanager_slack_api_url": f"{slack.url}/services/T0KIT/B0KIT/{token[:24]}",
            "alertmanager_smtp_password": f"smtp-{token[:12]}",
            "alertmanager_pagerduty_routing_key": f"R0UTING{token[:25]}",
            "alertmanager_webhook_token": f"relay-{token[12:]}",
        }
        assert set(secrets) == set(alertmanager_config.SECRET_FILES)
        for name, value in secrets.items():
            (secrets_dir / name).write_text(value if name == "alertmanager_smtp_password" else value + "\n")

        smtp_auth = PasswordAuthenticator(secrets["alertmanager_smtp_password"])
        smtp_port = _free_port()
        controller = Controller(
            SmtpHandler(inbox),
            hostname="127.0.0.1",
            port=smtp_port,
            authenticator=smtp_auth,
            auth_required=True,
            auth_require_tls=False,  # loopback: Go's smtp client sends PLAIN to 127.0.0.1 without TLS
            # Alertmanager's LOGIN expects the challenges "Username:"/"Password:", aiosmtpd sends "User Name";
            # Alertmanager takes the first mechanism offered, so offer PLAIN only (what mail relays offer first).
            auth_exclude_mechanism=["LOGIN"],
        )
        controller.start()

        config_path = alertmanager_config.write(
            root / "alertmanager.yml",
            secrets_dir=secrets_dir,
            smtp_smarthost=f"127.0.0.1:{smtp_port}",
            smtp_require_tls=False,
            pagerduty_url=f"{pagerduty.url}/v2/enqueue",
            webhook_url=f"{webhook.url}/alertmanager",
            group_wait="1s",
            group_interval="1s",
        )
        port = _free_port()
        log_path = root / "alertmanager.log"
        with log_path.open("wb") as log:
            process = spawn(
                [
                    str(ALERTMANAGER),
                    f"--config.file={config_path}",
                    f"--storage.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    f"--web.external-url=http://127.0.0.1:{port}",
                    "--cluster.listen-address=",
                    "--log.level=debug",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        s = Stack(
            f"http://127.0.0.1:{port}", inbox, secrets, slack, pagerduty, webhook, smtp_auth, log_path, config_path
        )

        def ready() -> bool:
            assert process is not None and process.poll() is None, f"alertmanager exited:\n{s.log_tail()}"
            try:
                with urllib.request.urlopen(s.url + "/-/ready", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, 20, "alertmanager /-/ready")
        yield s
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if controller is not None:
            controller.stop()
        for receiver in receivers:
            receiver.close()


def _names(*suffixes: str) -> dict[str, str]:
    """Alert names with a prefix of this test's own (the rules allow any prefix)."""
    prefix = "K" + uuid.uuid4().hex[:8]
    return {suffix: prefix + suffix for suffix in suffixes}


def _alert(alertname: str, cluster: str, ends: bool = False, console: str = "", **labels: str) -> dict[str, Any]:
    """An alert as Prometheus posts it; ``console``: the console annotation of the dead-letter alerts."""
    now = datetime.now(UTC).isoformat()
    alert: dict[str, Any] = {
        "labels": {"alertname": alertname, "cluster": cluster, **labels},
        "annotations": {
            "summary": f"{alertname} summary",
            "description": f"{alertname} description",
            "runbook_url": f"https://runbooks.example/{alertname}",
            **({"console": console} if console else {}),
        },
        "generatorURL": "http://prometheus.example/graph",
    }
    if ends:
        alert["endsAt"] = now  # resolved from now on
    return alert


def _cluster() -> str:
    return "c-" + uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------- config checks


def test_committed_config_passes_amtool_check_config() -> None:
    result = subprocess.run([str(AMTOOL), "check-config", str(CONFIG)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 receivers" in result.stdout and "3 inhibit rules" in result.stdout and "1 templates" in result.stdout


def test_committed_config_holds_no_secret_values() -> None:
    """Secrets only through *_file fields: none of the inline secret fields is set."""
    inline = re.compile(
        r"^\s*-?\s*(slack_api_url|api_url|smtp_auth_password|auth_password|auth_secret|smtp_auth_secret|"
        r"routing_key|service_key|credentials|password|bearer_token):",
        re.MULTILINE,
    )
    for path in [CONFIG, *CONFIG.parent.glob("templates/*.tmpl")]:
        assert inline.findall(path.read_text()) == [], path


def test_rendered_override_passes_check_config_and_changes_only_the_documented_lines(tmp_path: Path) -> None:
    rendered = alertmanager_config.write(
        tmp_path / "am.yml",
        secrets_dir=tmp_path / "s",
        smtp_smarthost="127.0.0.1:2525",
        smtp_require_tls=False,
        pagerduty_url="http://127.0.0.1:9/pd",
        webhook_url="http://127.0.0.1:9/wh",
        group_wait="1s",
        group_interval="1s",
    )
    result = subprocess.run([str(AMTOOL), "check-config", str(rendered)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    before, after = CONFIG.read_text().splitlines(), rendered.read_text().splitlines()
    assert len(before) == len(after)
    changed = {b.split(":")[0].strip(" -") for b, a in zip(before, after, strict=True) if a != b}
    assert changed == {
        "slack_api_url_file", "smtp_smarthost", "smtp_auth_password_file", "smtp_require_tls", "pagerduty_url",
        "'templates/*.tmpl'", "group_wait", "group_interval", "url", "credentials_file", "routing_key_file",
    }
    # Unknown keys and drifted secret names fail loudly instead of rendering a half-overridden config.
    broken = tmp_path / "broken.yml"
    broken.write_text(CONFIG.read_text().replace("alertmanager_webhook_token", "webhook_token"))
    with pytest.raises(ValueError, match="secret files"):
        alertmanager_config.render(broken, secrets_dir=tmp_path)
    with pytest.raises(ValueError, match="duration"):
        alertmanager_config.render(group_wait="soon")


@pytest.mark.parametrize(
    ("labels", "receivers"),
    ROUTING_TABLE,
    ids=[",".join(f"{k}={v}" for k, v in row[0].items()) for row in ROUTING_TABLE],
)
def test_routing_table(labels: dict[str, str], receivers: list[str]) -> None:
    args = [f"{k}={v}" for k, v in {"alertname": "AnyName", **labels}.items()]
    result = subprocess.run(
        [str(AMTOOL), "config", "routes", "test", f"--config.file={CONFIG}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().split(",") == receivers


# --------------------------------------------------------------------------- a real Alertmanager


def test_critical_on_urgent_reaches_every_channel_then_resolves(stack: Stack) -> None:
    name = _names("BacklogHigh")["BacklogHigh"]
    cluster = _cluster()
    stack.post(_alert(name, cluster, severity="critical", queue="urgent"))
    everything = {"pagerduty", "slack", "webhook", "email"}
    stack.wait_delivered(name, everything)

    # Each channel authenticated with the value from its secret file (trailing newline trimmed).
    (slack,) = stack.inbox.find(name, "slack")
    assert stack.slack.url + slack.path == stack.secrets["alertmanager_slack_api_url"]
    (page,) = stack.inbox.find(name, "pagerduty")
    assert page.body["routing_key"] == stack.secrets["alertmanager_pagerduty_routing_key"]
    assert page.body["payload"]["severity"] == "critical"
    assert page.body["payload"]["custom_details"]["queue"] == "urgent"
    assert page.body["links"] == [{"href": f"https://runbooks.example/{name}", "text": "Runbook"},
                                  {"href": stack.url, "text": "Alertmanager"}], "no console link: not a dead letter"
    (hook,) = stack.inbox.find(name, "webhook")
    assert hook.headers["Authorization"] == "Bearer " + stack.secrets["alertmanager_webhook_token"]
    assert hook.body["groupLabels"] == {"alertname": name, "queue": "urgent"}
    (mail,) = stack.inbox.find(name, "email")
    assert mail.headers["X-Auth-Login"] == SMTP_USER and mail.body == ["ops-alerts@example.com"]
    assert ("PLAIN", SMTP_USER, True) in stack.smtp_auth.attempts
    for delivery in (slack, mail):
        assert f"{name} summary" in delivery.text and f"https://runbooks.example/{name}" in delivery.text

    # The alert ends: every channel hears it resolved (send_resolved everywhere).
    stack.post(_alert(name, cluster, ends=True, severity="critical", queue="urgent"))
    stack.wait_delivered(name, everything, status="resolved")
    assert stack.inbox.find(name, "pagerduty", "resolved")[0].body["event_action"] == "resolve"
    assert stack.inbox.find(name, "webhook", "resolved")[0].body["alerts"][0]["status"] == "resolved"


def test_dead_letter_alerts_link_the_console_where_they_link_the_runbook(stack: Stack) -> None:
    name = _names("DeadLetterQueueGrowing")["DeadLetterQueueGrowing"]
    console = "https://dlq.example/letters?queue=urgent.dead&reason=retries-exhausted"
    stack.post(_alert(name, _cluster(), console=console, severity="critical", queue="urgent"))
    stack.wait_delivered(name, {"pagerduty", "slack", "webhook", "email"})
    (slack,) = stack.inbox.find(name, "slack")
    assert f"runbook: https://runbooks.example/{name}\nconsole: {console}\n" in slack.text, slack.text
    (mail,) = stack.inbox.find(name, "email")
    assert f"console: {console}" in mail.text, "the plain text part"
    assert f'<a href="{console.replace("&", "&amp;")}">Dead-letter console</a>' in mail.text, "the HTML part"
    (page,) = stack.inbox.find(name, "pagerduty")
    assert page.body["links"] == [{"href": f"https://runbooks.example/{name}", "text": "Runbook"},
                                  {"href": console, "text": "Dead-letter console"}]
    assert page.body["payload"]["custom_details"]["console"] == console
    (hook,) = stack.inbox.find(name, "webhook")
    assert hook.body["alerts"][0]["annotations"]["console"] == console


def test_warning_reaches_slack_email_webhook_but_pages_only_on_urgent(stack: Stack) -> None:
    names = _names("QueueWaitHigh", "DeadLettersArriving")
    cluster = _cluster()
    stack.post(
        _alert(names["QueueWaitHigh"], cluster, severity="warning", queue="urgent"),
        _alert(names["DeadLettersArriving"], cluster, severity="warning", queue="default.dead"),
    )
    stack.wait_delivered(names["QueueWaitHigh"], {"pagerduty", "slack", "webhook", "email"})
    stack.wait_delivered(names["DeadLettersArriving"], {"slack", "webhook", "email"})
    # Both were posted together and flushed together: the dead-letter warning never got a PagerDuty group.
    (routed,) = stack.alerts(names["DeadLettersArriving"])
    assert {r["name"] for r in routed["receivers"]} == {"chatbot-webhook", "slack", "email"}
    assert stack.inbox.find(names["DeadLettersArriving"], "pagerduty") == []
    page = stack.inbox.find(names["QueueWaitHigh"], "pagerduty")[0]
    assert page.body["payload"]["severity"] == "warning"


def test_info_reaches_only_the_webhook(stack: Stack) -> None:
    names = _names("RetryStorm", "TaskFailureRateHigh")
    cluster = _cluster()
    stack.post(
        _alert(names["RetryStorm"], cluster, severity="info", queue="bulk"),
        _alert(names["TaskFailureRateHigh"], cluster, severity="critical", queue="bulk"),  # posted with it
    )
    stack.wait_delivered(names["TaskFailureRateHigh"], {"pagerduty", "slack", "webhook", "email"})
    stack.wait_delivered(names["RetryStorm"], {"webhook"})
    (routed,) = stack.alerts(names["RetryStorm"])
    assert [r["name"] for r in routed["receivers"]] == ["chatbot-webhook"]
    assert stack.inbox.channels(names["RetryStorm"]) == {"webhook"}


def test_broker_down_inhibits_worker_backlog_consumer_and_wait_alerts(stack: Stack) -> None:
    names = _names("RabbitMQDown", "CeleryWorkerDown", "BacklogHigh", "NoConsumers", "QueueWaitHigh")
    down, healthy = _cluster(), _cluster()  # the broker of `down` is down; `healthy` shows equal: [cluster]
    broker = _alert(names["RabbitMQDown"], down, severity="critical")
    effects = {
        "CeleryWorkerDown": {"severity": "critical", "hostname": "celery@worker-1"},
        "BacklogHigh": {"severity": "warning", "queue": "default"},
        "NoConsumers": {"severity": "critical", "queue": "urgent"},
        "QueueWaitHigh": {"severity": "warning", "queue": "urgent"},
    }
    stack.post(broker)
    # The broker alert exists before its effects arrive, as it would with real rules.
    wait_until(lambda: stack.alerts(names["RabbitMQDown"]), 10, "broker alert accepted")
    # Each effect twice, in one aggregation group: muted in `down`, not in `healthy`.
    stack.post(*(_alert(names[k], c, **labels) for k, labels in effects.items() for c in (down, healthy)))

    broker_fingerprint = stack.alerts(names["RabbitMQDown"])[0]["fingerprint"]

    def states() -> dict[tuple[str, str], Any]:
        return {(key, a["labels"]["cluster"]): a["status"] for key in effects for a in stack.alerts(names[key])}

    muted = {"state": "suppressed", "inhibitedBy": [broker_fingerprint], "silencedBy": []}
    unmuted = {"state": "active", "inhibitedBy": [], "silencedBy": []}
    expected_states = {(key, c): muted if c == down else unmuted for key in effects for c in (down, healthy)}
    wait_until(lambda: states() == expected_states, 10, f"inhibition evaluated (now {states()})")

    everything = {"pagerduty", "slack", "webhook", "email"}
    stack.wait_delivered(names["RabbitMQDown"], everything)
    for key, labels in effects.items():
        pages = labels["severity"] == "critical" or labels.get("queue") == "urgent"
        stack.wait_delivered(names[key], everything if pages else everything - {"pagerduty"})
        # The notification of that group holds the healthy cluster's alert only, on every channel.
        for delivery in stack.inbox.find(names[key]):
            assert healthy in delivery.text and down not in delivery.text, (delivery.channel, delivery.text)
        (hook,) = stack.inbox.find(names[key], "webhook")
        assert [a["labels"]["cluster"] for a in hook.body["alerts"]] == [healthy]

    # The broker comes back: a worker that is still down is no longer muted and is announced.
    stack.post(_alert(names["RabbitMQDown"], down, ends=True, severity="critical"))
    stack.wait_delivered(names["RabbitMQDown"], {"pagerduty", "slack", "webhook", "email"}, status="resolved")

    def worker_down_announced() -> bool:
        return any(
            sorted(a["labels"]["cluster"] for a in d.body["alerts"]) == sorted([down, healthy])
            for d in stack.inbox.find(names["CeleryWorkerDown"], "webhook")
        )

    wait_until(worker_down_announced, DELIVERY_TIMEOUT, "worker-down of the recovered cluster announced")


def test_critical_inhibits_the_warning_of_the_same_alert_and_queue(stack: Stack) -> None:
    names = _names("BacklogHigh", "CeleryWorkerDown")
    cluster = _cluster()
    backlog, worker = names["BacklogHigh"], names["CeleryWorkerDown"]

    def states() -> dict[tuple[str | None, str | None, str], str]:
        return {
            (a["labels"].get("queue"), a["labels"].get("hostname"), a["labels"]["severity"]): a["status"]["state"]
            for name in (backlog, worker)
            for a in stack.alerts(name)
        }

    # The sources first: an inhibitor posted in the same request as its target may
    # reach the inhibition cache after the target's group has already been flushed.
    stack.post(
        _alert(backlog, cluster, severity="critical", queue="bulk", level="10k"),
        _alert(worker, cluster, severity="critical", hostname="celery@a"),
    )
    wait_until(lambda: len(states()) == 2, 10, "the critical alerts in Alertmanager")
    stack.post(
        _alert(backlog, cluster, severity="warning", queue="bulk", level="1k"),  # muted by the critical
        _alert(backlog, cluster, severity="warning", queue="default", level="1k"),  # other queue: not muted
        _alert(worker, cluster, severity="warning", hostname="celery@b"),  # other host: not muted
    )
    expected = {
        ("bulk", None, "critical"): "active",
        ("bulk", None, "warning"): "suppressed",
        ("default", None, "warning"): "active",
        (None, "celery@a", "critical"): "active",
        (None, "celery@b", "warning"): "active",
    }
    wait_until(lambda: states() == expected, 10, f"inhibition evaluated (now {states()})")

    def webhook_groups(name: str) -> dict[str, list[str]]:
        return {
            d.body["groupLabels"].get("queue", ""): sorted(a["labels"]["severity"] for a in d.body["alerts"])
            for d in stack.inbox.find(name, "webhook")
        }

    wait_until(lambda: len(webhook_groups(backlog)) == 2, DELIVERY_TIMEOUT, "both backlog groups on the webhook")
    assert webhook_groups(backlog) == {"bulk": ["critical"], "default": ["warning"]}
    # (The critical may first arrive alone; the group's next flush carries both.)
    wait_until(lambda: webhook_groups(worker) == {"": ["critical", "warning"]}, DELIVERY_TIMEOUT,
               "both worker alerts on the webhook")
    # At least one flush after the warnings were posted: still no warning for bulk.
    assert webhook_groups(backlog) == {"bulk": ["critical"], "default": ["warning"]}


def test_amtool_silence_from_the_readme_mutes_delivery(stack: Stack) -> None:
    name = _names("BacklogHigh")["BacklogHigh"]
    silenced, other = _cluster(), _cluster()
    result = subprocess.run(
        [
            str(AMTOOL), f"--alertmanager.url={stack.url}", "silence", "add",
            'alertname=~".*BacklogHigh"', "queue=bulk", f"cluster={silenced}",
            "--duration=2h", "--author=ops", "--comment=bulk re-import: backlog expected",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    silence_id = result.stdout.strip()
    try:
        stack.post(
            _alert(name, silenced, severity="warning", queue="bulk"),
            _alert(name, other, severity="warning", queue="bulk"),  # same group, not silenced
        )
        stack.wait_delivered(name, {"slack", "webhook", "email"})
        (hook,) = stack.inbox.find(name, "webhook")
        assert [a["labels"]["cluster"] for a in hook.body["alerts"]] == [other]
        assert {a["labels"]["cluster"]: a["status"]["silencedBy"] for a in stack.alerts(name)} == {
            silenced: [silence_id],
            other: [],
        }
    finally:
        subprocess.run(
            [str(AMTOOL), f"--alertmanager.url={stack.url}", "silence", "expire", silence_id],
            capture_output=True,
            timeout=30,
        )
