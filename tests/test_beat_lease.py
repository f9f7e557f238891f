"""Two beats, one schedule: the lease on the broker (service.beat), with real beat processes on the real broker.

An entry every INTERVAL seconds (tests/beat_entries.py, KIT_TEST_EVERY) sends
``test.record`` to the default queue. The test consumes that queue and notes
each message's arrival and its ``origin`` header (``gen<pid>@<host>``: the beat
process that sent it). The active beat is killed (kill -9) or hung (SIGSTOP)
while another stands by; the test checks that every interval has one send, from
the beat that holds the lease, and measures each takeover (from the kill to the
new beat's "took the schedule lease" line, both on this machine's clock).
"One send per interval" is checked on the gaps between sends: none under half an
interval (nothing sent twice), none over an interval plus the takeover bound
(so no interval is missed either: the bound is under two intervals).
"""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote
from zoneinfo import ZoneInfo

import amqp
import pytest

from service import queues
from service.beat import LEASE_HEARTBEAT_S, state
from tests.helpers import AMQP_HOST, AMQP_PORT, REPO, Beat, Vhost, management, management_delete, wait_until

#: Seconds between two sends of the test entry.
INTERVAL = 2.0
#: KIT_BEAT_LEASE_RETRY of the test's beats.
RETRY = 0.5
#: What a takeover may take beyond RETRY on a loaded 2-core machine: a few round trips, a process waking up.
SLACK = 0.75
#: A killed beat's lease is taken within this.
TAKEOVER_BOUND = RETRY + SLACK
#: A hung beat's lease is taken within this: the broker first misses its heartbeats (it gives up
#: between 2 and 3 heartbeat intervals after the last data).
HUNG_TAKEOVER_BOUND = 3 * LEASE_HEARTBEAT_S + RETRY + SLACK
TOOK = "beat: took the schedule lease"
STANDBY = "beat: standby: another beat holds the schedule lease"


class Sends:
    """The messages beat sends to the default queue, consumed as they arrive: (arrival time, sender's pid)."""

    def __init__(self, vhost: Vhost) -> None:
        self.items: list[tuple[float, int]] = []
        self._conn = vhost.connection()
        channel = self._conn.channel()
        channel.basic_consume("default", callback=self._arrived, no_ack=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="sends", daemon=True)
        self._thread.start()

    def _arrived(self, message: amqp.Message) -> None:
        origin = str(message.headers["origin"])  # gen<pid>@<host>
        self.items.append((time.time(), int(origin.removeprefix("gen").split("@")[0])))

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                self._conn.drain_events(timeout=0.1)
            except TimeoutError:
                pass

    def by(self, beat: Beat) -> list[float]:
        """Arrival times of what ``beat`` sent, oldest first."""
        return [when for when, pid in list(self.items) if pid == beat.pid]

    def wait_for_new(self, beat: Beat, count: int) -> float:
        """Wait until ``beat`` sent ``count`` more than it has now; returns the arrival of the last."""
        start = len(self.by(beat))
        wait_until(lambda: len(self.by(beat)) >= start + count, count * INTERVAL + 15,
                   f"{count} more sends by beat {beat.pid}", interval=0.02)
        return self.by(beat)[start + count - 1]

    def first_by(self, beat: Beat) -> float:
        """Wait for the first send of ``beat``; returns its arrival."""
        return min(wait_until(lambda: self.by(beat), INTERVAL + 15, f"a send by beat {beat.pid}", interval=0.02))

    def close(self) -> list[tuple[float, int]]:
        """Stop consuming; every send, oldest first."""
        self._stop.set()
        self._thread.join(5)
        self._conn.close()
        return sorted(self.items)


def logged_at(line: str) -> float:
    """The time of a beat log line (``[2026-01-01 12:00:00,123: INFO/MainProcess] ...``, local time)."""
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def kill_at(beat: Beat, moment: float, how: Callable[[], None]) -> float:
    """Run ``how`` (kill or pause ``beat``) at ``moment`` (time.time()); returns when it was done."""
    time.sleep(max(0.0, moment - time.time()))  # the phase of the kill in the interval, chosen on purpose
    done_at = time.time()
    how()
    return done_at


