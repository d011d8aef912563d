"""Prometheus metrics, counted as plain integers on the hot path and exported at scrape time.

A prometheus-client Counter child costs a lock and a float add per increment (~0.3 us); at a
few microseconds per answer that is a tenth of the budget. Here a count is one dict update, and
a custom collector turns the dicts into metric families when Prometheus scrapes. Label values
are bounded by construction: list names, entry ids from rule files, actions, transports,
outcomes, fixed sets of query types and response codes, upstream addresses from config,
process names. Never a query name or a client address.

Histograms are kept the same way: per label key a `Row` of bucket counts and the sum, which
`observe` bumps (a comparison, rarely a bisect, and two additions). Every family's values
leave as a `Sample`, plain data that a worker process sends its supervisor, which merges the
workers' samples by adding them up.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import operator
import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from resolver.ops import process as _process

NAMESPACE = "resolver"
DISTRIBUTION = "dns-filter-resolver"  # pyproject's name: resolver_build_info's version
# What a rule reload can come to (resolver/server/reload.py), each counted from the start.
RELOAD_RESULTS = ("ok", "failed", "refused", "unchanged")

# Upper bounds (seconds) of the buckets of every duration histogram: from a packet-cache
# replay (microseconds of Python) and a 50 us cache hit to a 2 s upstream timeout and past.
DURATION_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_FIRST_BOUND = DURATION_BUCKETS[0]
_LE = (*map(floatToGoString, DURATION_BUCKETS), "+Inf")  # each bucket's `le` label value
SUM = "sum"  # in a histogram Sample's key, where the `le` value stands in a bucket's key

# One histogram series as the hot path keeps it: the count of each bucket (one per bound,
# then +Inf; not cumulative), the count of untimed answers (queries_total counts them, the
# histogram does not), then the sum of the values observed.
Row = list[float]
# The duration `Queries.record` takes for an answer counted but not timed (pipeline.py says
# which answers are timed).
UNTIMED = -1.0

# queries_total's labels besides protocol and outcome, from fixed sets: the question's type
# (the rest `other`), and the answer's response code from its header's four bits (the rest
# `other`), or `none` when nothing was sent.
QTYPES = {1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 2: "NS", 6: "SOA", 12: "PTR",
          33: "SRV", 65: "HTTPS", 64: "SVCB", 255: "ANY"}
OTHER = "other"
# The label of each type number below 256 (every named one is), for a tuple index on the hot
# path rather than a dict.get call: 40 ns less per answer (bench/micro.py's record line).
_QTYPE_LABELS = tuple(QTYPES.get(number, OTHER) for number in range(256))
NO_ANSWER = "none"
RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", OTHER, "REFUSED", *[OTHER] * 10)
# The series each outcome is exported under from the start (at 0), so that rate() sees its
# first count: that outcome's usual question type and response code.
_USUAL = {"blocked": ("A", "NXDOMAIN"), "cached": ("A", "NOERROR"),
          "stale": ("A", "NOERROR"), "forwarded": ("A", "NOERROR"),
          "servfail": ("A", "SERVFAIL"), "formerr": (OTHER, "FORMERR"),
          "dropped": (OTHER, NO_ANSWER), "refused": ("A", "REFUSED"),
          "ratelimited": ("A", NO_ANSWER), "minimal": ("ANY", "NOERROR")}


def new_row() -> Row:
    return [0] * (len(DURATION_BUCKETS) + 3)


def observe(row: Row, value: float) -> None:
    """Count one value into a histogram row. Most values on the hot path are synchronous
    answers, below the first bound: one comparison finds their bucket, no bisect."""
    row[0 if value <= _FIRST_BOUND else bisect_left(DURATION_BUCKETS, value)] += 1
    row[-1] += value


@dataclass(frozen=True, slots=True)
class Sample:
    """One family's values at one moment, as plain data that can cross a process boundary.

    For a histogram, each key is the series' label values followed by a bucket's `le` value
    (its count cumulative, as exported) or SUM; so merging histograms is adding values too.
    `merge` says how the supervisor combines workers: counters, histograms and most gauges
    add up; a gauge that every worker reports alike (rules loaded) takes the maximum.
    """

    kind: str  # "counter", "gauge" or "histogram"
    name: str
    help: str
    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float]
    merge: str = "sum"  # or "max"

    @property
    def monotonic(self) -> bool:
        """Whether the values only grow (kept for a worker that died, so sums never drop)."""
        return self.kind != "gauge"

    def family(self) -> Metric:
        name = f"{NAMESPACE}_{self.name}"
        if self.kind == "histogram":
            return self._histogram(name)
        make = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = make(name, self.help, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family

    def _histogram(self, name: str) -> Metric:
        family = HistogramMetricFamily(name, self.help, labels=self.labels)
        buckets: dict[tuple[str, ...], list[tuple[str, float]]] = {}
        sums: dict[tuple[str, ...], float] = {}
        for key, value in self.values.items():
            series, le = key[:-1], key[-1]
            if le == SUM:
                sums[series] = value
            else:
                buckets.setdefault(series, []).append((le, value))
        for series, counts in buckets.items():
            counts.sort(key=lambda bucket: float(bucket[0]))  # "+Inf" parses as a float
            family.add_metric(series, counts, sums.get(series, 0.0))
        return family


def histogram_values(rows: dict[tuple[str, ...], Row]) -> dict[tuple[str, ...], float]:
    """A Sample's values for histogram rows: cumulative bucket counts and the sum."""
    values: dict[tuple[str, ...], float] = {}
    for key, row in rows.items():
        total = 0.0
        for le, count in zip(_LE, row[:-2], strict=True):  # untimed and the sum after them
            total += count
            values[(*key, le)] = total
        values[(*key, SUM)] = row[-1]
    return values


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
class Histogram:
    """A histogram family: a dict from label values to a Row. A component that observes one
    series on a hot path takes its row once (`row`) and calls `observe` on it."""

    name: str
    help: str
    labels: tuple[str, ...]
    rows: dict[tuple[str, ...], Row] = field(default_factory=dict)

    def row(self, key: tuple[str, ...]) -> Row:
        """The series' row, made (and exported, at 0) on first use."""
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = new_row()
        return row

    def sample(self) -> Sample:
        return Sample("histogram", self.name, self.help, self.labels,
                      histogram_values(_copy(self.rows)))


