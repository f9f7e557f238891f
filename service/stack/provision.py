"""The local stack's broker: its secrets, vhost, users, permissions and topology.

``make_secrets`` creates the secret files the stack lacks (scripts/make-secrets.sh);
it never changes one that exists. ``provision`` creates or updates the stack's
vhost, users, permissions and topology over RabbitMQ's management API
(service.broker), as ``python -m service broker provision`` does, so running it
again is harmless. It provisions as the stack's administrator, else as the user of
the given broker URL, else it first creates that administrator with rabbitmqctl
(which needs root on the broker's machine). ``admin_broker_url`` is the AMQP URL
of the stack's administrator in its vhost. Nothing here starts or stops RabbitMQ.
"""

from __future__ import annotations

import subprocess
from urllib.parse import quote, unquote, urlsplit

from service.stack.model import REPO, Stack, StackError


def make_secrets(stack: Stack) -> None:
    """The stack's secret files (scripts/make-secrets.sh: only missing ones are created)."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "make-secrets.sh"), str(stack.secrets_dir)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"scripts/make-secrets.sh failed: {done.stderr.strip()}")


def provision(stack: Stack, admin_url: str) -> str:
    """Create or update the vhost, users, permissions and topology; returns the admin it used.

    Tries the stack's own administrator first, then the broker's administrator
    of ``admin_url`` (KIT_BROKER_URL: guest on a fresh Debian RabbitMQ, loopback only).
    """
    from service import broker

    passwords = broker.read_passwords(stack.secrets_dir)
    defs = broker.definitions(stack.vhost, passwords, stack.user_prefix, stack.queue_type)
    url = stack.management_url()
    try:
        broker.provision(defs, url, stack.user("admin"), passwords["admin"])
        return stack.user("admin")
    except broker.ProvisioningError:
        parts = urlsplit(admin_url)
        if parts.username and parts.password:
            try:
                broker.provision(defs, url, unquote(parts.username), unquote(parts.password))
                return unquote(parts.username)
            except broker.ProvisioningError:
                pass
        # A fresh local broker: create the stack's administrator with rabbitmqctl
        # (root on the broker's machine), then provision as that administrator.
        nodes = stack.broker_nodes()
        _bootstrap_admin(stack.vhost, stack.user("admin"), passwords["admin"], nodes[0].name if nodes else "")
        broker.provision(defs, url, stack.user("admin"), passwords["admin"])
        return stack.user("admin")


def _bootstrap_admin(vhost: str, user: str, password: str, node: str = "") -> None:
    """Create ``user`` as administrator of ``vhost`` on the local node (or cluster node ``node``; idempotent)."""
    def ctl(*args: str, ok_if: str = "") -> None:
        on_node = ["-n", node] if node else []
        result = subprocess.run(["rabbitmqctl", "-q", *on_node, *args], capture_output=True, text=True)
        if result.returncode != 0 and not (ok_if and ok_if in (result.stdout + result.stderr)):
            raise RuntimeError(f"rabbitmqctl {args[0]} failed: {(result.stderr or result.stdout).strip()}")

    ctl("add_vhost", vhost, ok_if="already exists")
    ctl("add_user", user, password, ok_if="already exists")
    ctl("change_password", user, password)
    ctl("set_user_tags", user, "administrator")
    ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")


def admin_broker_url(stack: Stack) -> str:
    """The stack's administrator in its vhost (password from the secrets)."""
    from service import broker

    password = broker.read_passwords(stack.secrets_dir, roles=("admin",))["admin"]
    return (f"pyamqp://{quote(stack.user('admin'), safe='')}:{quote(password, safe='')}@{stack.host}:"
            f"{stack.local_port('rabbitmq', 5672)}/{quote(stack.vhost, safe='')}")