@pytest.fixture
def start_beat(kit_env: dict[str, str], topology: None, tmp_path: Path) -> Iterator[Callable[[str], Beat]]:
    """Start a real beat (each with its own schedule file) scheduling the test entry; all stopped at the end."""
    started: list[Beat] = []

    def start(name: str) -> Beat:
        state_dir = tmp_path / f"beat-{name}"
        state_dir.mkdir()
        env = dict(kit_env, KIT_TASK_MODULES="tests.worker_tasks,tests.beat_entries", KIT_TEST_EVERY=str(INTERVAL),
                   KIT_BEAT_LEASE_RETRY=str(RETRY), KIT_STATE_DIR=str(state_dir))
        beat = Beat(env, tmp_path / f"beat-{name}.log")
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.stop()


def check_one_send_per_interval(sends: list[tuple[float, int]], max_gap: float) -> list[float]:
    """No two sends closer than half an interval, none further apart than ``max_gap``; returns the gaps."""
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(sends)]
    assert gaps, sends
    assert min(gaps) >= INTERVAL / 2, f"sent twice: gaps {[round(g, 3) for g in gaps]}"
    assert max(gaps) <= max_gap, f"a gap beyond the takeover: gaps {[round(g, 3) for g in gaps]}"
    return gaps


def test_killing_the_active_beat_twice_keeps_one_send_per_interval(vhost, start_beat):
    sends = Sends(vhost)
    first = start_beat("a")
    first.wait_for_log(TOOK, 30)
    standby = start_beat("b")
    standby.wait_for_log(STANDBY, 30)
    chain, takeovers, gaps_at_takeover = [first], [], []
    active = first
    # Killed early in an interval (the next beat is in time for the next send), then just before a
    # send is due (the next beat takes over after it was due and sends it at once).
    for phase, successor in ((0.6, "c"), (1.9, None)):
        last_send = sends.wait_for_new(active, 5)
        killed_at = kill_at(active, last_send + phase, active.kill)
        took = standby.wait_for_log(TOOK, TAKEOVER_BOUND + 10)
        takeovers.append(logged_at(took) - killed_at)
        gaps_at_takeover.append(sends.first_by(standby) - last_send)
        active = standby
        chain.append(active)
        if successor:
            standby = start_beat(successor)
            standby.wait_for_log(STANDBY, 30)
    sends.wait_for_new(active, 5)
    for beat in chain:
        beat.stop()
    everything = sends.close()

    print(f"\ntakeovers after kill -9: {', '.join(f'{t:.3f}s' for t in takeovers)}; gaps across them: "
          f"{', '.join(f'{g:.3f}s' for g in gaps_at_takeover)}")
    assert all(t <= TAKEOVER_BOUND for t in takeovers), takeovers
    gaps = check_one_send_per_interval(everything, INTERVAL + TAKEOVER_BOUND)
    print(f"{len(everything)} sends, gaps {min(gaps):.3f}s to {max(gaps):.3f}s")
    # One sender at a time, in the order the lease passed: a, then b, then c; each only once it held the lease.
    assert [pid for pid, _ in itertools.groupby(pid for _, pid in everything)] == [b.pid for b in chain]
    for beat in chain[1:]:
        assert min(sends.by(beat)) >= logged_at(beat.wait_for_log(TOOK, 0)) - 0.05
    assert gaps_at_takeover[0] == pytest.approx(INTERVAL, abs=0.5), "killed early: the next beat sends on time"


def test_a_hung_active_beat_loses_the_lease_by_heartbeat_and_sends_nothing_when_it_wakes(vhost, start_beat):
    sends = Sends(vhost)
    hung = start_beat("a")
    hung.wait_for_log(TOOK, 30)
    standby = start_beat("b")
    standby.wait_for_log(STANDBY, 30)
    last_send = sends.wait_for_new(hung, 2)
    paused_at = kill_at(hung, last_send + 0.6, hung.pause)
    took = standby.wait_for_log(TOOK, HUNG_TAKEOVER_BOUND + 10)
    takeover = logged_at(took) - paused_at
    sends.wait_for_new(standby, 2)
    hung.resume()
    lost = hung.wait_for_log("beat: lost the schedule lease", 15)
    sends.wait_for_new(standby, 2)
    hung.stop()
    standby.stop()
    everything = sends.close()

    print(f"\ntakeover of a hung beat (SIGSTOP): {takeover:.3f}s; it noticed {logged_at(lost) - paused_at:.3f}s "
          f"after it hung: {lost.split('] ', 1)[1]}")
    assert 2 * LEASE_HEARTBEAT_S - SLACK <= takeover <= HUNG_TAKEOVER_BOUND, takeover
    assert max(sends.by(hung)) < paused_at, "the hung beat sent after it woke up"
    check_one_send_per_interval(everything, takeover + INTERVAL + SLACK)


# -- the state on the broker ---------------------------------------------------------------------


