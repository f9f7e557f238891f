"""Real Prometheus, Alertmanager, celery-exporter and a webhook receiver for tests.

Every process listens on a free loopback port, keeps its data in the test's
temporary directory and is stopped by ``close()``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.helpers import REPO, spawn, wait_until

EXPORTER_PYTHON = REPO / ".venv-exporter" / "bin" / "python"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: Any = None, timeout: float = 5) -> Any:
    """GET (or POST ``data`` as JSON) and decode the JSON answer."""
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class Process:
    """A background process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = spawn(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


class Prometheus(Process):
    """A real Prometheus on a free port."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("prometheus", [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ], workdir)

    def wait_ready(self, timeout: float = 60) -> Prometheus:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"prometheus exited:\n{self.log()}")
            try:
                return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
            except OSError:
                return False
        wait_until(ready, timeout, "prometheus to be ready", interval=0.2)
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises AssertionError naming the query when Prometheus refuses it."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            answer = http_json(url)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"query {expr!r} refused: {exc.read().decode(errors='replace')}") from None
        return answer["data"]["result"]

    def targets_up(self) -> dict[str, bool]:
        """job -> every target of the job is up."""
        active = http_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]
        jobs: dict[str, bool] = {}
        for target in active:
            job = target["labels"]["job"]
            jobs[job] = jobs.get(job, True) and target["health"] == "up"
        return jobs


class Exporter(Process):
    """danihodovic/celery-exporter from its own virtual environment."""

    def __init__(self, broker_url: str, queues: list[str], workdir: Path, worker_timeout: int = 5,
                 purge_after: int = 10) -> None:
        self.port = free_port()
        super().__init__("celery-exporter", [
            str(EXPORTER_PYTHON), "-c", "from src.cli import cli; cli()",
            "--broker-url", broker_url, "--port", str(self.port), "--host", "127.0.0.1",
            "--queues", ",".join(queues), "--worker-timeout", str(worker_timeout),
            "--purge-offline-worker-metrics", str(purge_after), "--accept-content", "json",
        ], workdir)

    def wait_ready(self, timeout: float = 60) -> Exporter:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"celery-exporter exited:\n{self.log()}")
            try:
                # A scrape asks the workers over the broker (two 1 s inspect calls).
                return b"celery_queue_length" in urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/metrics", timeout=15).read()
            except OSError:
                return False
        wait_until(ready, timeout, "celery-exporter to serve metrics", interval=0.3)
        return self


class WebhookReceiver:
    """Collects the JSON bodies POSTed to it (Alertmanager's webhook receiver)."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = raw.decode(errors="replace")
                outer.received.append((time.monotonic(), self.path, payload))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def notifications(self, path: str | None = None) -> list[tuple[float, Any]]:
        return [(t, p) for t, pth, p in self.received if path is None or pth == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
