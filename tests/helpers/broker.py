"""The test broker (``harness.broker``) and the sweep of the vhosts a killed test run left behind."""

from __future__ import annotations

import time

from harness.broker import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    AMQP_HOST,
    AMQP_PORT,
    MANAGEMENT_URL,
    REPO,
    TEST_VHOST_PREFIX,
    Vhost,
    delete_vhost,
    management,
    management_delete,
    rabbitmqctl,
)

__all__ = [
    "ADMIN_PASSWORD", "ADMIN_USER", "AMQP_HOST", "AMQP_PORT", "MANAGEMENT_URL", "REPO", "STALE_VHOST_AGE",
    "TEST_VHOST_PREFIX", "Vhost", "delete_vhost", "management", "management_delete", "rabbitmqctl",
    "sweep_stale_vhosts",
]

#: A test vhost older than this belongs to a run that died before its teardown.
STALE_VHOST_AGE = 3 * 3600



def sweep_stale_vhosts(max_age: float = STALE_VHOST_AGE, now: float | None = None) -> list[str]:
    """Delete the test vhosts that a killed test run left behind; return their names.

    Only vhosts whose name carries a creation time older than ``max_age`` are
    touched, so a test run going on beside this one keeps its vhosts. Does
    nothing when the management API cannot be reached (unit tests without a broker).
    """
    now = time.time() if now is None else now
    try:
        names = [v["name"] for v in management("GET", "/api/vhosts")]
    except OSError:  # URLError included
        return []
    stale = []
    for name in names:
        created = name.removeprefix(TEST_VHOST_PREFIX).split("-")[0] if name.startswith(TEST_VHOST_PREFIX) else ""
        if created.isdigit() and now - int(created) > max_age:
            delete_vhost(name)
            stale.append(name)
    return stale
