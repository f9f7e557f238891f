"""Observability: the kit's own Prometheus metrics and Sentry reporting."""
