"""The dashboard and the alerts proven against a real Prometheus (the Debian package) scraping a
real resolver with two workers, and promtool on the rules and the scrape config.

The resolver serves the shipped exchange list and a dry-run list, forwarding to the NSD
fixture, with its query log on; dnspython sends blocked, dry-run, forwarded and cached queries
in two rounds with a scrape between them (a `resolver_blocked_total` series appears with its
first block, and `increase()` needs it to rise after that). Once Prometheus has scraped twice
after the second round, every PromQL expression of the dashboard and of the alerting rules is
evaluated through the HTTP API with Grafana's variables replaced: each must parse, the ones
in MUST_HAVE_DATA must return what those queries imply, and no alert may fire.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from resolver.ops.shipped import SHIPPED_RULES
from resolver.rules.loader import load_rules
from resolver.server.supervisor import free_port
from tests.observability import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS,
    SCRAPE_CONFIG,
    Query,
    alert_queries,
    alert_rules,
    dashboard,
    dashboard_queries,
    load_yaml,
    metric_names,
    substitute,
)
from tests.servers import LOOPBACK, ZONE, NsdServer, require_tool
from tests.test_cli import read_line

WORKERS = 2
WAIT = 30.0  # seconds, for any one thing to happen; reached only when a test is about to fail
STAGED = """\
lists:
  - name: candidates
    mode: dry-run
    entries:
      - id: newex
        name: A candidate exchange, staged
        domains: [mixed.example.test]