def test_the_schedule_state_reads_back_what_was_written_and_refuses_anything_else():
    local = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=ZoneInfo("Asia/Kolkata"))
    read = state.decode(state.encode({"a": local, "naive": datetime(2026, 1, 1)}, "host/1"))
    assert read.last_run_at == {"a": local, "naive": datetime(2026, 1, 1, tzinfo=UTC)} and read.by == "host/1"
    good = json.loads(state.encode({"a": local}, "host/1"))
    unwritten = {k: v for k, v in good.items() if k != "written_at"}
    for bad in (b"", b"not json", b"[]", json.dumps({**good, "format": "other/1"}), json.dumps(unwritten),
                json.dumps({**good, "last_run_at": ["a"]}), json.dumps({**good, "last_run_at": {"a": "yesterday"}}),
                json.dumps({**good, "last_run_at": {"a": 5}})):
        with pytest.raises(state.StateUnreadable, match="is no schedule state"):
            state.decode(bad)


def _leave_state(vhost: Vhost, body: bytes) -> None:
    """Put ``body`` in the schedule state queue, as an earlier beat (or someone else) would have."""
    conn = vhost.connection()
    try:
        channel = state.declare(conn.channel, "classic")
        channel.basic_publish_confirm(amqp.Message(body, delivery_mode=2), queues.BEAT_STATE_EXCHANGE,
                                      state.ROUTING_KEY, confirm_timeout=10)
    finally:
        conn.close()


@pytest.mark.parametrize(("last_run", "says", "first_send_after"), [
    (timedelta(hours=-1), "last runs from the broker's schedule state", 0.0),  # overdue: sent at once, once
    (timedelta(days=1), "last runs from the broker's schedule state", INTERVAL),  # in the future: read as now
    (None, "is no schedule state: Expecting", INTERVAL),  # unreadable: every entry counts as run now
], ids=["overdue", "future", "unreadable"])
def test_a_beat_that_takes_the_lease_goes_on_from_the_state_on_the_broker(vhost, start_beat, last_run, says,
                                                                          first_send_after):
    now = datetime.now(UTC)
    _leave_state(vhost, b"{not json" if last_run is None else state.encode({"test.every": now + last_run}, "old/1"))
    sends = Sends(vhost)
    beat = start_beat("a")
    took = beat.wait_for_log(TOOK, 30)
    first = sends.first_by(beat)
    second = sends.wait_for_new(beat, 1)
    sends.close()

    assert says in took, took
    assert first - logged_at(took) == pytest.approx(first_send_after, abs=0.5), took
    assert second - first == pytest.approx(INTERVAL, abs=0.3), "one catch-up send, then the interval"


# -- a beat whose user lacks a right stops at once, with one line -------------------------------


@pytest.fixture
def user_with(vhost: Vhost) -> Iterator[Callable[[dict[str, str]], str]]:
    """Make a throwaway user with these permissions in the test's vhost; returns its broker URL."""
    made: list[str] = []

    def make(permissions: dict[str, str]) -> str:
        user, password = f"{vhost.name}-beat{len(made)}", secrets.token_urlsafe(16)
        management("PUT", f"/api/users/{quote(user, safe='')}", {"password": password, "tags": ""})
        made.append(user)
        management("PUT", f"/api/permissions/{quote(vhost.name, safe='')}/{quote(user, safe='')}", permissions)
        return f"pyamqp://{quote(user, safe='')}:{password}@{AMQP_HOST}:{AMQP_PORT}/{quote(vhost.name, safe='')}"

    yield make
    for user in made:
        management_delete(f"/api/users/{quote(user, safe='')}")


@pytest.mark.parametrize(("permissions", "lacks"), [
    ({"configure": "^$", "write": ".*", "read": ".*"}, "the configure right on queue 'kit.beat.lease'"),
    ({"configure": ".*", "write": ".*", "read": r"^kit\.beat$"}, "the read right on queue 'kit.beat.state'"),
    ({"configure": ".*", "write": r"^kit\.beat\.state$", "read": ".*"}, "the write right on exchange 'kit.beat'"),
], ids=["lease", "state-read", "state-write"])
def test_a_beat_without_a_right_it_needs_stops_with_one_line(kit_env, user_with, permissions, lacks):
    env = dict(kit_env, KIT_BROKER_URL=user_with(permissions))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "service", "beat"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("error: user ") and f"lacks {lacks}" in lines[0], lines[0]
    assert "python -m service broker provision" in lines[0], lines[0]
    assert time.monotonic() - started < 30
