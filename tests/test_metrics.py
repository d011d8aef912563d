"""Table tests for resolver/metrics.py: plain tallies come out as Prometheus families."""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from resolver.ops.metrics import (
    DURATION_BUCKETS,
    QTYPES,
    Metrics,
    Queries,
    Sample,
    merge_samples,
    new_row,
    observe,
)

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
    first.cache.inc(("hit",), 10)
    first.cache.inc(("hit",))
    assert one.get_sample_value("resolver_cache_total", {"result": "hit"}) == 11
    assert two.get_sample_value("resolver_cache_total", {"result": "hit"}) is None
    assert second.cache.counts == {}
    text = generate_latest(one).decode()
    assert "# TYPE resolver_cache_total counter" in text
    assert 'resolver_cache_total{result="hit"} 11.0' in text


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


# -- queries_total's labels, and the histograms --------------------------------------------

NOERROR_ANSWER = b"\x12\x34\x81\x80"


@pytest.mark.parametrize(("qtype", "label"), [
    *QTYPES.items(),
    (0, "other"), (99, "other"), (257, "other"), (65280, "other"), (65535, "other"),
])
def test_question_types_are_a_fixed_set(qtype: int, label: str) -> None:
    queries = Queries()
    queries.record("udp", "forwarded", qtype, NOERROR_ANSWER, 0.0)
    assert queries.counts == {("udp", "forwarded", label, "NOERROR"): 1}


@pytest.mark.parametrize(("answer", "label"), [
    (b"\x00\x00\x81\x80", "NOERROR"), (b"\x00\x00\x81\x81", "FORMERR"),
    (b"\x00\x00\x81\x82", "SERVFAIL"), (b"\x00\x00\x81\x83", "NXDOMAIN"),
    (b"\x00\x00\x81\x84", "other"), (b"\x00\x00\x81\x85", "REFUSED"),
    (b"\x00\x00\x81\x89", "other"), (b"\x00\x00\x81\x8f", "other"),
    (b"\x00\x00\x85\xa3", "NXDOMAIN"),  # other flag bits set: only the low four count
    (None, "none"),  # nothing sent
])
def test_response_codes_come_from_the_answers_header(answer: bytes | None, label: str) -> None:
    queries = Queries()
    queries.record("tcp", "blocked", 1, answer, 0.0)
    assert queries.counts == {("tcp", "blocked", "A", label): 1}


@pytest.mark.parametrize(("value", "bucket"), [
    (-1.0, 0), (0.0, 0), (3e-6, 0),  # a clock that stepped back counts as the fastest
    (25e-6, 0), (25.001e-6, 1), (50e-6, 1),  # each bound belongs to its bucket (le)
    (0.0003, 4), (0.001, 5), (0.03, 10), (0.5, 13), (2.0, 15), (5.0, 16),
    (5.001, 17), (3600.0, 17),  # above the last bound: only in +Inf
])
def test_a_value_falls_in_the_first_bucket_whose_bound_it_does_not_exceed(
        value: float, bucket: int) -> None:
    row = new_row()
    observe(row, value)
    assert row[bucket] == 1 and sum(row[:-1]) == 1
    assert row[-1] == value
    assert len(row) == len(DURATION_BUCKETS) + 3  # the buckets, +Inf, untimed, the sum


def test_the_buckets_resolve_a_cache_hit_and_an_upstream_timeout() -> None:
    row = new_row()
    for value in (0.00005, 2.0):
        observe(row, value)
    assert row[1] == 1, "50 us: its own bucket, not the first"
    assert row[15] == 1 and DURATION_BUCKETS[15] == 2.5, "2 s, below the last bound"


def histogram(registry: CollectorRegistry, name: str) -> dict[Labels, float]:
    kind, samples = scrape(registry)[name]
    assert kind == "histogram"
    return samples


def test_the_request_histogram_exports_cumulative_buckets_by_outcome() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for qtype, duration in ((1, 0.00001), (28, 0.00004), (1, 0.02)):
        metrics.queries.record("udp", "cached", qtype, NOERROR_ANSWER, duration)
    metrics.queries.record("tcp", "cached", 1, NOERROR_ANSWER, 0.7)
    samples = histogram(registry, "resolver_request_duration_seconds")
    cached = {dict(labels)["le"]: value for labels, value in samples.items()
              if ("outcome", "cached") in labels and "le" in dict(labels)}
    assert cached["2.5e-05"] == 1 and cached["5e-05"] == 2 and cached["0.025"] == 3
    assert cached["0.5"] == 3 and cached["1.0"] == 4 and cached["+Inf"] == 4
    assert all(("protocol", "udp") not in labels for labels in samples), "by outcome only"
    get = registry.get_sample_value
    assert get("resolver_request_duration_seconds_count", {"outcome": "cached"}) == 4
    assert get("resolver_request_duration_seconds_sum", {"outcome": "cached"}) == (
        pytest.approx(0.72005))
    assert registry.get_sample_value("resolver_queries_total", {
        "protocol": "udp", "outcome": "cached", "qtype": "A", "rcode": "NOERROR"}) == 2


