"""The per-queue lock of replay, purge and import, and the record of who holds it, on the real broker.

Every test has its own vhost; holders are kombu connections of this process or,
to be killed with SIGKILL, a child process. Waits have deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from urllib.parse import quote

import amqp
import pytest

from service import deadletters as dl
from service import queues
from service.deadletters import Filters
from service.deadletters.lock import HOLDER_EXCHANGE, HOLDER_QUEUE_EXPIRES_MS, holder_queue_name
from service.settings import load
from service.topology import connect
from tests.helpers import AMQP_HOST, AMQP_PORT, REPO, Vhost, management, management_delete, wait_until
from tests.test_deadletters import Spec, letter_id, one_line_error, run_cli, seed

QUEUE = "default.dead"


@pytest.fixture
def conns(kit_env) -> Iterator[Callable[..., list]]:
    """Connections into the test's vhost (as its admin), closed at the end."""
    opened: list = []

    def more(count: int = 1) -> list:
        for _ in range(count):
            opened.append(connect(load()))
        return opened[-count:]

    yield more
    for conn in opened:
        conn.release()


def record_queue(vhost: Vhost, queue: str = QUEUE) -> tuple[int, int] | None:
    """(messages ready, consumers) of ``queue``'s record queue; None when it does not exist."""
    try:
        return vhost.counts(holder_queue_name(queue))
    except amqp.exceptions.NotFound:
        return None


def test_a_second_taker_is_refused_with_the_first_holder_named(conns, vhost):
    first, second, onlooker = conns(3)
    lock = dl.hold(first, QUEUE, "alice via the console (replay)")
    try:
        with pytest.raises(dl.QueueBusy) as refused:
            dl.hold(second, QUEUE, "bob@ops-1 pid 9 (dlq replay)")
        holder = refused.value.holder
        assert holder["holder"] == "alice via the console (replay)"
        assert (holder["host"], holder["pid"], holder["queue"]) == (socket.gethostname(), os.getpid(), QUEUE)
        assert str(refused.value) == (
            f"another replay, purge or import is working on {QUEUE!r}: alice via the console (replay) since "
            f"{holder['since']}; wait for it to finish (its lock is released when it ends or its process dies)")
        # Anyone may ask who holds it, as often as it likes: reading leaves the record in place.
        for _ in range(3):
            assert dl.holder_of(onlooker, QUEUE) == holder
        assert dl.is_busy(onlooker, QUEUE)
        # The holder's own connection holds it: nobody else does.
        assert dl.holder_of(first, QUEUE) is None and not dl.is_busy(first, QUEUE)
        # Other queues are free.
        assert dl.holder_of(onlooker, "bulk.dead") is None
        lock_bulk = dl.hold(second, "bulk.dead")  # no holder given: this process
        assert dl.holder_of(onlooker, "bulk.dead")["holder"] == dl.process_holder()
        dl.release(lock_bulk, "bulk.dead")
        # The record queue: one copy ready for readers, one held by the holder, whose consumer keeps the
        # queue from expiring however long the lock is held.
        assert record_queue(vhost) == (1, 1)
    finally:
        dl.release(lock, QUEUE)
    # Released: the lock and the record are gone at once, and the next taker gets it.
    assert dl.holder_of(onlooker, QUEUE) is None and record_queue(vhost) is None
    dl.release(dl.hold(second, QUEUE, "bob"), QUEUE)


def test_taking_it_again_on_the_same_connection_renews_the_record(conns):
    first, onlooker = conns(2)
    outer = dl.hold(first, QUEUE, "outer")
    inner = dl.hold(first, QUEUE, "inner")
    assert dl.holder_of(onlooker, QUEUE)["holder"] == "inner"
    dl.release(inner, QUEUE)
    assert dl.holder_of(onlooker, QUEUE) is None
    dl.release(outer, QUEUE)  # released already: nothing happens
    first.channel().queue_declare("still-usable", auto_delete=True)  # the connection survived it all


def _holder_process(kit_env: dict[str, str], holder: str) -> subprocess.Popen:
    code = ("import sys; from service.settings import load; from service.topology import connect; "
            "from service import deadletters as dl; conn = connect(load()); "
            f"dl.hold(conn, {QUEUE!r}, sys.argv[1]); sys.stdin.read()")
    return subprocess.Popen([sys.executable, "-c", code, holder], env=kit_env, cwd=REPO, stdin=subprocess.PIPE,
                            start_new_session=True)


