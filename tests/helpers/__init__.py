"""Helpers of the tests on a real RabbitMQ: the broker and its vhosts, processes, waiting.

What lives here: ``broker`` (``harness.broker``'s vhosts and management API,
and the sweep of vhosts a killed run left), ``processes`` (real worker and beat
processes of the kit) and ``waiting`` (``wait_until``, ``wait_for_run``). Import
the names below from ``tests.helpers``; the fixtures are in tests/conftest.py.

May import ``harness`` and ``service``; nothing outside tests/ imports it.
"""

from tests.helpers.broker import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    AMQP_HOST,
    AMQP_PORT,
    MANAGEMENT_URL,
    REPO,
    STALE_VHOST_AGE,
    TEST_VHOST_PREFIX,
    Vhost,
    delete_vhost,
    management,
    management_delete,
    rabbitmqctl,
    sweep_stale_vhosts,
)
from tests.helpers.processes import Beat, Worker, running_beat, spawn
from tests.helpers.waiting import wait_for_run, wait_until

__all__ = [
    "ADMIN_PASSWORD", "ADMIN_USER", "AMQP_HOST", "AMQP_PORT", "Beat", "MANAGEMENT_URL", "REPO", "STALE_VHOST_AGE",
    "TEST_VHOST_PREFIX", "Vhost", "Worker", "delete_vhost", "management", "management_delete", "rabbitmqctl",
    "running_beat", "spawn", "sweep_stale_vhosts", "wait_for_run", "wait_until",
]