"""
NXDOMAIN, NOERROR = dns.rcode.NXDOMAIN, dns.rcode.NOERROR
# One round of queries and the rcode each must get: blocked by the shipped list (binance
# most), forwarded then cached, counted by the dry-run list, and a name NSD does not have.
ROUND = ([("www.binance.com", "A", NXDOMAIN)] * 3 + [("api.binance.com", "AAAA", NXDOMAIN),
         ("www.kraken.com", "A", NXDOMAIN)] + [(ZONE.www, "A", NOERROR)] * 4
         + [(ZONE.www, "AAAA", NOERROR)] + [(ZONE.mixed, "A", NOERROR)] * 2
         + [(ZONE.missing, "A", NXDOMAIN)])


# --- promtool --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml"),
                                  ("check", "config", "prometheus.yml")])
def test_promtool_accepts_the_rules_their_tests_and_the_scrape_config(args):
    result = subprocess.run([require_tool("promtool"), *args], cwd=PROMETHEUS,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rule_tests_catch_a_changed_threshold(tmp_path):
    """The unit tests pin the thresholds: the SERVFAIL alert at 50% instead of 5% fails them."""
    shutil.copy(ALERTS_TEST, tmp_path)
    text = ALERTS.read_text(encoding="utf-8")
    assert text.count(") > 0.05\n") == 1
    (tmp_path / ALERTS.name).write_text(text.replace(") > 0.05\n", ") > 0.5\n"))
    result = subprocess.run([require_tool("promtool"), "test", "rules", ALERTS_TEST.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ResolverServfailRatioHigh" in result.stdout + result.stderr


# --- a resolver and a Prometheus scraping it -------------------------------------------------

def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT:.0f}s: {what}")
        time.sleep(0.2)


def stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM, and SIGKILL if that is not enough within 10 s; closes its pipes."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


class Prometheus:
    """The HTTP API of a Prometheus server."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        """The `data` of a successful answer; AssertionError with Prometheus's error if not."""
        status, data = self.call(path, **params)
        assert status == "success", f"{path} {params}: {data}"
        return data

    def call(self, path: str, **params: str) -> tuple[str, Any]:
        """(status, data), or ("error", the error) for a query Prometheus refused."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
        if body["status"] != "success":
            return body["status"], f"{body.get('errorType')}: {body.get('error')}"
        return body["status"], body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def scrapes(self) -> int:
        """Scrapes of the resolver so far (each writes one `up` sample)."""
        result = self.get("/api/v1/query", query='count_over_time(up{job="resolver"}[1h])')
        return int(float(result["result"][0]["value"][1])) if result["result"] else 0

    def wait_for_scrapes(self, count: int) -> None:
        """Until `count` scrapes have started after this call (one may be under way)."""
        target = self.scrapes() + count + 1
        wait_for(lambda: self.scrapes() >= target, f"{count} scrapes of the resolver")


@dataclass(frozen=True)
class Live:
    """What the scenario ran against, and when."""

    prometheus: Prometheus
    instance: str  # the scrape target, as Prometheus labels it
    upstream: str  # the NSD fixture, as the resolver labels it
    version: str  # the rule-set version served
    exchange_domains: int  # domains of the shipped list
    started: float  # Unix time just before the resolver started
    window: str  # the range every $__rate_interval and $__range stands for


def ask(port: int, name: str, rdtype: str) -> int:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, LOOPBACK, port=port, timeout=3).rcode()


def send_round(port: int) -> None:
    for name, rdtype, rcode in ROUND:
        assert ask(port, name, rdtype) == rcode, (name, rdtype)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, nsd_upstream: NsdServer) -> Iterator[Live]:
    prometheus_path = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    staged = tmp / "staged.yaml"
    staged.write_text(STAGED)
    rules = [SHIPPED_RULES, str(staged)]
    metrics = f"{LOOPBACK}:{free_port()}"
    started = time.time()
    resolver = subprocess.Popen(
        [sys.executable, "-m", "resolver", "--log-level", "warning", "serve",
         "--workers", str(WORKERS), "--listen", f"{LOOPBACK}:0",
         "--upstream", nsd_upstream.address, "--rules", rules[0], "--rules", rules[1],
         "--metrics", metrics, "--query-log", str(tmp / "query.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes = [resolver]
    try:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", read_line(resolver))
        assert match
        port = int(match.group(1))
        web = f"{LOOPBACK}:{free_port()}"
        processes.append(start_prometheus(prometheus_path, tmp, metrics, web))
        prometheus = Prometheus(f"http://{web}")
        wait_for(prometheus.ready, "Prometheus ready")
        prometheus.wait_for_scrapes(1)  # a sample of every counter before the queries
        send_round(port)
        prometheus.wait_for_scrapes(1)  # the series that appear with their first count
        send_round(port)
        prometheus.wait_for_scrapes(2)
        loaded = load_rules(rules)
        yield Live(prometheus, metrics, nsd_upstream.address, loaded.version,
                   load_rules([SHIPPED_RULES]).domain_count, started,
                   f"{math.ceil(time.time() - started) + 5}s")
    finally:
        for process in reversed(processes):
            stop(process)


def start_prometheus(path: str, tmp: Path, target: str, web: str) -> subprocess.Popen[str]:
    """Prometheus serving its API on `web`, with the shipped scrape config changed only in what
    a test needs: a scrape and an evaluation every second, `target` as the resolver, the rules
    by absolute path."""
    config = load_yaml(SCRAPE_CONFIG)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(SCRAPE_CONFIG.parent / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (tmp / "prometheus.log").open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [path, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", "--log.level=warn",
             f"--web.listen-address={web}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, text=True)


# --- what the expressions return -------------------------------------------------------------

Vector = list[dict[str, Any]]


def variables(live: Live) -> dict[str, str]:
    return {"job": "resolver", "instance": live.instance, "__rate_interval": live.window,
            "__range": live.window, "__interval": "1s"}


@pytest.fixture(scope="module")
def results(live: Live) -> dict[str, tuple[str, Any]]:
    """Query.where -> (status, data) for every expression of the dashboard and the rules."""
    queries: list[Query] = dashboard_queries(dashboard()) + alert_queries()
    return {query.where: live.prometheus.call("/api/v1/query",
                                              query=substitute(query.expr, variables(live)))
            for query in queries}


def one(vector: Vector) -> float:
    (sample,) = vector
    return float(sample["value"][1])


def by(vector: Vector, *labels: str) -> dict[Any, float]:
    """Values keyed by one label's value, or by a tuple of several."""
    def key(metric: dict[str, str]) -> Any:
        values = tuple(metric.get(label, "") for label in labels)
        return values[0] if len(values) == 1 else values
    return {key(sample["metric"]): float(sample["value"][1]) for sample in vector}


