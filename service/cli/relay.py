"""``python -m service alert-relay``: Alertmanager's webhook to WeCom, DingTalk and Feishu bots (service/relay/)."""

from __future__ import annotations

import click

from service.cli.base import friendly_errors
from service.settings import load


@click.command("alert-relay")
@click.option("--host", help="Address to listen on (default: KIT_ALERT_RELAY_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Port to listen on (default: KIT_ALERT_RELAY_PORT, 8060).")
@friendly_errors
def alert_relay(host: str | None, port: int | None) -> None:
    """Relay Alertmanager's notifications to WeCom, DingTalk and Feishu group bots.

    Bots and their routing: KIT_ALERT_RELAY_CONFIG (deploy/alertmanager/relay.yml);
    each bot's URL and secret: its file in KIT_ALERT_RELAY_SECRETS_DIR; the bearer
    token: KIT_ALERT_RELAY_TOKEN_FILE. Alertmanager posts to /alertmanager; metrics
    at /metrics, health at /healthz. Stops on Ctrl-C or SIGTERM.
    """
    from service.relay import RelayConfig, serve

    def listening(address: str, config: RelayConfig) -> None:
        bots = ", ".join(f"{b.name} ({b.kind})" for b in config.bots) or "none"
        skipped = f"; skipped (no secret): {', '.join(config.skipped)}" if config.skipped else ""
        click.echo(f"alert relay on {address}/alertmanager; bots: {bots}{skipped}")

    serve(load(), host=host, port=port, on_listening=listening)