def test_expected_series_exist_at_zero_under_the_usual_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.queries.expect(("udp", "tcp"), ("blocked", "dropped", "formerr"))
    kind, counts = scrape(registry)["resolver_queries"]
    assert kind == "counter"
    assert {tuple(value for _, value in labels): count for labels, count in counts.items()} == {
        ("blocked", "udp", "A", "NXDOMAIN"): 0, ("blocked", "tcp", "A", "NXDOMAIN"): 0,
        ("dropped", "udp", "other", "none"): 0, ("dropped", "tcp", "other", "none"): 0,
        ("formerr", "udp", "other", "FORMERR"): 0, ("formerr", "tcp", "other", "FORMERR"): 0}
    assert registry.get_sample_value("resolver_request_duration_seconds_count",
                                     {"outcome": "dropped"}) == 0
    assert metrics.queries.counts == {}, "counts are what was counted"


def test_histograms_merge_across_workers_bucket_by_bucket() -> None:
    workers = [Metrics(process=f"worker-{index}") for index in range(2)]
    for metrics, durations in zip(workers, ((0.00001, 0.03), (0.00002, 0.03, 9.0)),
                                  strict=True):
        for duration in durations:
            metrics.queries.record("udp", "forwarded", 1, NOERROR_ANSWER, duration)
        observe(metrics.upstream_durations.row(("192.0.2.53:53",)), durations[-1])
    registry = CollectorRegistry()
    registry.register(Merged(merge_samples([metrics.snapshot() for metrics in workers])))
    get = registry.get_sample_value
    forwarded = {"outcome": "forwarded"}
    assert get("resolver_request_duration_seconds_bucket", {**forwarded, "le": "2.5e-05"}) == 2
    assert get("resolver_request_duration_seconds_bucket", {**forwarded, "le": "0.05"}) == 4
    assert get("resolver_request_duration_seconds_bucket", {**forwarded, "le": "5.0"}) == 4
    assert get("resolver_request_duration_seconds_count", forwarded) == 5
    assert get("resolver_request_duration_seconds_sum", forwarded) == pytest.approx(9.06003)
    assert get("resolver_queries_total", {"protocol": "udp", "outcome": "forwarded",
                                          "qtype": "A", "rcode": "NOERROR"}) == 5
    upstream = {"upstream": "192.0.2.53:53"}
    assert get("resolver_upstream_duration_seconds_count", upstream) == 2
    assert get("resolver_upstream_duration_seconds_bucket", {**upstream, "le": "0.05"}) == 1


def test_process_metrics_stay_apart_by_process_and_build_info_stays_one() -> None:
    workers = [Metrics(process=f"worker-{index}") for index in range(2)]
    registry = CollectorRegistry()
    registry.register(Merged(merge_samples([metrics.snapshot() for metrics in workers])))
    families = scrape(registry)
    for name in ("resolver_process_resident_memory_bytes", "resolver_process_open_fds",
                 "resolver_process_start_time_seconds", "resolver_process_cpu_seconds"):
        _, values = families[name]
        assert set(values) == {(("process", "worker-0"),), (("process", "worker-1"),)}, name
    kind, info = families["resolver_build_info"]
    [(labels, value)] = info.items()
    assert (kind, value) == ("gauge", 1)
    assert dict(labels)["loop"] == "asyncio"  # built outside a running loop


def test_process_metrics_read_this_process() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    get = registry.get_sample_value
    main = {"process": "main"}
    assert (get("resolver_process_resident_memory_bytes", main) or 0) > 1_000_000
    assert (get("resolver_process_open_fds", main) or 0) >= 3  # stdin, stdout, stderr
    started = get("resolver_process_start_time_seconds", main) or 0
    assert time.time() - 86400 * 7 < started <= time.time()
    assert (get("resolver_process_cpu_seconds_total", main) or 0) > 0


async def test_build_info_names_the_running_loop() -> None:
    info = Metrics().snapshot()
    [labels] = next(sample for sample in info if sample.name == "build_info").values
    version, python, loop = labels
    assert (python, loop) == (platform.python_version(), "asyncio")  # pytest's default loop
    assert version == importlib.metadata.version("dns-filter-resolver")


class Merged:
    """A collector for merged samples, as the supervisor exports them."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        for sample in self.samples:
            yield sample.family()
