"""The local stack: docker-compose.yml's services as processes on one machine, without Docker.

What lives here: ``compose`` (reads docker-compose.yml: interpolation, ports,
volumes, commands), ``model`` (``Stack``: the compose services mapped to this
machine, their commands, environment, files and URLs), ``processes`` (pid
files, start, stop, health checks), ``provision`` (the stack's secrets, and its
vhost, users and topology through service.broker) and ``lifecycle`` (up, down
and status, returning data for ``python -m service stack``). The names of
``model`` are importable from ``service.stack``.

May import: ``service.settings``, ``service.errors``, ``service.queues``,
``service.connection``, ``service.broker`` (provisioning) and
``service.monitoring.alertmanager_config``. Never imported by the workers, beat,
the Celery app or the client.
"""

from service.stack.model import (
    COMPOSE_USER_PREFIX,
    LOCAL_KEY,
    REPO,
    VHOST_TARGET_LABEL,
    Component,
    Options,
    Probe,
    Stack,
    StackError,
)

__all__ = ["COMPOSE_USER_PREFIX", "LOCAL_KEY", "REPO", "VHOST_TARGET_LABEL", "Component", "Options", "Probe",
           "Stack", "StackError"]