def positive(values: dict[Any, float], *keys: Any) -> bool:
    return all(0 < values.get(key, math.nan) < math.inf for key in keys)


PROCESSES = {"supervisor", *(f"worker-{i}" for i in range(WORKERS))}
OUTCOMES = ("blocked", "cached", "forwarded")
RELOADS = {"ok", "failed", "refused", "unchanged"}

Check = Callable[[Vector, Live], bool]
# Panel title / refId -> what it must return after the queries ROUND sends, twice. Every other
# expression must parse; these must have data, and the right data.
MUST_HAVE_DATA: dict[str, Check] = {
    "Queries per second / A": lambda v, live: one(v) > 0,
    "Block rate / A": lambda v, live: 0 < one(v) < 1,
    "Cache hit ratio / A": lambda v, live: 0 < one(v) <= 1,
    "SERVFAIL ratio / A": lambda v, live: one(v) == 0,
    "Instances up / A": lambda v, live: one(v) == 1,
    "Instances up / B": lambda v, live: one(v) == 1,
    "Rule-set versions served / A": lambda v, live: one(v) == 1,
    "Queries per second by outcome / A": lambda v, live: positive(by(v, "outcome"), *OUTCOMES),
    "Block rate and SERVFAIL ratio by instance / A":
        lambda v, live: 0 < by(v, "instance")[live.instance] < 1,
    "Block rate and SERVFAIL ratio by instance / B":
        lambda v, live: by(v, "instance") == {live.instance: 0},
    "Queries per second by type / A": lambda v, live: positive(by(v, "qtype"), "A", "AAAA"),
    "Answers per second by rcode / A":
        lambda v, live: positive(by(v, "rcode"), "NOERROR", "NXDOMAIN"),
    "Top blocked entries (exchanges) in the time range / A":
        lambda v, live: (max(by(v, "list", "entry").items(), key=lambda kv: kv[1])[0]
                         == ("exchanges", "binance")
                         and positive(by(v, "list", "entry"), ("exchanges", "kraken"))),
    "Blocked per second by list and action / A":
        lambda v, live: positive(by(v, "list", "action"), ("exchanges", "nxdomain")),
    "Would block: dry-run lists in the time range / A":
        lambda v, live: positive(by(v, "list", "entry"), ("candidates", "newex")),
    "Would block per second by dry-run list / A":
        lambda v, live: positive(by(v, "list", "action"), ("candidates", "nxdomain")),
    "Domains per list / A": lambda v, live: by(v, "list", "mode") == {
        ("exchanges", "enforce"): live.exchange_domains, ("candidates", "dry-run"): 1},
    "Cache hit ratio by instance / A": lambda v, live: 0 < by(v, "instance")[live.instance] <= 1,
    "Cache activity per second / A":
        lambda v, live: positive(by(v, "result"), "hit", "miss", "stored"),
    "Cache size / A": lambda v, live: one(v) >= 1,
    "Cache size / B": lambda v, live: one(v) >= 1,
    "Request latency p50 / p99 by outcome / A":
        lambda v, live: positive(by(v, "outcome"), *OUTCOMES),
    "Request latency p50 / p99 by outcome / B":
        lambda v, live: positive(by(v, "outcome"), *OUTCOMES),
    "Upstream latency p50 / p99 by upstream / A":
        lambda v, live: positive(by(v, "upstream"), live.upstream),
    "Upstream latency p50 / p99 by upstream / B":
        lambda v, live: positive(by(v, "upstream"), live.upstream),
    "Upstream queries per second / A":
        lambda v, live: positive(by(v, "upstream", "protocol"), (live.upstream, "udp")),
    # every error kind is exported at 0 from the start, and none happened
    "Upstream errors per second by kind / A":
        lambda v, live: bool(v) and set(by(v, "upstream", "kind").values()) == {0},
    "Upstream health / A": lambda v, live: by(v, "upstream") == {live.upstream: 1},
    "Upstream round-trip time (smoothed) / A":
        lambda v, live: positive(by(v, "upstream"), live.upstream),
    "Queries waiting for an upstream / A": lambda v, live: one(v) == 0,
    "Workers and instances per rule-set version / A":
        lambda v, live: by(v, "version") == {live.version: WORKERS},
    "Workers and instances per rule-set version / B":
        lambda v, live: by(v, "version") == {live.version: 1},
    "Workers serving each rule-set version / A":
        lambda v, live: by(v, "version") == {live.version: WORKERS},
    "Last reload by instance / A":
        lambda v, live: live.started * 1000 <= one(v) <= time.time() * 1000,
    "Last reload by instance / B": lambda v, live: one(v) == WORKERS,
    "Reloads by result / A": lambda v, live: by(v, "result") == dict.fromkeys(RELOADS, 0),
    "Reload failures in the time range / A": lambda v, live: one(v) == 0,
    "Query log records per second / A":
        lambda v, live: positive(by(v, "instance"), live.instance),
    "Query log records per second / B":
        lambda v, live: by(v, "reason") == {"queue_full": 0, "write_error": 0},
    "Resident memory by process / A": lambda v, live: positive(by(v, "process"), *PROCESSES),
    "CPU by process / A": lambda v, live: set(by(v, "process")) == PROCESSES,
    "Open files by process / A": lambda v, live: positive(by(v, "process"), *PROCESSES),
    "Builds running / A": lambda v, live: by(v, "version") == {
        importlib.metadata.version("dns-filter-resolver"): 1},
}
# Metrics the dashboard or the rules name that this resolver does not export: each needs a
# feature the scenario leaves off.
NOT_EXPORTED_HERE = {
    "resolver_source_last_success_timestamp_seconds": "no list from a URL",
    "resolver_source_refresh_interval_seconds": "no list from a URL",
    "resolver_source_failures_total": "no list from a URL",
    "resolver_upstream_tls_connections_total": "no DNS-over-TLS upstream",
}


