"""Celery on RabbitMQ, run for real: topology, reliable workers, a thin client.

Importing this package imports nothing heavy: a web app imports
``service.client`` only, never Celery or the task code.

The modules here are what several concerns share: the topology
(``queues``, ``topology``), the settings (``settings``, ``setting_rules``), the
errors, headers, connecting and confirmed publishing, the client, the Celery app
and its retry rules, and the broker's definitions (``broker``). Each further
concern is a package with its own face: ``worker/`` (inside a worker),
``tasks/``, ``monitoring/``, ``deadletters/``, ``cli/`` and ``stack/`` (the
local stack), and new ones beside them (``console/`` for a web console).
Runtime modules (the app, the worker, the client, publishing) never import the
operators' packages (``cli``, ``stack``, ``deadletters``, ``broker``);
``scripts/import_cycles.py --runtime`` checks that and that nothing imports in a circle.
"""
