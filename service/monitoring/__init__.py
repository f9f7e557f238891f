"""Observability: the kit's own Prometheus metrics, Sentry reporting, and the drill overrides of rules and routes.

What lives here: ``metrics`` (the workers' Prometheus metrics), ``sentry``
(Sentry for workers, beat and the client), ``timescale`` and
``alertmanager_config`` (the production Prometheus rules and Alertmanager
routes with shortened durations, for drills and the local stack).

May import: ``service.headers`` and ``service.settings`` only, so that the
workers, the client and the tools can all use it.
"""