def test_a_holder_killed_frees_the_lock_and_its_stale_record_blocks_nothing(kit_env, conns, vhost):
    onlooker, taker = conns(2)
    process = _holder_process(kit_env, "carol via the console (purge)")
    try:
        held = wait_until(lambda: dl.holder_of(onlooker, QUEUE), 20, "the child to hold the lock")
        assert held["holder"] == "carol via the console (purge)" and held["pid"] == process.pid
        with pytest.raises(dl.QueueBusy, match="carol via the console"):
            dl.hold(taker, QUEUE)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    # The broker drops the exclusive lock with the connection; the dead holder's record stays behind
    # (its copy requeued, one kept) until the queue expires, unused, HOLDER_QUEUE_EXPIRES_MS later.
    wait_until(lambda: not dl.is_busy(onlooker, QUEUE), 20, "the broker to drop the dead holder's lock")
    assert record_queue(vhost) == (1, 0)
    assert HOLDER_QUEUE_EXPIRES_MS <= 5 * 60_000
    assert dl.holder_of(onlooker, QUEUE) is None  # the lock, not the record, says whether it is held
    lock = dl.hold(taker, QUEUE, "dave via the console (replay)")
    try:
        assert dl.holder_of(onlooker, QUEUE)["holder"] == "dave via the console (replay)"  # carol's is gone
        assert record_queue(vhost) == (1, 1)
        with pytest.raises(dl.QueueBusy, match="dave via the console"):
            dl.hold(onlooker, QUEUE)
    finally:
        dl.release(lock, QUEUE)


def test_records_that_are_not_a_holders_are_ignored(conns, vhost):
    holder, onlooker = conns(2)
    lock = dl.hold(holder, QUEUE, "erin")
    try:
        channel = onlooker.channel()
        channel.queue_purge(holder_queue_name(QUEUE))
        for body in (b"garbage", json.dumps({"holder": "mallory", "queue": "bulk.dead"}).encode()):
            channel.basic_publish_confirm(amqp.Message(body), HOLDER_EXCHANGE, QUEUE, confirm_timeout=10)
        channel.close()
        assert dl.holder_of(onlooker, QUEUE) == {"holder": None, "since": None, "host": None, "pid": None,
                                                 "queue": QUEUE}
        with pytest.raises(dl.QueueBusy, match="its holder left no record of who it is") as refused:
            dl.hold(onlooker, QUEUE)
        assert refused.value.holder is None
    finally:
        dl.release(lock, QUEUE)


def test_a_user_who_may_not_write_the_record_still_takes_the_lock(vhost, conns, caplog):
    """The lock is the truth: without the rights on the record, the lock works and is nameless."""
    user, password = f"{vhost.name}-locker", "a-locker-password-42"
    management("PUT", f"/api/users/{quote(user, safe='')}", {"password": password, "tags": ""})
    management("PUT", f"/api/permissions/{quote(vhost.name, safe='')}/{quote(user, safe='')}",
               {"configure": f"^{queues.lock_queue_name(QUEUE)}$".replace(".", "\\."), "write": "^$", "read": "^$"})
    locker = connect(replace(load(), broker_url=f"pyamqp://{user}:{password}@{AMQP_HOST}:{AMQP_PORT}/{vhost.name}"))
    [onlooker] = conns()
    try:
        lock = dl.hold(locker, QUEUE, "frank")
        assert "could not record its holder" in caplog.text
        with pytest.raises(dl.QueueBusy, match="left no record"):
            dl.hold(onlooker, QUEUE)
        dl.release(lock, QUEUE)  # on a fresh channel of the same connection: the lock is the connection's
        assert not dl.is_busy(onlooker, QUEUE)
    finally:
        locker.release()
        management_delete(f"/api/users/{quote(user, safe='')}")


def test_an_operation_that_cannot_start_gives_the_lock_back(kit_env, conns):
    """A long-lived connection (the console's) must not keep a lock when a replay or purge fails to start."""
    [conn, onlooker] = conns(2)  # no topology: the dead-letter queue does not exist
    for operation in (lambda: dl.replay(conn, load(), QUEUE, Filters(), holder="gina"),
                      lambda: dl.purge(conn, QUEUE, Filters(), holder="gina")):
        with pytest.raises(dl.DeadLetterError, match="does not exist"):
            operation()
        assert not dl.is_busy(onlooker, QUEUE)


def test_console_and_cli_never_work_on_a_queue_at_once(kit_env, topology, conns, vhost):
    seed(vhost, [Spec("l1", "test.record")])
    [console] = conns()
    lock = dl.hold(console, QUEUE, "alice via the console (replay)")
    try:
        for args in (("replay", "-q", "default"), ("purge", "-q", "default", "--yes")):
            line = one_line_error(run_cli(kit_env, *args))
            assert "another replay, purge or import is working on 'default.dead': alice via the console " \
                   "(replay) since 20" in line, line
        # list works meanwhile, and says who holds the queue (whose walk would hide the letters it holds).
        listed = run_cli(kit_env, "list", "-q", "default", "--json")
        assert listed.returncode == 0 and [m["id"] for m in json.loads(listed.stdout)] == [letter_id("l1")]
        assert listed.stderr.startswith("warning: alice via the console (replay) since 20")
        assert "holds default.dead" in listed.stderr
    finally:
        dl.release(lock, QUEUE)
    assert vhost.depth(QUEUE) == 1  # nothing moved meanwhile
    # Released, the console's replay (as it calls the library) runs.
    outcome = dl.replay(console, load(), QUEUE, Filters(ids=(letter_id("l1"),)), holder="alice via the console")
    assert [d.id for d in outcome.taken] == [letter_id("l1")]
