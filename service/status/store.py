"""The kit's task states in Redis: which keys, what they hold, and how they are written and read.

A task's state is ONE key, Celery's own result key ``celery-task-meta-<id>``,
in Celery's meta format (``status``, ``result``, ``date_done``, ...). Celery's
writes (STARTED with the worker, PROGRESS and other ``update_state`` states,
SUCCESS with the result) and the kit's (QUEUED, RETRYING, DEAD-LETTERED,
EXPIRED, CANCELLED, REPLAYED, the KIT_STATUSES below) land on the same key, so
the last write wins and the order of writes is the order of events: the pool
writes before the worker's main process hears how the run ended, and the
main process writes the kit's state after that. Celery's FAILURE, RETRY and
REVOKED writes are dropped by the worker's backend (``service.status.backend``),
because the kit always records where such a task went. Every state key expires
after KIT_RESULT_EXPIRES. A cancel mark is a key of its own, ``kit-revoked-<id>``,
kept for MARK_EXPIRES_S + KIT_RESULT_EXPIRES (a task may wait up to ten years for
its countdown, then in a backlog): a mark must outlive the message it stops. Once
a worker dead-lettered the task as ``revoked`` it shortens the mark to
KIT_RESULT_EXPIRES (``end_mark``), enough to stop a redelivery of a message whose
ack was lost, so marks do not pile up for years.

Three kinds of calls: the best-effort writes of workers, publishers and replays
never raise and give up after a short timeout (after a failure they skip
Redis for PAUSE_AFTER_FAILURE_S, so a dead Redis costs one timeout, not one per
task); the cancel check of a worker (``has_mark``) never raises either, but is
asked every time, with its own MARK_CHECK_TIMEOUT_S and no pause (a pause would
let cancelled tasks run for its length after one slow write); the reads and
writes of ``status`` and ``revoke`` raise ResultBackendUnavailable in one line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis
from kombu.utils import json as kombu_json
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.errors import ResultBackendUnavailable
from service.settings import Settings, redact_url

logger = logging.getLogger(__name__)

#: Celery's key of a task's result (``celery.backends.base.KeyValueStoreBackend.task_keyprefix``).
KEY_PREFIX = "celery-task-meta-"
#: The cancel mark of a task (``service.status.revoke``).
REVOKE_PREFIX = "kit-revoked-"

#: The kit's own statuses in the result key (Celery's are PENDING, STARTED, SUCCESS, ... and
#: whatever a task passes to ``update_state``). CANCELLED, not Celery's REVOKED: Celery reads a
#: REVOKED result as an exception, which this record is not.
QUEUED = "QUEUED"
RETRYING = "RETRYING"
DEAD_LETTERED = "DEAD-LETTERED"
EXPIRED = "EXPIRED"
CANCELLED = "CANCELLED"
REPLAYED = "REPLAYED"
KIT_STATUSES = (QUEUED, RETRYING, DEAD_LETTERED, EXPIRED, CANCELLED, REPLAYED)
#: The stored statuses after which nothing more happens to a task (Celery's SUCCESS is one too).
FINAL_STATUSES = (DEAD_LETTERED, EXPIRED, CANCELLED, "SUCCESS")
#: What a replay may overwrite with REPLAYED: anything else means a worker already took the
#: replayed message (STARTED, PROGRESS, SUCCESS, RETRYING, a task's own state).
REPLAY_OVERWRITES = (QUEUED, DEAD_LETTERED, EXPIRED, CANCELLED, "FAILURE", "RETRY", "REVOKED", "PENDING")

#: What a cancel may overwrite with CANCELLED: a task that has not started (again) yet.
CANCEL_OVERWRITES = (QUEUED, RETRYING, REPLAYED, "PENDING")

#: Seconds a best-effort write may take (connect and answer) before it is given up.
BEST_EFFORT_TIMEOUT_S = 1.0
#: Seconds best-effort writes skip Redis after one failed: one timeout per outage, not one per task.
PAUSE_AFTER_FAILURE_S = 10.0
#: Seconds a worker's cancel check may take (connect and answer); asked before every task, never paused.
MARK_CHECK_TIMEOUT_S = 0.5
#: The longest countdown a task may carry (service.task_message.MAX_COUNTDOWN_S, not imported: that module
#: imports the publishers, which import this one). A cancel mark lives this plus KIT_RESULT_EXPIRES.
MARK_EXPIRES_S = 10 * 366 * 86400

# SET the meta ARGV[1] (expiry ARGV[2]) unless the key holds a status not in ARGV[4:], or (ARGV[3] not
# empty) an ``updated_at`` not older than ARGV[3] (ISO 8601 UTC with microseconds: compares as text).
_SET_UNLESS_LATER_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and type(decoded) == 'table' and decoded['status'] then
    local replaceable = false
    for i = 4, #ARGV do
      if decoded['status'] == ARGV[i] then replaceable = true end
    end
    if not replaceable then return 0 end
    local stamp = decoded['updated_at']
    if ARGV[3] ~= '' and type(stamp) == 'string' and stamp >= ARGV[3] then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def redis_url(settings: Settings) -> str | None:
    """KIT_RESULT_BACKEND when it is a Redis URL (redis:// or rediss://), else None."""
    url = settings.result_backend
    return url if urlsplit(url).scheme.lower() in ("redis", "rediss") else None


def task_key(task_id: str) -> str:
    """The result key of ``task_id``."""
    return KEY_PREFIX + task_id


def revoke_key(task_id: str) -> str:
    """The cancel-mark key of ``task_id``."""
    return REVOKE_PREFIX + task_id


def now_iso() -> str:
    """The current time in UTC, ISO 8601 with microseconds (one width, so stamps compare as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def encode_meta(task_id: str, status: str, details: dict[str, Any], *, name: str | None = None,
                worker: str | None = None) -> str:
    """A kit status as Celery's meta: ``details`` in ``result``, ``date_done`` for a final status."""
    stamp = now_iso()
    return kombu_json.dumps({
        "status": status,
        "result": details,
        "traceback": None,
        "children": [],
        "date_done": stamp if status in FINAL_STATUSES else None,
        "task_id": task_id,
        "name": name,
        "worker": worker,
        "updated_at": stamp,
    })


def decode_meta(raw: bytes | str | None) -> dict[str, Any] | None:
    """The meta of a result key (Celery's JSON, kombu's types included), or None for none or garbage."""
    if raw is None:
        return None
    try:
        meta = kombu_json.loads(raw)
    except (ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


class StateStore:
    """Reads and writes task states and cancel marks in the Redis of ``url``.

    ``timeout`` bounds each connect and each answer. Safe to share between
    threads; a forked child makes its own connections.
    """

    def __init__(self, url: str, expires: int, timeout: float) -> None:
        self.url = url
        self.expires = int(expires)
        self.mark_expires = MARK_EXPIRES_S + self.expires
        self.timeout = timeout
        self._client: redis.Redis | None = None
        self._check_client: redis.Redis | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._set_unless_later: Any = None
        ref = weakref.ref(self)
        # A forked child's copy of the lock may be held by a thread that does not exist there.
        os.register_at_fork(after_in_child=lambda: (store := ref()) is not None and store._new_lock())

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float | None = None) -> StateStore | None:
        """The store of KIT_RESULT_BACKEND, or None when that is no Redis URL."""
        url = redis_url(settings)
        if url is None:
            return None
        return cls(url, settings.result_expires,
                   timeout if timeout is not None else min(settings.connect_timeout, 10.0))

    def _connect(self, timeout: float) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                    retry=Retry(NoBackoff(), 0), health_check_interval=0)

    def _clients(self) -> tuple[redis.Redis, redis.Redis]:
        """This process's two clients: ``client``, and the cancel check's (MARK_CHECK_TIMEOUT_S at most)."""
        with self._lock:
            if self._client is None or self._check_client is None or self._pid != os.getpid():
                self._client = self._connect(self.timeout)
                self._check_client = self._connect(min(self.timeout, MARK_CHECK_TIMEOUT_S))
                self._pid = os.getpid()
                self._set_unless_later = self._client.register_script(_SET_UNLESS_LATER_SCRIPT)
            return self._client, self._check_client

    @property
    def client(self) -> redis.Redis:
        """This process's client (no retries of its own: the deadline is ``timeout``)."""
        return self._clients()[0]

    def unavailable(self, exc: BaseException) -> ResultBackendUnavailable:
        """The one-line error for a failed call."""
        return ResultBackendUnavailable(
            f"the result backend {redact_url(self.url)} did not answer within {self.timeout:g}s "
            f"({type(exc).__name__}: {exc}); is Redis running? (KIT_RESULT_BACKEND)")

    # -- strict: raise ResultBackendUnavailable --------------------------------------------

    def read(self, task_id: str) -> tuple[dict[str, Any] | None, bool]:
        """The stored meta of ``task_id`` (None when there is none) and whether it has a cancel mark."""
        try:
            raw, mark = self.client.mget([task_key(task_id), revoke_key(task_id)])
        except redis.RedisError as exc:
            raise self.unavailable(exc) from None
        return decode_meta(raw), mark is not None

    def cancel(self, task_id: str, details: dict[str, Any], *, name: str | None = None) -> None:
        """Set the cancel mark, and CANCELLED unless the task has started since (CANCEL_OVERWRITES);
        raises ResultBackendUnavailable."""
        try:
            client = self.client
            with client.pipeline(transaction=True) as pipe:
                pipe.set(revoke_key(task_id), now_iso(), ex=self.mark_expires)
                self._set_unless_later(keys=[task_key(task_id)],
                                       args=[encode_meta(task_id, CANCELLED, details, name=name), self.expires,
                                             "", *CANCEL_OVERWRITES], client=pipe)
                pipe.execute()
        except redis.RedisError as exc:
            raise self.unavailable(exc) from None

    def set_mark(self, task_id: str) -> None:
        """Set the cancel mark only; raises ResultBackendUnavailable."""
        try:
            self.client.set(revoke_key(task_id), now_iso(), ex=self.mark_expires)
        except redis.RedisError as exc:
            raise self.unavailable(exc) from None

    # -- best effort: never raise, False when it did not happen ------------------------------

    def _try(self, what: str, call: Any) -> Any:
        if time.monotonic() < self._paused_until:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - state is telemetry: the message's path goes on
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            logger.warning("could not %s in the result backend %s (%s: %s); task states are not recorded "
                           "for the next %gs", what, redact_url(self.url), type(exc).__name__, exc,
                           PAUSE_AFTER_FAILURE_S)
            return None

    def record(self, task_id: str, status: str, details: dict[str, Any], *, name: str | None = None,
               worker: str | None = None) -> bool:
        """Write a kit status, overwriting what is there; False when Redis failed (logged)."""
        def call() -> bool:
            self.client.set(task_key(task_id), encode_meta(task_id, status, details, name=name, worker=worker),
                            ex=self.expires)
            return True
        return bool(self._try(f"record {status} for task {task_id}", call))

    def record_queued(self, items: Sequence[tuple[str, str]]) -> bool:
        """QUEUED for each (task id, name) that has no state yet (SET NX); False when Redis failed."""
        def call() -> bool:
            with self.client.pipeline(transaction=False) as pipe:
                for task_id, name in items:
                    pipe.set(task_key(task_id), encode_meta(task_id, QUEUED, {}, name=name), nx=True,
                             ex=self.expires)
                pipe.execute()
            return True
        return bool(self._try(f"record {len(items)} queued task(s)", call))

    def record_replayed(self, items: Sequence[tuple[str, str]], since: str) -> bool:
        """REPLAYED for each (task id, name) unless a worker already wrote a later state: one not in
        REPLAY_OVERWRITES, or any state stamped at or after ``since`` (now_iso() taken before the replay's
        publish: a worker may have run and dead-lettered it again meanwhile); False on failure."""
        def call() -> bool:
            client = self.client
            with client.pipeline(transaction=False) as pipe:
                for task_id, name in items:
                    self._set_unless_later(keys=[task_key(task_id)],
                                           args=[encode_meta(task_id, REPLAYED, {}, name=name), self.expires,
                                                 since, *REPLAY_OVERWRITES], client=pipe)
                pipe.execute()
            return True
        return bool(self._try(f"record {len(items)} replayed task(s)", call))

    def clear_marks(self, task_ids: Iterable[str]) -> bool:
        """Remove the cancel marks of ``task_ids``; False when Redis failed."""
        keys = [revoke_key(task_id) for task_id in task_ids]
        if not keys:
            return True
        def call() -> bool:
            self.client.delete(*keys)
            return True
        return bool(self._try("clear cancel marks", call))

    def end_mark(self, task_id: str) -> bool:
        """The task was dead-lettered as revoked: keep its mark only KIT_RESULT_EXPIRES more (it still stops
        a redelivery of the message, should the ack have been lost); False when Redis failed."""
        def call() -> bool:
            self.client.expire(revoke_key(task_id), self.expires, lt=True)
            return True
        return bool(self._try(f"shorten the cancel mark of task {task_id}", call))

    def has_mark(self, task_id: str) -> bool | None:
        """Whether ``task_id`` has a cancel mark; None when Redis could not tell within MARK_CHECK_TIMEOUT_S.

        Asked anew every time (not paused by a failed write, nor pausing them). A failure is logged, with
        what the worker then does (``recorder.is_cancelled``: it runs the task).
        """
        try:
            return bool(self._clients()[1].exists(revoke_key(task_id)))
        except Exception as exc:  # noqa: BLE001 - an unknown cancel is the caller's to decide
            logger.warning("could not check the cancel mark of task %s in the result backend %s (%s: %s); "
                           "it runs: a cancel is not enforced while Redis does not answer", task_id,
                           redact_url(self.url), type(exc).__name__, exc)
            return None
