"""The console's guard rails over plain HTTP, against a real console process and broker.

A viewer's forged POST is 403 even with its own CSRF token; a POST without the token, or from another
origin, is 403; nothing changes on GET; a wrong password is refused and, after five, every login for
that user and address is 429; pages carry the security headers and the cookie is HttpOnly and
SameSite=Strict; a trusted proxy's user header logs in (role from the users file, else viewer) and
the same header from an untrusted address does nothing; a replay of the console and one of the CLI
never run at once, and each names the other; the users file refuses bad entries.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.console.sessions import LoginLimiter, Sessions
from service.console.users import add_user, password_matches, read_users
from tests.helpers import REPO, wait_until
from tests.helpers.console import ConsoleProcess, inject_dead_letters

pytestmark = pytest.mark.broker


@pytest.fixture
def console(kit_env: dict[str, str], tmp_path: Path, topology: None) -> Iterator[ConsoleProcess]:
    started = ConsoleProcess.start(kit_env, tmp_path, {"olga": "operator", "victor": "viewer"})
    yield started
    started.stop()


def _wait_snapshot(http: Any, queue: str, count: int) -> None:
    def shows() -> bool:
        page = http.client.get("/letters", params={"queue": queue})
        return f'<span id="total">{count}</span>' in page.text
    wait_until(shows, 30, f"the console to show {count} letters in {queue}", interval=0.3)


def test_viewer_forged_post_missing_token_and_foreign_origin_are_refused(console: ConsoleProcess,
                                                                        vhost: Any) -> None:
    inject_dead_letters(vhost, "default", 5)
    viewer = console.http()
    assert viewer.login("victor").status_code == 303
    token = viewer.csrf()
    forged = viewer.post("/replay/dry-run", {"csrf_token": token, "queue": "default.dead"})
    assert forged.status_code == 403 and "operator role" in forged.text
    assert viewer.post("/purge/preview", {"csrf_token": token, "queue": "default.dead"}).status_code == 403
    assert viewer.client.get("/export", params={"queue": "default.dead"}).status_code == 403
    assert viewer.client.get("/replay", params={"queue": "default.dead"}).status_code == 403

    operator = console.http()
    assert operator.login("olga").status_code == 303
    assert operator.post("/replay/dry-run", {"queue": "default.dead"}).status_code == 403  # no token
    assert operator.post("/replay/dry-run", {"queue": "default.dead", "csrf_token": token}).status_code == 403
    foreign = operator.post("/replay/dry-run", {"queue": "default.dead", "csrf_token": operator.csrf()},
                            headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403 and "another site" in foreign.text
    # Nothing changes on GET: the state-changing routes answer only POST.
    for path in ("/replay/confirm", "/purge/confirm", "/replay/dry-run", "/logout", "/refresh"):
        assert operator.client.get(path).status_code == 405, path
    assert vhost.depth("default.dead") == 5
    log = console.log()
    assert '"outcome": "forbidden"' in log and '"user": "victor"' in log
    metrics = operator.client.get("/metrics").text
    assert 'kit_console_actions_total{action="refused",outcome="forbidden"}' in metrics
    viewer.close()
    operator.close()


def test_wrong_password_is_refused_then_rate_limited(console: ConsoleProcess) -> None:
    http = console.http()
    for _ in range(5):
        wrong = http.login("olga", "not-the-password")
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    limited = http.login("olga")  # the right password, too late
    assert limited.status_code == 429 and "Too many failed logins" in limited.text
    assert int(limited.headers["Retry-After"]) > 0
    assert http.client.get("/").status_code == 303  # still not logged in
    assert http.login("nobody", "x" * 12).status_code == 429  # the same address
    assert '"outcome": "rate-limited"' in console.log()
    http.close()


def test_pages_need_a_login_and_carry_the_security_headers(console: ConsoleProcess) -> None:
    http = console.http()
    first = http.client.get("/letters?queue=default")
    assert first.status_code == 303 and first.headers["location"].startswith("/login?next=")
    assert http.client.get("/jobs/anything.json").status_code == 401
    login = http.login("olga")
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = http.client.get("/")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    assert "<script src=\"/static/console.js\"" in page.text and "http" not in page.text.split("<body>")[0].replace(
        'content="width', "")  # every asset from the console itself
    assert http.login("olga").headers["location"] == "/"
    bad = http.client.get("/letters", params={"page": "abc"})
    assert bad.status_code == 400 and "page" in bad.text and "text/html" in bad.headers["content-type"]
    bad = http.client.get("/letters", params={"since": "yesterday-ish"})
    assert bad.status_code == 400 and "cannot read the time" in bad.text
    # An open redirect is not possible through ?next=.
    form = http.client.get("/login?next=//evil.example/x")
    assert 'name="next" value="/"' in form.text
    logout = http.post("/logout", {"csrf_token": http.csrf()})
    assert logout.status_code == 303 and http.client.get("/").status_code == 303
    http.close()


def test_proxy_user_header_only_from_trusted_addresses(kit_env: dict[str, str], tmp_path: Path,
                                                       topology: None) -> None:
    console = ConsoleProcess.start(kit_env, tmp_path, {"olga": "operator"},
                                   KIT_CONSOLE_PROXY_USER_HEADER="X-Forwarded-User")
    try:
        http = console.http()
        page = http.client.get("/", headers={"X-Forwarded-User": "olga"})
        assert page.status_code == 200 and "olga (operator)" in page.text
        stranger = console.http()
        page = stranger.client.get("/", headers={"X-Forwarded-User": "sam"})
        assert page.status_code == 200 and "sam (viewer)" in page.text
        assert stranger.client.get("/").status_code == 200  # its session cookie now
        http.close()
        stranger.close()
    finally:
        console.stop()
    untrusted = ConsoleProcess.start(kit_env, tmp_path / "b", {"olga": "operator"},
                                     KIT_CONSOLE_PROXY_USER_HEADER="X-Forwarded-User",
                                     KIT_CONSOLE_TRUSTED_PROXIES="10.9.9.9")
    try:
        http = untrusted.http()
        assert http.client.get("/", headers={"X-Forwarded-User": "olga"}).status_code == 303
        http.close()
    finally:
        untrusted.stop()


def _dry_run_and_confirm(http: Any, queue: str, rate: str | None = None) -> str:
    """Dry-run a replay of ``queue`` and confirm it; the job's URL."""
    import re

    plan = http.post("/replay/dry-run", {"csrf_token": http.csrf(), "queue": queue, "rate": rate or ""})
    assert plan.status_code == 200, plan.text
    plan_id = re.search(r'name="plan" value="([^"]+)"', plan.text)[1]
    count = re.search(r'name="count" value="([^"]+)"', plan.text)[1]
    confirmed = http.post("/replay/confirm", {"csrf_token": http.csrf(), "plan": plan_id, "count": count})
    assert confirmed.status_code == 303, confirmed.text
    return confirmed.headers["location"]


