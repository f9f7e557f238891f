"""Dashboards as files: valid JSON, the provisioned datasource, runbook links that exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))


def test_there_is_an_overview_and_a_broker_dashboard():
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert {"Celery on RabbitMQ", "RabbitMQ broker"} <= titles


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path):
    dashboard = json.loads(path.read_text())
    provisioned = (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert "uid: prometheus" in provisioned
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus"
        assert panel["targets"], panel["title"]
        for link in panel.get("links", []):
            name = link["url"].rsplit("/docs/runbooks/", 1)[1]
            assert (REPO / "docs" / "runbooks" / name).exists(), link["url"]
