"""deploy/observability read as Grafana, Prometheus and docker compose would: the dashboard's
structure and filters, the alerts' labels and annotations and their unit tests, and the
compose file's services, mounts and ports agreeing with the scrape config and provisioning.

promtool and a real Prometheus evaluating every expression: tests/test_e2e_prometheus.py.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.observability import (
    ALERTS_TEST,
    COMPOSE,
    METRIC,
    OBSERVABILITY,
    ROOT,
    SCRAPE_CONFIG,
    alert_rules,
    dashboard,
    dashboard_queries,
    load_yaml,
    panels,
    substitute,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FILTERS = ('job=~"$job"', 'instance=~"$instance"')


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dashboard()


def data_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in panels(board) if panel["type"] != "row"]


def test_every_panel_queries_the_templated_datasource(board):
    for panel in data_panels(board):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), f"{panel['title']}: refIds {refs}"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']} / {target['refId']}: empty"
            assert target["datasource"] == DATASOURCE, f"{panel['title']} / {target['refId']}"


def test_panel_ids_and_titles_are_unique(board):
    ids = Counter(panel["id"] for panel in panels(board))
    titles = Counter(panel["title"] for panel in data_panels(board))
    assert [i for i, n in ids.items() if n > 1] == []
    assert [t for t, n in titles.items() if n > 1] == []  # the end-to-end test keys by title


def test_panels_fit_the_grid_and_do_not_overlap(board):
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_metric_is_filtered_by_job_and_instance(board):
    queries = dashboard_queries(board)
    assert len(queries) > 30
    for query in queries:
        selectors = list(METRIC.finditer(query.expr))
        assert selectors, f"{query.where}: names no metric"
        for match in selectors:
            labels = match.group(2) or ""
            assert all(f in labels for f in FILTERS), f"{query.where}: {match.group(0)}"


def test_the_variables_are_the_datasource_then_job_then_instance(board):
    datasource, job, instance = board["templating"]["list"]
    assert (datasource["name"], datasource["type"], datasource["query"]) \
        == ("datasource", "datasource", "prometheus")
    for variable, name in ((job, "job"), (instance, "instance")):
        assert (variable["name"], variable["type"]) == (name, "query")
        assert variable["datasource"] == DATASOURCE
        assert variable["multi"] and variable["includeAll"]
        assert re.fullmatch(rf"label_values\(resolver_\w+(\{{.*\}})?, {name}\)",
                            variable["definition"]), variable["definition"]
        assert variable["query"]["query"] == variable["definition"]
    assert 'job=~"$job"' in instance["definition"]  # instances of the chosen jobs only


def test_substitute_replaces_every_variable_and_names_a_missing_one():
    values = {"job": "resolver", "__rate_interval": "1m"}
    assert substitute('rate(x{job=~"$job"}[${__rate_interval}])', values) \
        == 'rate(x{job=~"resolver"}[1m])'
    with pytest.raises(KeyError, match="instance"):
        substitute('x{instance=~"$instance"}', values)


# --- alerting rules --------------------------------------------------------------------------

def test_every_alert_waits_has_a_severity_and_names_the_instance():
    rules = alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        for key in ("summary", "description"):
            assert "{{ $labels.instance }}" in rule["annotations"][key], (rule["alert"], key)


def test_every_alert_has_unit_tests_firing_and_quiet():
    cases = [case for test in load_yaml(ALERTS_TEST)["tests"]
             for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never quiet"


# --- the compose file ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service (host paths, relative to the compose file): target -> source."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            found[target] = source
    return found


def host(path: str) -> Path:
    return (OBSERVABILITY / path).resolve()


def test_compose_runs_the_resolver_prometheus_and_grafana(compose):
    services = compose["services"]
    assert set(services) == {"resolver", "prometheus", "grafana"}
    assert host(services["resolver"]["build"]) == ROOT  # the top-level Dockerfile
    for name in ("prometheus", "grafana"):
        tag = services[name]["image"].partition(":")[2]
        assert tag and tag != "latest", f"{name}: pin the image, got {services[name]['image']}"
    named = {volume.split(":")[0] for service in services.values()
             for volume in service.get("volumes", []) if not volume.startswith(".")}
    assert named == set(compose["volumes"])
    for service in services.values():
        for source in mounts(service).values():
            assert host(source).exists(), source
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"published beyond this host: {port}"


def test_prometheus_scrapes_the_resolver_metrics_port(compose):
    services = compose["services"]
    command = services["resolver"]["command"]
    assert command[0] == "serve"
    listen = command[command.index("--metrics") + 1]
    _, _, metrics_port = listen.rpartition(":")
    (job,) = load_yaml(SCRAPE_CONFIG)["scrape_configs"]
    assert job["job_name"] == "resolver"
    assert job["static_configs"][0]["targets"] == [f"resolver:{metrics_port}"]
    assert listen.startswith("0.0.0.0:"), "reachable from the prometheus container"


def test_prometheus_reads_the_config_and_rules_from_the_mounted_directory(compose):
    prometheus = compose["services"]["prometheus"]
    (flag,) = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config = Path(flag.partition("=")[2])
    directory = mounts(prometheus)[str(config.parent)]
    assert host(directory) / config.name == SCRAPE_CONFIG
    for rules in load_yaml(SCRAPE_CONFIG)["rule_files"]:
        assert (SCRAPE_CONFIG.parent / rules).is_file(), rules


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    binds = mounts(grafana)
    provisioning = host(binds["/etc/grafana/provisioning"])
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in compose["services"]["prometheus"]["ports"]
    (provider,) = load_yaml(provisioning / "dashboards" / "resolver.yml")["providers"]
    dashboards = host(binds[provider["options"]["path"]])
    assert (dashboards / "resolver.json").is_file()


def test_the_resolver_image_runs_the_command_compose_passes(compose):
    """The Dockerfile's entrypoint is the console script, so compose's `serve ...` follows it,
    starting as the image's own command does (its config file); and it exposes the metrics
    port."""
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile at the top of the repository yet")
    text = dockerfile.read_text(encoding="utf-8")

    def instruction(name: str) -> list[str]:
        (line,) = re.findall(rf"^{name}\s+(\[.*\])\s*$", text, re.MULTILINE)
        parsed: list[str] = json.loads(line)
        return parsed

    assert Path(instruction("ENTRYPOINT")[-1]).name == "resolver"
    image_command = instruction("CMD")
    assert compose["services"]["resolver"]["command"][:len(image_command)] == image_command
    assert re.search(r"^EXPOSE\b.*\b9153/tcp\b", text, re.MULTILINE)