def test_console_and_cli_replays_never_run_at_once(console: ConsoleProcess, vhost: Any,
                                                  kit_env: dict[str, str]) -> None:
    inject_dead_letters(vhost, "default", 12)
    http = console.http()
    http.login("olga")
    _wait_snapshot(http, "default.dead", 12)
    job = _dry_run_and_confirm(http, "default.dead", rate="2")  # six seconds
    wait_until(lambda: http.client.get(job + ".json").json()["done"] >= 1, 30, "the console's replay to start")
    cli = subprocess.run([sys.executable, "-m", "service", "dlq", "replay", "--queue", "default"], env=kit_env,
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0
    assert "olga via the console (replay)" in cli.stderr, cli.stderr
    wait_until(lambda: http.client.get(job + ".json").json()["state"] != "running", 60, "the console's replay")
    assert http.client.get(job + ".json").json()["counts"]["moved"] == 12

    # Now the CLI holds the queue: the console's replay is refused, naming it.
    inject_dead_letters(vhost, "default", 6)
    _wait_snapshot(http, "default.dead", 6)
    done: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: done.update(result=subprocess.run(
        [sys.executable, "-m", "service", "dlq", "replay", "--queue", "default", "--rate", "1"], env=kit_env,
        cwd=REPO, capture_output=True, text=True, timeout=120)))
    runner.start()
    try:
        wait_until(lambda: vhost.depth("default") >= 13, 30, "the CLI's replay to start")
        refused = http.post("/replay/dry-run", {"csrf_token": http.csrf(), "queue": "default.dead"})
        assert refused.status_code == 503 and "(dlq replay)" in refused.text, refused.text
        wait_until(lambda: "(dlq replay)" in http.client.get("/").text, 30, "the overview to name the CLI")
    finally:
        runner.join(120)
    assert done["result"].returncode == 0, done["result"].stderr
    assert vhost.depth("default") == 18
    http.close()


def test_users_file_and_sessions(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert read_users(path) == {}  # no file: no user, no default password
    assert add_user(path, "olga", "operator", "a-long-password-1") is True
    assert add_user(path, "olga", "viewer", "a-long-password-2") is False
    users = read_users(path)
    assert users["olga"].role == "viewer" and password_matches("a-long-password-2", users["olga"].password_hash)
    assert not password_matches("a-long-password-1", users["olga"].password_hash)
    assert "a-long-password" not in path.read_text() and oct(path.stat().st_mode & 0o777) == "0o600"
    bad = subprocess.run([sys.executable, "-m", "service", "console", "add-user", "eve", "--role", "operator",
                          "--password-stdin", "--users-file", str(path)], input="short\n", text=True,
                         capture_output=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: the password has 5 characters")
    path.write_text("olga:admin:scrypt$x\n")
    with pytest.raises(Exception, match=r"users:1: not a `name:role:scrypt"):
        read_users(path)

    sessions = Sessions(ttl=0.2)
    session = sessions.open("olga", "operator")
    assert sessions.get(session.token) is session
    time.sleep(0.3)  # the session's idle time runs out: a real wait is the claim itself
    assert sessions.get(session.token) is None
    limiter = LoginLimiter(max_failures=2, window=60)
    limiter.failed("a")
    assert limiter.retry_after("a") == 0
    limiter.failed("a")
    assert limiter.retry_after("a") > 0 and limiter.retry_after("b") == 0