def _copy(rows: dict[tuple[str, ...], Row]) -> dict[tuple[str, ...], Row]:
    """The rows as they are now, read from the metrics thread while the event loop observes:
    dict() and a row's slice are each one C-level copy, so no row changes half-read."""
    return {key: row[:] for key, row in dict(rows).items()}


class Queries:
    """resolver_queries_total and resolver_request_duration_seconds, from one table.

    Per (protocol, outcome, qtype, rcode) a histogram Row of how long the answers took, from
    receipt to the answer handed to the transport: one `record` per query keeps both, the
    count being the row's total. The duration histogram is exported by outcome alone.
    """

    labels = ("protocol", "outcome", "qtype", "rcode")

    def __init__(self) -> None:
        self.rows: dict[tuple[str, ...], Row] = {}

    def record(self, transport: str, outcome: str, qtype: int, answer: bytes | None,
               duration: float) -> None:
        """One query, answered (the rcode from the answer's header) or not (answer None).
        The one function every answer passes through: `observe` written out, and the row
        found by subscript (a miss is once per key), for the calls they would cost."""
        key = (transport, outcome, _QTYPE_LABELS[qtype] if qtype < 256 else OTHER,
               NO_ANSWER if answer is None else RCODES[answer[3] & 0xF])
        try:
            row = self.rows[key]
        except KeyError:
            row = self.rows[key] = new_row()
        if duration < 0:  # UNTIMED
            row[-2] += 1
            return
        row[0 if duration <= _FIRST_BOUND else bisect_left(DURATION_BUCKETS, duration)] += 1
        row[-1] += duration

    def row(self, transport: str, outcome: str, qtype: int, answer: bytes) -> Row:
        """The row a query of this type with this answer counts in (the packet cache keeps it
        with the answer it replays)."""
        key = (transport, outcome, QTYPES.get(qtype, OTHER), RCODES[answer[3] & 0xF])
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = new_row()
        return row

    def expect(self, transports: Iterable[str], outcomes: Iterable[str]) -> None:
        """Export every transport and outcome at 0 from the start, under the outcome's usual
        question type and response code."""
        outcomes = tuple(outcomes)
        for transport in transports:
            for outcome in outcomes:
                key = (transport, outcome, *_USUAL.get(outcome, (OTHER, OTHER)))
                self.rows.setdefault(key, new_row())

    @property
    def counts(self) -> dict[tuple[str, ...], int]:
        """Queries by (protocol, outcome, qtype, rcode), the ones counted so far."""
        return {key: int(sum(row[:-1])) for key, row in dict(self.rows).items()
                if any(row[:-1])}

    def samples(self) -> list[Sample]:
        rows = _copy(self.rows)
        counts = {key: sum(row[:-1]) for key, row in rows.items()}
        by_outcome: dict[tuple[str, ...], Row] = {}
        for key, row in rows.items():
            total = by_outcome.setdefault((key[1],), new_row())
            for index, value in enumerate(row):
                total[index] += value
        return [
            Sample("counter", "queries_total", "Queries answered (or dropped), by transport, "
                   "outcome, question type and response code.", self.labels, counts),
            Sample("histogram", "request_duration_seconds", "Time from a query's receipt to "
                   "its answer handed to the transport, by outcome.", ("outcome",),
                   histogram_values(by_outcome)),
        ]


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


