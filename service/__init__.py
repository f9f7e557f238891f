"""Celery on RabbitMQ, run for real: topology, reliable workers, a thin client.

Importing this package imports nothing heavy: a web app imports
``service.client`` only, never Celery or the task code.
"""
