"""``python -m service flower``: Flower behind basic auth, for real.

Without a good login file the command refuses to start, in one line that never
shows the password. With one, a real Flower (Celery's, on the test's vhost of
the real broker) refuses its pages and API without the login (401: listing
workers, revoking a task) and accepts them with it, while /healthcheck (compose's
health check) and /metrics answer without it; the password is in Flower's
environment, never on its command line.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.cli import flower as flower_cli
from service.settings import ConfigError
from tests.helpers import REPO, spawn, wait_until

#: A login as scripts/make-secrets.sh writes it: user kit, a random password, a trailing newline.
USER = "kit"


def _password() -> str:
    return "pw-" + uuid.uuid4().hex


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    """The caller's environment without its KIT_* and FLOWER_* settings, with ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIT_", "FLOWER_"))}
    env.update({"KIT_STATE_DIR": str(tmp_path / "state"), **values})
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", "flower", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- refusing to start


BAD_FILES = {
    "empty": ("", "is empty"),
    "blank lines": ("\n\n", "is empty"),
    "no colon": ("kit{password}\n", "is not user:password"),
    "no user": (":{password}\n", "is not user:password"),
    "no password": ("kit:\n", "is not user:password"),
    "two lines": ("kit:{password}\nops:{password}\n", "more than one line"),
    "a comma": ("kit:{password},x\n", "has a comma"),
    "a short password": ("kit:elevenchars\n", "the password has 11 characters; at least 12"),
    "a space in the user": ("k t:{password}\n", "the user name has a space"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_bad_login_file_stops_flower_in_one_line(case: str, tmp_path: Path) -> None:
    password = _password()
    content, expected = BAD_FILES[case]
    path = tmp_path / "flower_basic_auth"
    path.write_text(content.format(password=password))
    env = _env(tmp_path, KIT_FLOWER_AUTH_FILE=str(path))
    result = _run(env, "--port=1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: KIT_FLOWER_AUTH_FILE={str(path)!r}"), result.stderr
    assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert password not in result.stdout + result.stderr, "an error must not show the password"


def test_unset_or_missing_login_file_stops_flower(tmp_path: Path) -> None:
    unset = _run(_env(tmp_path))
    assert unset.returncode == 2 and unset.stderr.startswith("error: KIT_FLOWER_AUTH_FILE is not set"), unset.stderr
    assert unset.stderr.count("\n") == 1
    missing = _run(_env(tmp_path, KIT_FLOWER_AUTH_FILE=str(tmp_path / "nowhere")))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and missing.stderr.count("\n") == 1


def test_a_login_on_the_command_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flower_basic_auth"
    path.write_text(f"kit:{_password()}\n")
    for flag in ("--basic-auth=a:bcdefghijklmn", "--basic_auth=a:bcdefghijklmn"):
        result = _run(_env(tmp_path, KIT_FLOWER_AUTH_FILE=str(path)), flag)
        assert result.returncode == 2 and "would show the login" in result.stderr, result.stderr
        assert "bcdefghijklmn" not in result.stderr


def test_read_login_takes_one_line_and_passwords_with_colons(tmp_path: Path) -> None:
    path = tmp_path / "login"
    path.write_text("ops:pass:word:123\n")
    assert flower_cli.read_login(str(path)) == "ops:pass:word:123"
    with pytest.raises(ConfigError, match="not set"):
        flower_cli.read_login("")


# --------------------------------------------------------------------------- a real Flower


@dataclass
class RunningFlower:
    url: str
    password: str
    process: subprocess.Popen[bytes]
    log: Path

    def request(self, path: str, method: str = "GET", login: tuple[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        if login:
            request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_flower(kit_env: dict[str, str], tmp_path: Path) -> Iterator[RunningFlower]:
    """``python -m service flower`` on a free port, in the test's vhost, with a login file as make-secrets writes it."""
    password = _password()
    login_file = tmp_path / "flower_basic_auth"
    login_file.write_text(f"{USER}:{password}\n")
    port = _free_port()
    log = tmp_path / "flower.log"
    env = {k: v for k, v in kit_env.items() if not k.startswith("FLOWER_")}
    env["KIT_FLOWER_AUTH_FILE"] = str(login_file)
    env["FLOWER_UNAUTHENTICATED_API"] = "true"  # a stray switch must not open the API
    with log.open("wb") as out:
        process = spawn([sys.executable, "-m", "service", "flower", "--address=127.0.0.1", f"--port={port}"],
                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    flower = RunningFlower(f"http://127.0.0.1:{port}", password, process, log)

    def healthy() -> bool:
        assert process.poll() is None, f"flower exited with {process.returncode}:\n{log.read_text()}"
        try:
            return flower.request("/healthcheck")[0] == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 60, "flower's /healthcheck", interval=0.2)
        yield flower
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def test_flower_api_needs_the_login(running_flower: RunningFlower) -> None:
    flower = running_flower
    task_id = str(uuid.uuid4())
    wrong = (USER, flower.password[:-1] + "x")
    for path, method in (("/api/workers", "GET"), (f"/api/task/revoke/{task_id}", "POST"), ("/", "GET"),
                         ("/api/worker/shutdown/nobody@nowhere", "POST")):
        for login in (None, wrong, ("admin", flower.password)):
            status, _ = flower.request(path, method, login)
            assert status == 401, f"{method} {path} with {login and login[0]!r}: {status}, not refused"

    # With the login from the file: accepted.
    login = (USER, flower.password)
    status, body = flower.request("/api/workers", login=login)
    assert status == 200 and isinstance(json.loads(body), dict), body
    status, body = flower.request(f"/api/task/revoke/{task_id}", "POST", login)
    assert status == 200 and task_id in json.loads(body)["message"], body
    assert flower.request("/", login=login)[0] == 200

    # Compose's health check and Prometheus need no login.
    assert flower.request("/healthcheck") == (200, b"OK")
    assert flower.request("/metrics")[0] == 200


def test_a_refused_shutdown_leaves_the_worker_running(running_flower: RunningFlower, start_worker) -> None:
    """Without the login Flower's API cannot shut a real worker down; with it, it sees the worker."""
    worker = start_worker(queues=["default"], concurrency=1)
    name = worker.name.replace("%h", socket.gethostname())
    status, _ = running_flower.request(f"/api/worker/shutdown/{name}", "POST")
    assert status == 401
    login = (USER, running_flower.password)

    def listed() -> bool:
        status, body = running_flower.request("/api/workers?refresh=1&status=1", login=login)
        return status == 200 and json.loads(body).get(name) is True

    wait_until(listed, 30, f"flower to list {name} as online", interval=0.5)
    assert worker.process.poll() is None, "the worker stopped after a refused shutdown"


def test_the_password_never_reaches_the_command_line(running_flower: RunningFlower) -> None:
    pid = running_flower.process.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"flower" in cmdline and b"service.app" in cmdline, cmdline  # exec'd into Celery's Flower, same pid
    assert running_flower.password.encode() not in b" ".join(cmdline)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"FLOWER_BASIC_AUTH={USER}:{running_flower.password}".encode() in environ
    assert not any(v.startswith(b"FLOWER_UNAUTHENTICATED_API=") for v in environ)
    assert running_flower.password not in running_flower.log.read_text(errors="replace")
