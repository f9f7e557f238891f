"""``python -m service web``: the example web service (FastAPI on uvicorn), see service/web/."""

from __future__ import annotations

import click

from service.cli.base import friendly_errors


@click.command()
@click.option("--host", help="Address to listen on (default: KIT_WEB_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to listen on (default: KIT_WEB_PORT, 8000).")
@friendly_errors
def web(host: str | None, port: int | None) -> None:
    """Run the example web service: submit exports, poll task status, download files.

    Publishes with the asyncio client, reads status from KIT_RESULT_BACKEND;
    OpenAPI docs at /docs, Prometheus metrics at /metrics. Stops on Ctrl-C or SIGTERM.
    """
    from service.web import serve

    def listening(url: str) -> None:
        click.echo(f"web service on {url} (API docs {url}/docs)", nl=True)

    serve(host=host, port=port, on_listening=listening)
