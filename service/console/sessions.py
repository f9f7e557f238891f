"""Logins: server-side sessions with their CSRF token, and the limit on failed logins.

A session is a random token (the cookie) mapped, in the console's memory, to
the user, role and CSRF token. It ends after ``ttl`` seconds without use, at
logout, and when the console restarts. Nothing about the user is in the cookie.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

#: Failed logins allowed per client address, and per user name, within FAILURE_WINDOW_S.
MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0
#: Sessions kept at most (the oldest is dropped): bounds the memory a flood of logins takes.
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One login: who, which role, its CSRF token, when it was last used."""

    token: str
    user: str
    role: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_seen: float = field(default_factory=time.monotonic)


class Sessions:
    """The console's sessions (thread-safe)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, user: str, role: str) -> Session:
        """A new session for ``user``."""
        session = Session(secrets.token_urlsafe(32), user, role)
        with self._lock:
            self._drop_expired()
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        """The live session of ``token`` (its use renews it), or None."""
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            now = time.monotonic()
            if session is None:
                return None
            if now - session.last_seen > self.ttl:
                del self._sessions[token]
                return None
            session.last_seen = now
            return session

    def close(self, token: str | None) -> None:
        """End the session of ``token`` (logout)."""
        with self._lock:
            self._sessions.pop(token or "", None)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for token in [t for t, s in self._sessions.items() if now - s.last_seen > self.ttl]:
            del self._sessions[token]


class LoginLimiter:
    """Refuses logins from an address, or for a user name, after MAX_FAILURES failures in FAILURE_WINDOW_S."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login for ``keys`` (address, user name) is allowed again; 0 when it is now."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in keys:
                failures = self._recent(key, now)
                if len(failures) >= self.max_failures:
                    wait = max(wait, failures[0] + self.window - now)
        return wait

    def failed(self, *keys: str) -> None:
        """Count a failed login against each of ``keys``."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) > MAX_SESSIONS:  # forget quiet keys so a scan cannot grow this forever
                for key in [k for k, v in self._failures.items() if not v or v[-1] < now - self.window]:
                    del self._failures[key]

    def succeeded(self, *keys: str) -> None:
        """Forget the failures of ``keys``."""
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] < now - self.window:
            failures.popleft()
        return failures
