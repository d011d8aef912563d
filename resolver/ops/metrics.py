"""Prometheus metrics, counted as plain integers on the hot path and exported at scrape time.

A prometheus-client Counter child costs a lock and a float add per increment (~0.3 us); at a
few microseconds per answer that is a tenth of the budget. Here a count is one dict update, and
a custom collector turns the dicts into metric families when Prometheus scrapes. Label values
are bounded by construction: list names, entry ids from rule files, actions, transports,
outcomes, upstream addresses from config. Never a query name or a client address.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

NAMESPACE = "resolver"
# What a rule reload can come to (resolver/server/reload.py), each counted from the start.
RELOAD_RESULTS = ("ok", "failed", "refused", "unchanged")


@dataclass(frozen=True, slots=True)
class Sample:
    """One family's values at one moment, as plain data that can cross a process boundary.

    `merge` says how the supervisor combines workers: counters and most gauges add up; a
    gauge that every worker reports alike (rules loaded) takes the maximum.
    """

    kind: str  # "counter" or "gauge"
    name: str
    help: str
    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float]
    merge: str = "sum"  # or "max"

    def family(self) -> Metric:
        make = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = make(f"{NAMESPACE}_{self.name}", self.help, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


def merge_samples(snapshots: list[list[Sample]]) -> list[Sample]:
    """Combine the snapshots of several workers into one, family by family."""
    merged: dict[str, Sample] = {}
    for snapshot in snapshots:
        for sample in snapshot:
            seen = merged.get(sample.name)
            if seen is None:
                merged[sample.name] = Sample(sample.kind, sample.name, sample.help,
                                             sample.labels, dict(sample.values), sample.merge)
                continue
            combine = max if sample.merge == "max" else operator.add
            for key, value in sample.values.items():
                seen.values[key] = combine(seen.values.get(key, 0), value)
    return list(merged.values())


@dataclass(slots=True)
class Tally:
    """A counter family: a dict from label values to a count."""

    name: str
    help: str
    labels: tuple[str, ...]
    counts: dict[tuple[str, ...], int] = field(default_factory=dict)
    expected: dict[tuple[str, ...], int] = field(default_factory=dict)

    def inc(self, key: tuple[str, ...], amount: int = 1) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + amount

    def expect(self, keys: Iterable[tuple[str, ...]]) -> None:
        """Label values exported as 0 until counted: a series that exists from the start
        lets increase() and rate() see its first count (Prometheus' advice for known
        labels)."""
        self.expected.update(dict.fromkeys(keys, 0))

    def sample(self) -> Sample:
        # one C-level merge: the metrics thread reads while the event loop keeps counting
        return Sample("counter", self.name, self.help, self.labels,
                      {**self.expected, **self.counts})


@dataclass(slots=True)
class Gauge:
    """A gauge read from the live objects at sample time, so it can never drift."""

    name: str
    help: str
    labels: tuple[str, ...]
    read: Callable[[], dict[tuple[str, ...], float]]
    merge: str = "sum"

    def sample(self) -> Sample:
        return Sample("gauge", self.name, self.help, self.labels, self.read(), self.merge)


class Metrics:
    """Every metric of one server. Components count into the tallies they own and register
    gauges for their state; pass a fresh CollectorRegistry per test."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.queries = Tally("queries_total", "Queries answered, by transport and outcome.",
                             ("protocol", "outcome"))
        self.blocked = Tally("blocked_total", "Blocked answers, by rule list, entry and action.",
                             ("list", "entry", "action"))
        self.upstream_queries = Tally("upstream_queries_total",
                                      "Queries sent upstream, by upstream and protocol.",
                                      ("upstream", "protocol"))
        self.upstream_errors = Tally("upstream_errors_total",
                                     "Upstream attempts that failed, by upstream and kind.",
                                     ("upstream", "kind"))
        self.cache = Tally("cache_total", "Cache lookups and stores, by result.", ("result",))
        self.reloads = Tally("reloads_total", "Rule reloads, by result (ok, failed, refused "
                             "by the guard, unchanged).", ("result",))
        self.reloads.expect([(result,) for result in RELOAD_RESULTS])
        self._tallies = [self.queries, self.blocked, self.upstream_queries,
                         self.upstream_errors, self.cache, self.reloads]
        self._gauges: list[Gauge] = []
        if registry is not None:
            registry.register(self)

    def counter(self, name: str, help: str, labels: tuple[str, ...]) -> Tally:
        """A further counter family, owned by the component that asks for it."""
        tally = Tally(name, help, labels)
        self._tallies.append(tally)
        return tally

    def gauge(self, name: str, help: str, labels: tuple[str, ...],
              read: Callable[[], dict[tuple[str, ...], float]], merge: str = "sum") -> None:
        """Export state owned elsewhere (cache size, rule counts) as a gauge."""
        self._gauges.append(Gauge(name, help, labels, read, merge))

    def snapshot(self) -> list[Sample]:
        """Every family's current values (what a worker sends its supervisor)."""
        return [t.sample() for t in self._tallies] + [g.sample() for g in self._gauges]

    def collect(self) -> Iterator[Metric]:
        for sample in self.snapshot():
            yield sample.family()
