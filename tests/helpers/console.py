"""A real `python -m service console` for the tests, its users, an HTTP client of it, and Debian's Chromium.

``ConsoleProcess.start`` creates the users with `console add-user` (passwords
made up per run), starts the console on a free port with the test's
environment and waits for /healthz. ``HttpSession`` logs in over plain HTTP
(for the guard tests); ``launch_browser`` starts Debian's Chromium under
Playwright with the flags this machine needs (no browser download, no
background networking).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import amqp
import httpx

from service import headers as h
from service import queues
from tests.helpers.broker import REPO
from tests.helpers.processes import spawn
from tests.helpers.redis import free_port
from tests.helpers.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
#: Screenshots of every page the browser tests visit (kept after the run).
SCREENSHOTS = REPO / "test-output" / "console"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def add_user(env: dict[str, str], users_file: Path, name: str, role: str) -> str:
    """Create console user ``name`` with `console add-user`; returns its (random) password."""
    password = secrets.token_urlsafe(18)
    done = subprocess.run([sys.executable, "-m", "service", "console", "add-user", name, "--role", role,
                           "--password-stdin", "--users-file", str(users_file)],
                          input=password + "\n", text=True, capture_output=True, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"added {name} ({role})" in done.stdout
    return password


@dataclass
class ConsoleProcess:
    """A running console and its users' passwords."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    archive_dir: Path
    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, env: dict[str, str], tmp_path: Path, users: dict[str, str], **extra: str) -> ConsoleProcess:
        """Add ``users`` (name -> role), start the console and wait until it answers."""
        users_file = tmp_path / "console-users"
        passwords = {name: add_user(env, users_file, name, role) for name, role in users.items()}
        port = free_port()
        log_path = tmp_path / f"console-{port}.log"
        archive_dir = tmp_path / "console-archives"
        full_env = {**env, "KIT_CONSOLE_USERS_FILE": str(users_file), "KIT_CONSOLE_ARCHIVE_DIR": str(archive_dir),
                    "KIT_CONSOLE_REFRESH": "1", **extra}
        with log_path.open("wb") as log:
            process = spawn([sys.executable, "-m", "service", "console", "--port", str(port)], env=full_env,
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        console = cls(f"http://127.0.0.1:{port}", process, log_path, archive_dir, passwords)

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the console exited with {process.returncode}:\n{console.log()}")
            try:
                return httpx.get(console.url + "/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 30, "the console to answer /healthz", interval=0.1)
        return console

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def http(self) -> HttpSession:
        return HttpSession(self)


class HttpSession:
    """A plain-HTTP client of the console that keeps its cookies (what a script or a forger sends)."""

    def __init__(self, console: ConsoleProcess) -> None:
        self.console = console
        self.client = httpx.Client(base_url=console.url, timeout=30, follow_redirects=False)

    def login(self, user: str, password: str | None = None) -> httpx.Response:
        """GET the form, POST the credentials with its token; the response of the POST."""
        form = self.client.get("/login")
        token = _CSRF.search(form.text)
        assert token, form.text
        return self.client.post("/login", data={"username": user, "password": password or
                                                self.console.passwords[user], "csrf_token": token[1], "next": "/"})

    def csrf(self, path: str = "/") -> str:
        """The CSRF token of the session, read from a page."""
        page = self.client.get(path)
        assert page.status_code == 200, page.text
        token = _CSRF.search(page.text)
        assert token, page.text
        return token[1]

    def post(self, path: str, data: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return self.client.post(path, data=data, **kwargs)

    def close(self) -> None:
        self.client.close()


def launch_browser(playwright: Any) -> Any:
    """Debian's Chromium, headless, under Playwright."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def inject_dead_letters(vhost: Any, work_queue: str, count: int, task: str = "test.permanent",
                        reason: str = "permanent-error", exception: str = "service.errors.PermanentError",
                        message: str = "card declined") -> list[str]:
    """Put ``count`` dead letters of ``task`` in ``work_queue``'s dead-letter queue, as a worker leaves them
    (through the dead-letter exchange, confirmed); their task ids, in order."""
    conn = vhost.connection()
    ids = []
    try:
        channel = conn.channel()
        channel.confirm_select()
        for n in range(count):
            task_id = str(uuid.uuid4())
            ids.append(task_id)
            headers = {"id": task_id, "task": task, "retries": 0, "argsrepr": f"('secret-{n}',)",
                       h.REASON: reason, h.EXCEPTION_TYPE: exception, h.EXCEPTION_MESSAGE: f"{message} #{n}",
                       h.SOURCE_QUEUE: work_queue, h.DEAD_LETTERED_AT: datetime.now(UTC).isoformat()}
            channel.basic_publish(amqp.Message(json.dumps([[f"secret-{n}"], {}, {}]), content_type="application/json",
                                               content_encoding="utf-8", application_headers=headers,
                                               delivery_mode=2),
                                  exchange=queues.DEAD_LETTER_EXCHANGE, routing_key=work_queue)
        channel.close()
    finally:
        conn.close()
    return ids
