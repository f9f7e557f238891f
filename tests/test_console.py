"""The dead-letter console in a real browser: Debian's Chromium under Playwright, a real console process,
a real broker and a real worker that made the dead letters.

An operator filters by task and reason, opens a letter, dry-runs a replay of exactly 50, confirms, watches
the progress (across a reload) and the broker then holds exactly those 50 in the work queue and the rest,
in order, in the dead-letter queue. A viewer sees no replay or purge controls. A purge writes its archive
first; the downloaded archive, imported with the CLI, gives back the same messages byte for byte. Every
page visited is saved as a screenshot under test-output/console/.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.client import Publisher
from tests.helpers import REPO, wait_until
from tests.helpers.console import SCREENSHOTS, ConsoleProcess, launch_browser

pytestmark = pytest.mark.broker
playwright_api = pytest.importorskip("playwright.sync_api")

#: Seconds the worker may take to dead-letter the test's tasks (fail_always retries twice, backoff 0.2-1 s).
DEAD_LETTER_TIMEOUT = 60
#: Seconds a page may take to show what the test waits for (the console reads the queues every second).
PAGE_TIMEOUT_MS = 30_000


def _letters_in(vhost: Any, queue: str) -> list[dict[str, Any]]:
    """Every message of ``queue`` (id, body, headers, properties), in order, left in place (read unacked)."""
    conn = vhost.connection()
    try:
        channel = conn.channel()
        channel.auto_decode = False
        seen = []
        while (message := channel.basic_get(queue, no_ack=False)) is not None:
            headers = dict(message.properties.get("application_headers") or {})
            seen.append({"id": headers.get("id"), "body": bytes(message.body), "headers": headers,
                         "properties": {k: v for k, v in message.properties.items() if k != "application_headers"}})
        channel.close()  # requeues them all, in their order
        return seen
    finally:
        conn.close()


@pytest.fixture
def dead_letters(kit_env: dict[str, str], vhost: Any, start_worker: Any) -> dict[str, list[str]]:
    """100 dead letters in default.dead made by a real worker, in a known order; the worker is stopped after.

    50 of test.permanent (permanent-error), 30 of test.declared_permanent (permanent-error) and 20 of
    test.fail_always (retries-exhausted), interleaved.
    """
    worker = start_worker(queues=("default",), concurrency=1)
    ids: dict[str, list[str]] = {"test.permanent": [], "test.declared_permanent": [], "test.fail_always": []}
    plan = [("test.permanent", 5), ("test.declared_permanent", 3), ("test.fail_always", 2)] * 10
    with Publisher() as publisher:
        for task, n in plan:
            for _ in range(n):
                ids[task].append(publisher.publish(task, args=[f"m-{uuid.uuid4().hex[:8]}"], queue="default"))
    wait_until(lambda: vhost.depth("default.dead") >= 100, DEAD_LETTER_TIMEOUT, "100 dead letters in default.dead")
    worker.stop()
    return ids


@pytest.fixture
def console(kit_env: dict[str, str], tmp_path: Path) -> Iterator[ConsoleProcess]:
    started = ConsoleProcess.start(kit_env, tmp_path, {"olga": "operator", "victor": "viewer"})
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        chromium = launch_browser(playwright)
        yield chromium
        chromium.close()


class Pages:
    """One logged-in browser tab with its screenshots."""

    def __init__(self, browser: Any, console: ConsoleProcess, user: str) -> None:
        self.context = browser.new_context(base_url=console.url, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(PAGE_TIMEOUT_MS)
        self.console = console
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.goto("/")
        assert "/login" in self.page.url
        self.page.fill("input[name=username]", user)
        self.page.fill("input[name=password]", console.passwords[user])
        self.page.click("button[type=submit]")
        self.page.wait_for_url(console.url + "/")

    def shot(self, name: str) -> None:
        tab_shot(self.page, name)

    def wait_for_count(self, queue: str, count: int) -> None:
        """Reload the overview until the snapshot of ``queue`` shows ``count`` letters."""
        def shows() -> bool:
            self.page.goto("/")
            return self.page.inner_text(f"#dead-letter-queues tr[data-queue='{queue}'] td.count").split()[0] == str(
                count)
        wait_until(shows, PAGE_TIMEOUT_MS / 1000, f"the overview to show {count} letters in {queue}", interval=0.5)

    def close(self) -> None:
        self.context.close()


def test_operator_filters_dry_runs_and_replays_exactly_fifty(browser: Any, console: ConsoleProcess, vhost: Any,
                                                            dead_letters: dict[str, list[str]]) -> None:
    before = [m["id"] for m in _letters_in(vhost, "default.dead")]
    assert len(before) == 100
    tab = Pages(browser, console, "olga")
    page = tab.page
    tab.wait_for_count("default.dead", 100)
    breakdown = page.inner_text("section.breakdown[data-queue='default.dead']")
    for line in ("test.permanent 50", "permanent-error 80", "retries-exhausted 20"):
        assert line in breakdown, breakdown
    tab.shot("overview")

    # The list, filtered by task and reason through the form.
    page.goto("/letters")
    page.select_option("select[name=queue]", "default.dead")
    page.fill("input[name=task]", "test.permanent")
    page.fill("input[name=reason]", "permanent-error")
    page.click("#filters button[type=submit]")
    page.wait_for_selector("#total")
    assert page.inner_text("#total") == "50"
    listed = page.eval_on_selector_all("#letters tbody tr", "rows => rows.map(r => r.dataset.id)")
    assert listed == dead_letters["test.permanent"]  # one page of 50, in queue order
    tab.shot("letters")

    # One letter: reason, exception, traceback; the arguments only on request.
    page.click(f"#letters a[href$='/{listed[0]}']")
    page.wait_for_selector("#letter-fields")
    assert page.inner_text("td[data-field=reason]") == "permanent-error"
    assert page.inner_text("td[data-field=task]") == "test.permanent"
    assert page.is_visible("#traceback") and page.is_visible("#arguments-hidden")
    assert "argsrepr" not in page.inner_text("#headers") or "<hidden>" in page.inner_text("#headers")
    page.click("#show-arguments")
    page.wait_for_selector("#args")
    assert "m-" in page.inner_text("#args")
    tab.shot("letter")

    # Replay: the dry run names exactly 50, the confirmation names the count, the progress survives a reload.
    page.go_back()
    page.go_back()
    page.wait_for_selector("#replay-link")
    page.click("#replay-link")
    page.fill("#rate", "20")
    tab.shot("replay-form")
    page.click("#dry-run")
    page.wait_for_selector("#plan-count")
    assert page.inner_text("#plan-count") == "50"
    assert "50 into default" in page.inner_text("#plan-summary")
    assert page.inner_text("#confirm") == "Replay 50 dead letter(s)"
    assert vhost.depth("default.dead") == 100  # the dry run changed nothing
    tab.shot("replay-dry-run")
    page.click("#confirm")
    page.wait_for_url("**/jobs/*")
    seen: list[int] = []

    def progressed() -> bool:
        seen.append(int(page.inner_text("#job-done")))
        return page.inner_text("#job-state") == "done"

    page.reload()  # the job lives in the console, not in the page
    wait_until(progressed, 60, "the replay to finish on its page", interval=0.2)
    assert page.inner_text("#count-moved") == "50" and page.inner_text("#count-failed") == "0"
    assert any(0 < n < 50 for n in seen), seen  # the page followed the progress
    tab.shot("replay-done")
    tab.close()

    moved = [m["id"] for m in _letters_in(vhost, "default")]
    assert moved == dead_letters["test.permanent"]
    kept = [m["id"] for m in _letters_in(vhost, "default.dead")]
    assert kept == [i for i in before if i not in set(dead_letters["test.permanent"])]
    assert '"action": "replay"' in console.log() and '"user": "olga"' in console.log()


def test_viewer_sees_no_controls(browser: Any, console: ConsoleProcess, vhost: Any,
                                 dead_letters: dict[str, list[str]]) -> None:
    tab = Pages(browser, console, "victor")
    tab.wait_for_count("default.dead", 100)
    page = tab.page
    assert page.locator("a[href^='/replay']").count() == 0 and page.locator("a[href^='/purge']").count() == 0
    page.goto("/letters?queue=default.dead")
    assert page.inner_text("#total") == "100"
    assert page.locator("#replay-link, #purge-link, #export-link").count() == 0
    page.click("#letters tbody tr:first-child td a")
    page.wait_for_selector("#letter-fields")
    assert page.locator("#show-arguments").count() == 0 and "operators can see them" in page.inner_text(
        "#arguments-hidden")
    tab.shot("letter-viewer")
    # Forged from the viewer's own browser: its session cookie and its own CSRF token, still 403.
    token = page.get_attribute("input[name=csrf_token]", "value")
    forged = page.request.post("/replay/dry-run", form={"csrf_token": token, "queue": "default.dead"})
    assert forged.status == 403 and "operator role" in forged.text()
    assert page.request.post("/purge/preview", form={"csrf_token": token, "queue": "default.dead"}).status == 403
    assert page.request.post("/refresh", form={"next": "/"}).status == 403  # no CSRF token
    response = page.goto("/replay?queue=default.dead")
    assert response is not None and response.status == 403
    assert "operator role" in page.inner_text("#error-message")
    tab.shot("forbidden")
    tab.close()


def test_wrong_password_is_refused_then_rate_limited_in_the_browser(browser: Any, console: ConsoleProcess) -> None:
    context = browser.new_context(base_url=console.url)
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    for attempt in range(6):
        page.goto("/login")
        page.fill("input[name=username]", "olga")
        page.fill("input[name=password]", "wrong-password-" + str(attempt))
        page.click("button[type=submit]")
        page.wait_for_selector("#login-error")
        expected = "Wrong user name or password." if attempt < 5 else "Too many failed logins"
        assert expected in page.inner_text("#login-error")
        if attempt == 0:
            tab_shot(page, "login-refused")
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", console.passwords["olga"])
    page.click("button[type=submit]")
    page.wait_for_selector("#login-error")
    assert "Too many failed logins" in page.inner_text("#login-error")  # even the right password, for now
    context.close()


def tab_shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_purge_writes_the_archive_first_and_import_restores_it_byte_for_byte(
        browser: Any, console: ConsoleProcess, vhost: Any, kit_env: dict[str, str], tmp_path: Path,
        dead_letters: dict[str, list[str]]) -> None:
    original = _letters_in(vhost, "default.dead")
    retried = [m for m in original if m["headers"].get("task") == "test.fail_always"]
    assert len(retried) == 20
    tab = Pages(browser, console, "olga")
    tab.wait_for_count("default.dead", 100)
    page = tab.page
    page.goto("/letters?queue=default.dead&reason=retries-exhausted")
    assert page.inner_text("#total") == "20"
    page.click("#purge-link")
    page.click("#dry-run")
    page.wait_for_selector("#plan-count")
    assert page.inner_text("#plan-count") == "20"
    assert page.inner_text("#confirm") == "Archive and purge 20 dead letter(s)"
    tab.shot("purge-preview")
    page.click("#confirm")
    page.wait_for_url("**/jobs/*")
    page.wait_for_selector("#job[data-state=done]")
    assert page.inner_text("#count-purged") == "20"
    tab.shot("purge-done")
    with page.expect_download() as download_info:
        page.click("#archive-link")
    archive = tmp_path / "downloaded.jsonl"
    download_info.value.save_as(archive)
    tab.close()
    assert len(archive.read_text().splitlines()) == 20
    remaining = _letters_in(vhost, "default.dead")
    assert [m["id"] for m in remaining] == [m["id"] for m in original if m not in retried]

    done = subprocess.run([sys.executable, "-m", "service", "dlq", "import", str(archive)], env=kit_env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "imported 20 dead letter(s)" in done.stdout
    back = _letters_in(vhost, "default.dead")[80:]
    assert [(m["body"], m["headers"], m["properties"]) for m in back] == [
        (m["body"], m["headers"], m["properties"]) for m in retried]