def test_every_expression_of_the_dashboard_and_the_rules_parses(results):
    failed = {where: data for where, (status, data) in results.items() if status != "success"}
    assert failed == {}
    assert {data["resultType"] for _, data in results.values()} <= {"vector", "scalar"}


def test_the_data_table_names_only_existing_panels(results):
    assert set(MUST_HAVE_DATA) - set(results) == set()


@pytest.mark.parametrize("where", MUST_HAVE_DATA)
def test_the_expression_returns_what_the_queries_imply(live, results, where):
    status, data = results[where]
    assert status == "success", data
    assert MUST_HAVE_DATA[where](data["result"], live), f"{where}: {data['result']}"


def test_no_alert_fires_on_a_healthy_resolver(live, results):
    firing = {query.where: results[query.where][1]["result"] for query in alert_queries()}
    assert firing == {where: [] for where in firing}
    groups = live.prometheus.get("/api/v1/rules", type="alert")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {rule["alert"] for rule in alert_rules()}
    for name, rule in rules.items():
        assert (rule["health"], rule["state"], rule.get("lastError", "")) \
            == ("ok", "inactive", ""), name


def test_the_job_and_instance_variables_find_the_resolver(live):
    """label_values(selector, label) as Grafana asks it: the label's values over the series."""
    templating = dashboard()["templating"]["list"]
    found = {}
    for variable in templating[1:]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector = substitute(match.group(1), variables(live))
        found[match.group(2)] = live.prometheus.get(f"/api/v1/label/{match.group(2)}/values",
                                                    **{"match[]": selector})
    assert found == {"job": ["resolver"], "instance": [live.instance]}


def test_every_metric_named_is_exported(live):
    names = {name for query in dashboard_queries(dashboard()) + alert_queries()
             for name in metric_names(query.expr)}
    exported = set(live.prometheus.get("/api/v1/label/__name__/values"))
    assert names - exported == set(NOT_EXPORTED_HERE)
