"""Dashboards as files: valid JSON, the provisioned datasource, runbook links that exist, console links."""

from __future__ import annotations

import json
import re
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


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_do_not_overlap(path: Path):
    taken: dict[tuple[int, int], str] = {}
    for panel in json.loads(path.read_text())["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


#: The cluster panels of the broker dashboard and the runbooks they link (issue 11).
CLUSTER_PANELS = {
    "Nodes up": {"broker-node-down.md"},
    "Quorum queues unavailable": {"quorum-queue-unavailable.md"},
    "Quorum queues under-replicated": {"quorum-queue-under-replicated.md"},
    "Nodes cut off (partition)": {"broker-network-partition.md"},
    "Quorum queue members online": {"quorum-queue-unavailable.md", "quorum-queue-under-replicated.md"},
    "Quorum queue leaders per node": {"broker-node-down.md"},
    "Erlang distribution links per node": {"broker-network-partition.md"},
}


def test_broker_dashboard_has_the_cluster_panels_with_their_runbooks():
    panels = {p["title"]: p for p in json.loads((REPO / "deploy/grafana/dashboards/rabbitmq-broker.json").read_text())
              ["panels"]}
    for title, runbooks in CLUSTER_PANELS.items():
        assert title in panels, title
        linked = {link["url"].rsplit("/", 1)[1] for link in panels[title].get("links", [])}
        assert linked == runbooks, title
    # Every alert of the cluster rules has its runbook one click away on the dashboard.
    rules = (REPO / "deploy/prometheus/rules/cluster.yml").read_text()
    for url in re.findall(r"/docs/runbooks/([\w-]+\.md)", rules):
        assert any(url in runbooks for runbooks in CLUSTER_PANELS.values()), url


def test_recorded_series_the_dashboards_read_are_recorded():
    """A panel may read a recording rule's series (name with a colon); the rule must exist."""
    rules = "".join(p.read_text() for p in (REPO / "deploy/prometheus/rules").glob("*.yml"))
    recorded = set(re.findall(r"^\s*-\s+record:\s*(\S+)\s*$", rules, re.M))
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = re.sub(r'"[^"]*"', '""', target["expr"])  # not inside label values
                for name in re.findall(r"(?<!\w)[A-Za-z_]\w*:[\w:]+", expr):
                    assert name in recorded, f"{path.name} / {panel['title']}: {name} is recorded by no rule"


#: Series whose panels show dead letters, and so link the dead-letter console.
DEAD_LETTER_SERIES = re.compile(r'kit_dead_letters_total|queue=~"\.\+\[\.\]dead"')
#: The console's filtered list and the query parameters it takes (service/console/).
CONSOLE_LIST = "${console_url:raw}/letters?"
CONSOLE_PARAMETERS = {"queue", "reason"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_console_url_is_a_dashboard_variable(path: Path):
    dashboard = json.loads(path.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "console_url"]
    assert variable["type"] in ("textbox", "constant")
    assert variable["query"] == variable["current"]["value"] == "http://localhost:5580"
    assert {"title": "Dead-letter console", "type": "link", "url": "${console_url:raw}/",
            "targetBlank": True} in dashboard["links"]


def test_dead_letter_panels_link_the_console_filtered_on_their_queue_and_reason():
    panels = json.loads((REPO / "deploy/grafana/dashboards/celery-overview.json").read_text())["panels"]
    linked = []
    for panel in panels:
        exprs = [t["expr"] for t in panel["targets"]]
        if not any(DEAD_LETTER_SERIES.search(e) for e in exprs):
            assert not panel["fieldConfig"]["defaults"].get("links"), panel["title"]
            continue
        (link,) = panel["fieldConfig"]["defaults"]["links"]
        assert link["targetBlank"] is True, panel["title"]
        grouped = {label.strip() for e in exprs for by in re.findall(r"\bby \(([^)]*)\)", e)
                   for label in by.split(",")} - {"le"}
        if not grouped:  # one number for every queue: the console's overview
            assert link["url"] == "${console_url:raw}/", panel["title"]
            linked.append((panel["title"], "/"))
            continue
        assert link["url"].startswith(CONSOLE_LIST), panel["title"]
        query = dict(part.split("=", 1) for part in link["url"][len(CONSOLE_LIST):].split("&"))
        assert set(query) == grouped & CONSOLE_PARAMETERS == grouped, (panel["title"], query, grouped)
        for name, value in query.items():
            assert value == f"${{__field.labels.{name}:percentencode}}", (panel["title"], name)
        linked.append((panel["title"], "/letters?" + "&".join(sorted(query))))
    assert sorted(linked) == [("Dead letters parked", "/"),
                              ("Dead-letter inflow by reason (/s)", "/letters?queue&reason"),
                              ("Dead-letter queue depth", "/letters?queue")]
