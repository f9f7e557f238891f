"""A throwaway Redis for tests: Debian's ``redis-server`` on a free port, no persistence, bound to the run.

``TestRedis.start(directory)`` starts one server for the whole test run (the
session fixture ``redis_server`` in tests/conftest.py) and ``url_for_test()``
hands each test its own, emptied database, so tests never see each other's
keys. The server is killed when the run ends, also when pytest is killed
(``spawn`` binds it to the run).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from harness.processes import spawn
from harness.waiting import wait_until

__all__ = ["REDIS_DATABASES", "TestRedis", "free_port"]

#: Databases the test server offers; each test takes the next one (and empties it), cycling.
REDIS_DATABASES = 1024
#: Seconds the server may take to accept connections.
START_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TestRedis:
    """A running test ``redis-server``: its port, process and the databases handed out so far."""

    __test__ = False  # not a pytest test class

    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    _databases: itertools.count = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def start(cls, directory: Path, timeout: float = START_TIMEOUT) -> TestRedis:
        """Start ``redis-server`` on a free port with its files in ``directory``; fail after ``timeout``."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise AssertionError("redis-server is not installed (apt-get install redis-server)")
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(directory), "--databases", str(REDIS_DATABASES), "--protected-mode", "yes",
                "--logfile", str(directory / "redis.log")]
        process = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = cls(port=port, process=process, directory=directory)
        try:
            wait_until(server._answers, timeout, f"redis-server to answer on port {port}", interval=0.05)
        except BaseException:
            server.stop()
            raise
        return server

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            log = (self.directory / "redis.log")
            text = log.read_text(errors="replace") if log.exists() else ""
            raise AssertionError(f"redis-server exited with {self.process.returncode}:\n{text}")
        try:
            return bool(self.client(0).ping())
        except redis.exceptions.RedisError:
            return False

    def url(self, db: int = 0) -> str:
        """The ``redis://`` URL of database ``db``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A client of database ``db`` with short timeouts."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5, socket_connect_timeout=2)

    def url_for_test(self) -> str:
        """A database no test of this run used yet (cycling after REDIS_DATABASES - 1), emptied; its URL."""
        db = next(self._databases) % REDIS_DATABASES or 1
        self.client(db).flushdb()
        return self.url(db)

    def stop(self) -> None:
        """Kill the server (its data is thrown away: nothing is persisted)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