def build_info() -> Sample:
    """resolver_build_info: the package version, the Python version, and the event loop
    (uvloop in the server, asyncio where none runs uvloop's), valued 1."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout never installed
        version = "unknown"
    try:
        running = type(asyncio.get_running_loop()).__module__
    except RuntimeError:
        running = "asyncio"
    loop = "uvloop" if running.startswith("uvloop") else "asyncio"
    return Sample("gauge", "build_info", "The resolver's version, the Python version and the "
                  "event loop; always 1.", ("version", "python", "loop"),
                  {(version, platform.python_version(), loop): 1}, merge="max")


class Metrics:
    """Every metric of one server process. Components count into the tallies they own and
    register gauges for their state; pass a fresh CollectorRegistry per test.

    process: the `process` label of the resolver_process_* metrics: `main` for a single
    process, `worker-N` in a worker, `supervisor` in the supervisor.
    """

    def __init__(self, registry: CollectorRegistry | None = None, process: str = "main"):
        self.process = process
        self.queries = Queries()
        self.blocked = Tally("blocked_total", "Blocked answers, by rule list, entry and action.",
                             ("list", "entry", "action"))
        self.upstream_queries = Tally("upstream_queries_total",
                                      "Queries sent upstream, by upstream and protocol.",
                                      ("upstream", "protocol"))
        self.upstream_errors = Tally("upstream_errors_total",
                                     "Upstream attempts that failed, by upstream and kind.",
                                     ("upstream", "kind"))
        self.upstream_durations = Histogram(
            "upstream_duration_seconds", "Time from sending a query upstream to its reply, "
            "per attempt answered (a TCP retry after a truncated reply included), by "
            "upstream.", ("upstream",))
        self.cache = Tally("cache_total", "Cache lookups and stores, by result.", ("result",))
        self.reloads = Tally("reloads_total", "Rule reloads, by result (ok, failed, refused "
                             "by the guard, unchanged).", ("result",))
        self.reloads.expect([(result,) for result in RELOAD_RESULTS])
        self._tallies = [self.blocked, self.upstream_queries, self.upstream_errors,
                         self.cache, self.reloads]
        self._gauges: list[Gauge] = []
        self._build = build_info()  # here: the loop that runs is the one building the server
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

    def process_samples(self) -> list[Sample]:
        """This process' resource use, under its `process` label (the supervisor adds its own
        to its workers')."""
        key = (self.process,)
        return [Sample(kind, name, help, ("process",), {key: value})
                for name, (kind, help, value) in _process.usage().items()]

    def snapshot(self) -> list[Sample]:
        """Every family's current values (what a worker sends its supervisor)."""
        return [*self.queries.samples(), *(t.sample() for t in self._tallies),
                self.upstream_durations.sample(), *(g.sample() for g in self._gauges),
                self._build, *self.process_samples()]

    def collect(self) -> Iterator[Metric]:
        for sample in self.snapshot():
            yield sample.family()
