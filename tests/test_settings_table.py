"""Every entry of service/settings.py's SETTINGS, with good and bad values.

The table below names every setting (a new one without a row fails
``test_the_table_covers_every_setting``): what it accepts, in the words of the
README, and the values that must fail or load. Numbers also get the generic
bad values (nan, inf, -inf, -1, text, empty, ...) and 0 where 0 means nothing.
A bad value is a ConfigError of one line with the variable, the value and what
is accepted; the command line prints it before it connects anywhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from service import queues
from service.cli import main, markdown_table
from service.settings import FLOAT, INT, SETTINGS, ConfigError, Setting, load, redact_dsn, validate
from tests.helpers import REPO

#: Placeholders in the table, replaced by paths made for each test.
FILE, MISSING, DIRECTORY, EMPTY_FILE = "{file}", "{missing}", "{dir}", "{empty}"
#: Bad values of every number, whatever its range.
NUMBER_BAD = ("nan", "NaN", "inf", "-inf", "Infinity", "-1", "text", "", "1_000", "\u0663", "1e999", "0x10", "5 5")
#: A broker URL where nothing listens: connecting would fail with a different error.
NOWHERE = "pyamqp://kit@127.0.0.1:1//"


@dataclass(frozen=True)
class Case:
    """What one setting accepts (as the README says), values that fail and values that load."""

    accepted: str
    bad: tuple[str, ...] = ()
    good: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # other settings these values need (the time limits)


def number(accepted: str, bad: tuple[str, ...] = (), good: tuple[str, ...] = (), zero_ok: bool = False,
           env: tuple[tuple[str, str], ...] = ()) -> Case:
    """A numeric setting: the generic bad values, and 0 unless it means something."""
    return Case(accepted, NUMBER_BAD + bad + (() if zero_ok else ("0", "0.0")), good, env)


BOOLEAN = Case("true or false (also 1/0, yes/no, on/off)", ("maybe", "", "2", "truee", "y"),
               ("true", "false", "TRUE", "False", "1", "0", "yes", "no", "on", "off"))
OPTIONAL_FILE = Case("empty, or the path of a readable file", (MISSING, DIRECTORY), ("", FILE))
DIRECTORY_PATH = Case("the path of a directory (created when missing)", ("", FILE), (DIRECTORY, MISSING, "var"))
OPTIONAL_TEXT = Case("one line of text, or empty", ("a\nb", "bell\x07"), ("", "kit-test", "kit@1.2 beta"))
SECONDS = "a number from 0.1 to 3600"
TIMEOUT = number(SECONDS, ("0.09", "3600.5", "86400"), ("0.1", "3600", "1e3", "+5", " 7 ", ".5"))
TIERS = ", ".join(str(t) for t in queues.WAIT_TIERS_S)

CASES: dict[str, Case] = {
    "KIT_BROKER_URL": Case(
        "a pyamqp://, amqps:// or amqp:// URL with a host, or several (one per cluster node) separated by ';'",
        ("redis://localhost", "", "localhost:5672", "pyamqp://", "pyamqp:///kit", "pyamqp://h:99999/kit",
         "pyamqp://h:port/kit", "pyamqp://[::1/kit", "pyamqp://h/kit\nx",
         "pyamqp://kit@a:5672/kit;;pyamqp://kit@b:5672/kit", "pyamqp://kit@a:5672/kit;pyamqp://other@b:5672/kit",
         "pyamqp://kit@a:5672/kit;pyamqp://kit@b:5672/elsewhere", "pyamqp://kit@a/kit;amqps://kit@b/kit",
         "pyamqp://kit@a/kit;redis://b"),
        ("pyamqp://kit@127.0.0.1:5672/kit", "amqps://kit@broker.example:5671/kit", "amqp://kit@[::1]/kit",
         "PYAMQP://kit@h//", "pyamqp://kit@a:5672/kit;pyamqp://kit@b:5672/kit;pyamqp://kit@c:5672/kit",
         "pyamqp://kit@a/kit; pyamqp://kit@b/kit"),
    ),
    "KIT_QUEUE_TYPE": Case("one of classic, quorum, in any case", ("", "mirrored", "stream", "quorum queues"),
                           ("classic", "quorum", "QUORUM")),
    "KIT_BROKER_PASSWORD_FILE": OPTIONAL_FILE,
    "KIT_BROKER_CA_FILE": OPTIONAL_FILE,
    "KIT_BROKER_CLIENT_CERT_FILE": OPTIONAL_FILE,
    "KIT_BROKER_CLIENT_KEY_FILE": OPTIONAL_FILE,
    "KIT_DECLARE_TOPOLOGY": BOOLEAN,
    "KIT_ADMIN_URL": Case("an http:// or https:// URL with a host and no credentials",
                          ("", "ftp://h:15672", "h:15672", "http://", "http://h:99999", "http://kit:pw@h:15672"),
                          ("http://127.0.0.1:15672", "https://rabbit.example", "HTTP://[::1]:15672/")),
    "KIT_ADMIN_USER": Case("one line of text, not empty", ("", "a\nb"), ("kit-admin", "guest", "kit test")),
    "KIT_ADMIN_PASSWORD_FILE": OPTIONAL_FILE,
    "KIT_CONNECT_TIMEOUT": TIMEOUT,
    "KIT_PUBLISH_TIMEOUT": TIMEOUT,
    "KIT_MAX_PAYLOAD_BYTES": number("an integer from 1 to 134217728", ("134217729", "1.5", "1e3"),
                                    ("1", "134217728", "007")),
    "KIT_SEND_SENT_EVENTS": BOOLEAN,
    "KIT_SOFT_TIME_LIMIT": number("a number at least 1 and below 3600", ("0.5", "3600"), ("1", "3599"),
                                  env=(("KIT_HARD_TIME_LIMIT", "3599.5"),)),
    "KIT_HARD_TIME_LIMIT": number("a number above 1 and below 3600", ("1", "3600", "100000"), ("1.5", "3599.9"),
                                  env=(("KIT_SOFT_TIME_LIMIT", "1"),)),
    "KIT_MAX_RETRIES": number("an integer from 0 to 1000", ("1001", "2.5"), ("0", "1000"), zero_ok=True),
    "KIT_RETRY_BACKOFF_BASE": number("a number from 0.001 to 4096", ("0.0009", "4097"), ("0.001", "4096", "0.2")),
    "KIT_RETRY_BACKOFF_MAX": number("a number from 1 to 86400", ("0.5", "86401"), ("1", "86400")),
    "KIT_LONGEST_WAIT": number(f"one of {TIERS}", ("3", "5000", "8192", "4096.0"), ("1", "2", "64", "4096")),
    "KIT_MAX_WORKER_LOST": number("an integer from 1 to 1000", ("1001",), ("1", "1000")),
    "KIT_MAX_REPLAYS": number("an integer from 0 to 1000", ("1001",), ("0", "1000"), zero_ok=True),
    "KIT_CONCURRENCY": number("an integer from 1 to 1024", ("1025",), ("1", "1024")),
    "KIT_METRICS_PORT": number("an integer from 0 to 65535", ("65536", "99999"), ("0", "1", "65535"), zero_ok=True),
    "KIT_LOG_LEVEL": Case("one of DEBUG, INFO, WARNING, ERROR, CRITICAL, in any case", ("verbose", "", "10", "WARN"),
                          ("debug", "INFO", "Warning", "ERROR", "critical")),
    "KIT_TIMEZONE": Case("an IANA time zone name such as UTC or Asia/Shanghai",
                         ("", "Mars/Olympus", "UTC+8", "../etc/passwd", "Asia/ Shanghai"),
                         ("UTC", "Asia/Shanghai", "Europe/Berlin", "America/New_York")),
    "KIT_TASK_MODULES": Case("empty, or comma-separated Python module names",
                             ("tests.worker_tasks,not a module", "1abc", "a..b", "a-b", "a\nb"),
                             ("", "tests.worker_tasks", "a.b, c", "a,")),
    "KIT_STATE_DIR": DIRECTORY_PATH,
    "KIT_SMTP_HOST": Case("a host name or IP address", ("", "smtp host", "a/b", "user@host"),
                          ("127.0.0.1", "mail.example.com", "::1", "[::1]")),
    "KIT_SMTP_PORT": number("an integer from 1 to 65535", ("65536",), ("1", "65535")),
    "KIT_SMTP_TIMEOUT": TIMEOUT,
    "KIT_MAIL_FROM": Case("an e-mail address (local@domain)", ("", "nobody", "a@", "@b", "a b@c", "A <a@b>"),
                          ("kit@sender.test", "noreply@localhost")),
    "KIT_REPORT_DIR": DIRECTORY_PATH,
    "KIT_REPORT_MAX_AGE_HOURS": number("a number above 0 and at most 87600", ("87600.5",), ("0.01", "87600")),
    "KIT_CLEANUP_INTERVAL": number("a number from 1 to 604800", ("0.5", "604801"), ("1", "604800")),
    "KIT_BEAT_LEASE_RETRY": number("a number from 0.1 to 600", ("0.09", "600.5", "3600"), ("0.1", "0.5", "600")),
    "KIT_WEBHOOK_TIMEOUT": TIMEOUT,
    "KIT_WEBHOOK_SECRET_FILE": OPTIONAL_FILE,
    "KIT_WEB_HOST": Case("a host name or IP address", ("", "web host", "a/b", "user@host"),
                         ("127.0.0.1", "0.0.0.0", "localhost", "::1", "[::1]")),
    "KIT_WEB_PORT": number("an integer from 1 to 65535", ("65536",), ("1", "8000", "65535")),
    "KIT_WEB_REQUEST_TIMEOUT": number("a number from 0.5 to 3600", ("0.4", "3600.5"), ("0.5", "30", "3600")),
    "KIT_WEB_EXPORT_PAUSE": number("a number from 0 to 1", ("1.01", "2"), ("0", "0.05", "1"), zero_ok=True),
    "KIT_CONSOLE_HOST": Case("a host name or IP address", ("", "console host", "a/b"), ("127.0.0.1", "0.0.0.0", "::1")),
    "KIT_CONSOLE_PORT": number("an integer from 1 to 65535", ("65536",), ("1", "5580", "65535")),
    "KIT_CONSOLE_USERS_FILE": OPTIONAL_TEXT,
    "KIT_CONSOLE_URL": Case("empty, or an http:// or https:// URL with a host and no credentials",
                            ("localhost:5580", "ftp://h", "http://", "https://kit:pw@dlq.example"),
                            ("", "http://localhost:5580", "https://dlq.example.com/console")),
    "KIT_CONSOLE_SESSION_TTL": number("a number from 60 to 604800", ("59", "604801"), ("60", "28800", "604800")),
    "KIT_CONSOLE_COOKIE_SECURE": BOOLEAN,
    "KIT_CONSOLE_PROXY_USER_HEADER": Case("empty, or an HTTP header name such as X-Forwarded-User",
                                          ("X Forwarded User", "X-User:", "a\nb"), ("", "X-Forwarded-User")),
    "KIT_CONSOLE_TRUSTED_PROXIES": Case("empty, or comma-separated IP addresses", ("proxy.local", "10.0.0.300"),
                                        ("", "127.0.0.1,::1", "10.0.0.5, 10.0.0.6")),
    "KIT_CONSOLE_REFRESH": number("a number from 1 to 3600", ("0.5", "3601"), ("1", "15", "3600")),
    "KIT_CONSOLE_ARCHIVE_DIR": DIRECTORY_PATH,
    "KIT_FLOWER_AUTH_FILE": OPTIONAL_TEXT,
    "KIT_ALERT_RELAY_HOST": Case("a host name or IP address", ("", "relay host", "a/b"),
                                 ("127.0.0.1", "0.0.0.0", "::1")),
    "KIT_ALERT_RELAY_PORT": number("an integer from 1 to 65535", ("65536",), ("1", "8060", "65535")),
    "KIT_ALERT_RELAY_CONFIG": Case("one line of text, not empty", ("", "a\nb"), ("deploy/alertmanager/relay.yml",)),
    "KIT_ALERT_RELAY_SECRETS_DIR": Case("one line of text, not empty", ("", "a\nb"), ("/run/secrets", "secrets")),
    "KIT_ALERT_RELAY_TOKEN_FILE": Case("one line of text, not empty", ("", "a\nb"),
                                       ("/run/secrets/alertmanager_webhook_token",)),
    "KIT_ALERT_TIMEZONE": Case("an IANA time zone name such as UTC or Asia/Shanghai",
                               ("", "Mars/Olympus", "UTC+8"), ("UTC", "Asia/Shanghai")),
    "KIT_ALERT_GRAFANA_URL": Case("empty, or an http:// or https:// URL with a host and no credentials",
                                  ("grafana:3000", "ftp://h", "https://admin:pw@grafana.example"),
                                  ("", "http://localhost:3000/d/kit-celery-overview")),
    "KIT_ALERT_RELAY_TIMEOUT": number("a number from 0.1 to 60", ("0.09", "61"), ("0.1", "5", "60")),
    "KIT_ALERT_RELAY_DEADLINE": number("a number from 1 to 600", ("0.5", "601"), ("1", "30", "600")),
    "KIT_RESULT_BACKEND": Case(
        "empty, or a Celery result backend URL such as redis://host:6379/0 (rediss:// with ?ssl_cert_reqs=required)",
        ("nonsense", "foo://x", "redis:///0", "redis://h/zero", "redis://h:99999/0", "rediss://h:6380/0",
         "rediss://h/0?ssl_cert_reqs=maybe", "rpc://", "cache+memory://"),
        ("", "redis://127.0.0.1:6379/0", "redis://:secret@redis:6379", "rediss://h:6380/1?ssl_cert_reqs=required",
         "db+sqlite:///results.db", "cache+memcached://127.0.0.1:11211/"),
    ),
    "KIT_RESULT_EXPIRES": number("an integer from 1 to 31536000", ("31536001", "1.5"), ("1", "86400", "31536000")),
    "SENTRY_DSN": Case(
        "empty, or a Sentry DSN: http(s)://key@host/project",
        ("nonsense", "https://sentry.example/1", "ftp://key@sentry.example/1", "https://key@sentry.example/project",
         "https://key@/1", "https://key@sentry.example:99999/1", "https://key@sentry.example/"),
        ("", "https://public@sentry.example/1", "http://public@127.0.0.1:9000/42",
         "https://public@o1.ingest.sentry.example/path/7"),
    ),
    "SENTRY_ENVIRONMENT": OPTIONAL_TEXT,
    "SENTRY_RELEASE": OPTIONAL_TEXT,
    "SENTRY_TRACES_SAMPLE_RATE": number("a number from 0 to 1", ("1.5", "2", "100"), ("0", "0.25", "1"),
                                        zero_ok=True),
    "SENTRY_SEND_TASK_ARGS": BOOLEAN,
}
BY_NAME = {s.name: s for s in SETTINGS}


def _rows(which: str) -> list[tuple[str, str]]:
    return [(name, value) for name, case in CASES.items() for value in getattr(case, which)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """No KIT_* or SENTRY_* variable set; the placeholder paths, made in tmp_path."""
    for name in list(os.environ):
        if name.startswith(("KIT_", "SENTRY_")):
            monkeypatch.delenv(name)
    (tmp_path / "file").write_text("x-secret-value\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "dir").mkdir()
    return {FILE: str(tmp_path / "file"), MISSING: str(tmp_path / "missing"), DIRECTORY: str(tmp_path / "dir"),
            EMPTY_FILE: str(tmp_path / "empty")}


def _set(monkeypatch: pytest.MonkeyPatch, paths: dict[str, str], name: str, value: str) -> str:
    """Set ``name`` (and the other settings its case needs); returns the value as set."""
    for other, other_value in CASES[name].env:
        monkeypatch.setenv(other, other_value)
    value = paths.get(value, value)
    monkeypatch.setenv(name, value)
    return value


# -- the table itself ----------------------------------------------------------------------


def test_the_table_covers_every_setting():
    assert list(CASES) == [s.name for s in SETTINGS], "add the new setting's row to CASES, in SETTINGS' order"
    assert len(BY_NAME) == len(SETTINGS), "a setting is listed twice"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_says_what_it_accepts(setting: Setting):
    assert setting.accepted() == CASES[setting.name].accepted
    assert "\n" not in setting.accepted() and "|" not in setting.accepted()
    if setting.kind in (FLOAT, INT) and not setting.choices:
        assert setting.minimum is not None and setting.maximum is not None, "numbers need both bounds"
    assert CASES[setting.name].bad, "every setting has values that fail"


def test_the_defaults_load(clean_env):
    values = validate()
    assert set(values) == set(BY_NAME)
    settings = load()
    assert settings.longest_wait == queues.WAIT_TIERS_S[-1] == values["KIT_LONGEST_WAIT"]
    assert settings.declare_topology is True
    assert settings.log_level == "INFO" and settings.sentry_traces_sample_rate == 0.0


# -- bad values fail, good ones load -------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), _rows("bad"))
def test_a_bad_value_is_one_line_naming_variable_value_and_range(name, value, clean_env, monkeypatch):
    value = _set(monkeypatch, clean_env, name, value)
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    shown = redact_dsn(value.strip()) if name == "SENTRY_DSN" else value.strip()
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{name}={shown!r} "), message
    assert f"accepted: {CASES[name].accepted}" in message, message
    if name == "SENTRY_DSN" and "@" in value:
        assert "key" not in message.split("accepted:")[0], "the DSN's key is hidden"


@pytest.mark.parametrize(("name", "value"), _rows("good") + [(s.name, s.default) for s in SETTINGS])
def test_good_values_and_bounds_load(name, value, clean_env, monkeypatch):
    value = _set(monkeypatch, clean_env, name, value)
    parsed = validate()[name]
    load()
    if BY_NAME[name].kind in (FLOAT, INT):
        assert parsed == float(value)


def test_numbers_are_parsed_to_their_kind(clean_env):
    values = validate()
    for setting in SETTINGS:
        if setting.kind == INT:
            assert type(values[setting.name]) is int, setting.name
        if setting.kind == FLOAT:
            assert type(values[setting.name]) is float, setting.name


def test_the_sample_rate_is_not_clamped_any_more(clean_env, monkeypatch):
    monkeypatch.setenv("SENTRY_TRACES_SAMPLE_RATE", "1.01")
    with pytest.raises(ConfigError, match=r"SENTRY_TRACES_SAMPLE_RATE='1.01' is out of range"):
        load()


def test_the_hard_time_limit_stays_above_the_soft_one(clean_env, monkeypatch):
    monkeypatch.setenv("KIT_SOFT_TIME_LIMIT", "400")
    with pytest.raises(ConfigError, match="must be greater than KIT_SOFT_TIME_LIMIT"):
        load()


def test_the_time_limits_end_before_rabbitmqs_consumer_timeout():
    conf = (REPO / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    [timeout_ms] = re.findall(r"(?m)^consumer_timeout\s*=\s*(\d+)\s*$", conf)
    for name in ("KIT_SOFT_TIME_LIMIT", "KIT_HARD_TIME_LIMIT"):
        setting = BY_NAME[name]
        assert setting.maximum is not None and setting.maximum <= int(timeout_ms) / 1000, name


def test_an_empty_password_file_is_refused(clean_env, monkeypatch):
    monkeypatch.setenv("KIT_BROKER_PASSWORD_FILE", clean_env[EMPTY_FILE])
    with pytest.raises(ConfigError, match=r"^KIT_BROKER_PASSWORD_FILE='.*empty' is empty"):
        load()


def test_declare_topology_comes_from_the_validated_settings(clean_env, monkeypatch):
    monkeypatch.setenv("KIT_DECLARE_TOPOLOGY", "off")
    assert load().declare_topology is False
    monkeypatch.setenv("KIT_DECLARE_TOPOLOGY", "maybe")
    with pytest.raises(ConfigError, match="KIT_DECLARE_TOPOLOGY='maybe' is not a boolean"):
        load().declare_topology  # noqa: B018 - load() raises


def test_a_long_value_is_cut_in_the_message(clean_env, monkeypatch):
    monkeypatch.setenv("KIT_CONNECT_TIMEOUT", "9" * 5000)
    with pytest.raises(ConfigError) as info:
        load()
    assert len(str(info.value)) < 300 and "..." in str(info.value)


# -- the README ------------------------------------------------------------------------------


def test_the_readme_holds_the_generated_table():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() + "\n" in readme, "regenerate it: python -m service config --markdown"
    result = CliRunner().invoke(main, ["config", "--markdown"], env={"KIT_PUBLISH_TIMEOUT": "nan"})
    assert result.exit_code == 0 and result.output == markdown_table() + "\n"


# -- the command line checks the settings before it connects ------------------------------------


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIT_", "SENTRY_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return dict(env, KIT_BROKER_URL=NOWHERE, **values)


def _run_all(commands: list[tuple[dict[str, str], list[str]]]) -> list[subprocess.CompletedProcess]:
    """Run ``python -m service ARGS`` for every (env, args) at once; each must end within 20 s."""
    processes = [subprocess.Popen([sys.executable, "-m", "service", *args], env=env, cwd=REPO, text=True,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for env, args in commands]
    results = []
    for (_, args), process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=20)
        results.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return results


BAD_ENVIRONMENTS = {
    "KIT_PUBLISH_TIMEOUT": "nan",
    "KIT_CONNECT_TIMEOUT": "inf",
}
COMMANDS = [["dlq", "stats"], ["publish", "x"], ["topology", "verify"], ["topology", "declare"], ["stack", "status"],
            ["demo", "--count", "1"], ["broker", "definitions", "--secrets-dir", "/nowhere", "--out", "/nowhere/x"],
            ["config"]]


def test_every_command_reports_a_bad_setting_in_one_line_without_connecting():
    commands = [(_env(**{name: value}), args) for name, value in BAD_ENVIRONMENTS.items() for args in COMMANDS]
    for (env, args), result in zip(commands, _run_all(commands), strict=True):
        name = next(n for n in BAD_ENVIRONMENTS if n in env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith(f"error: {name}={env[name]!r} is not a finite number; accepted: "), (args, lines)
        assert result.stdout == "", (args, result.stdout)


def test_help_and_the_table_work_with_a_bad_setting():
    env = _env(KIT_PUBLISH_TIMEOUT="nan")
    commands = [(env, args) for args in (["--help"], ["-h"], ["dlq", "--help"], ["dlq", "stats", "--help"],
                                         ["topology", "verify", "-h"], ["publish", "--help"], ["config", "--markdown"],
                                         ["stack", "up", "--help"])]
    for (_, args), result in zip(commands, _run_all(commands), strict=True):
        assert result.returncode == 0, (args, result.stderr)
        assert result.stderr == "" and result.stdout, (args, result.stderr)
