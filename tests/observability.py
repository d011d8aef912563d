"""The files of deploy/observability as the tests read them: the Grafana dashboard's queries,
the alerting rules, the compose file, and Grafana's variables replaced by concrete values the
way Grafana does before it sends a query to Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "resolver.json"
PROMETHEUS = OBSERVABILITY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
COMPOSE = OBSERVABILITY / "docker-compose.yml"

# A metric named in a query: `resolver_...` or Prometheus's own `up`, with its selector if any.
METRIC = re.compile(r"\b(resolver_\w+|up)\b(\{[^}]*\})?")
# $name or ${name}: the variable syntaxes the dashboard uses ([[name]] is deprecated).
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard or the rules, and where it is."""

    where: str  # panel title / refId, annotation, or alert name
    expr: str


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return board


def panels(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, and the panels a collapsed row holds."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries(board: Mapping[str, Any]) -> list[Query]:
    """The expressions of every panel target and every Prometheus annotation."""
    queries = [Query(f"{panel['title']} / {target['refId']}", target["expr"])
               for panel in panels(board) for target in panel.get("targets", [])]
    queries += [Query(f"annotation {note['name']}", note["expr"])
                for note in board["annotations"]["list"] if "expr" in note]
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_queries() -> list[Query]:
    return [Query(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def metric_names(expr: str) -> set[str]:
    return {match.group(1) for match in METRIC.finditer(expr)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """expr with every Grafana variable replaced; KeyError names one that has no value."""
    return VARIABLE.sub(lambda match: values[match.group(1)], expr)
