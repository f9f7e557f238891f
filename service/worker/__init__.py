"""What runs inside a worker: the task base class and the request and consumer overrides.

What lives here: ``task`` (``ReliableTask``: acks late, Celery's retry options
decided by service.retry_policy), ``request`` (``ReliableRequest``: a failure
becomes a retry through a wait queue or a dead letter), ``consumer``
(``ReliableConsumer``: every delivered message checked before Celery sees it,
``validation``), ``routing`` (publishing retries and dead letters, confirmed)
and ``pools`` (time limits on pools that cannot enforce them). Their import
paths are named in the README and the Celery app (``service.worker.task:ReliableTask``, ...).

May import: ``service.queues``, ``service.headers``, ``service.errors``,
``service.settings``, ``service.retry_policy``, ``service.publishing``,
``service.topology`` and ``service.monitoring``. Never the command line, the
dead-letter tools, the local stack or ``service.broker`` (provisioning).
"""
