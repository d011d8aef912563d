"""Table tests for resolver/metrics.py: plain tallies come out as Prometheus families."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from resolver.ops.metrics import Metrics, merge_samples

Labels = tuple[tuple[str, str], ...]  # (label name, value), sorted


def scrape(registry: CollectorRegistry) -> dict[str, tuple[str, dict[Labels, float]]]:
    """Family name -> (type, {sorted label items: value}), read back from the text format."""
    text = generate_latest(registry).decode()
    return {family.name: (family.type, {tuple(sorted(s.labels.items())): s.value
                                        for s in family.samples})
            for family in text_string_to_metric_families(text)}


@pytest.mark.parametrize(
    ("tally", "counts", "family", "samples"),
    [
        ("queries", {("udp", "blocked"): 3, ("tcp", "forwarded"): 1}, "resolver_queries",
         {(("outcome", "blocked"), ("protocol", "udp")): 3.0,
          (("outcome", "forwarded"), ("protocol", "tcp")): 1.0}),
        ("blocked", {("exchanges", "binance", "nxdomain"): 2}, "resolver_blocked",
         {(("action", "nxdomain"), ("entry", "binance"), ("list", "exchanges")): 2.0}),
        ("upstream_queries", {("192.0.2.53:53", "udp"): 5}, "resolver_upstream_queries",
         {(("protocol", "udp"), ("upstream", "192.0.2.53:53")): 5.0}),
        ("upstream_errors", {("192.0.2.53:53", "timeout"): 1}, "resolver_upstream_errors",
         {(("kind", "timeout"), ("upstream", "192.0.2.53:53")): 1.0}),
        ("cache", {("hit",): 4, ("miss",): 2, ("stored",): 2, ("evicted",): 1,
                   ("expired",): 1}, "resolver_cache",
         {(("result", r),): v for r, v in
          (("hit", 4.0), ("miss", 2.0), ("stored", 2.0), ("evicted", 1.0), ("expired", 1.0))}),
    ],
)
def test_tallies_export_as_counters(tally: str, counts: dict[tuple[str, ...], int], family: str,
                                    samples: dict[Labels, float]) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for key, count in counts.items():
        for _ in range(count):
            getattr(metrics, tally).inc(key)
    kind, got = scrape(registry)[family]
    assert kind == "counter"
    assert got == samples


def test_families_exist_before_anything_is_counted() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    families = scrape(registry)
    for name in ("resolver_queries", "resolver_blocked", "resolver_upstream_queries",
                 "resolver_upstream_errors", "resolver_cache"):
        assert families[name] == ("counter", {})


def test_gauges_are_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    state = {"size": 1}
    metrics.gauge("things", "Things held.", ("kind",), lambda: {("x",): state["size"]})
    assert scrape(registry)["resolver_things"] == ("gauge", {(("kind", "x"),): 1.0})
    state["size"] = 7
    assert scrape(registry)["resolver_things"] == ("gauge", {(("kind", "x"),): 7.0})


def test_inc_by_amount_and_separate_registries() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    first, second = Metrics(one), Metrics(two)
    first.queries.inc(("udp", "cached"), 10)
    first.queries.inc(("udp", "cached"))
    assert one.get_sample_value("resolver_queries_total",
                                {"protocol": "udp", "outcome": "cached"}) == 11
    assert two.get_sample_value("resolver_queries_total",
                                {"protocol": "udp", "outcome": "cached"}) is None
    assert second.queries.counts == {}
    text = generate_latest(one).decode()
    assert "# TYPE resolver_queries_total counter" in text
    assert 'resolver_queries_total{outcome="cached",protocol="udp"} 11.0' in text


def test_every_reload_result_is_exported_at_zero() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    assert scrape(registry)["resolver_reloads"] == (
        "counter", {(("result", result),): 0.0
                    for result in ("ok", "failed", "refused", "unchanged")})


def test_workers_merge_into_how_many_serve_each_version_and_the_latest_install() -> None:
    """Each worker reports 1 for the version it serves and when that was installed: the
    supervisor's sum counts the workers per version (a rollout converging), the time is the
    latest."""
    snapshots = []
    for version, at in (("aaaaaaaaaaaa", 100.0), ("bbbbbbbbbbbb", 250.0),
                        ("bbbbbbbbbbbb", 200.0)):
        metrics = Metrics()
        served: dict[tuple[str, ...], float] = {(version,): 1}
        installed: dict[tuple[str, ...], float] = {(): at}
        metrics.gauge("rules_info", "", ("version",), served.copy)
        metrics.gauge("rules_last_reload_timestamp_seconds", "", (), installed.copy,
                      merge="max")
        snapshots.append(metrics.snapshot())
    merged = {sample.name: sample.values for sample in merge_samples(snapshots)}
    assert merged["rules_info"] == {("aaaaaaaaaaaa",): 1, ("bbbbbbbbbbbb",): 2}
    assert merged["rules_last_reload_timestamp_seconds"] == {(): 250.0}
