"""The query path from bytes to answer, shared by the UDP and TCP transports.

A packet is decoded once and offered to the synchronous stages in order (server.app writes
the order); only if none of them answers is it handed to the forwarder, which answers later
through its `deliver` callback. Both halves run under the same guard: an exception becomes
SERVFAIL (stages.contract.servfail), counted like any other answer, whichever half gave
it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from resolver.message import wire
from resolver.message.constants import Clock
from resolver.message.query import Outcome, Query
from resolver.ops.metrics import Metrics
from resolver.stages.contract import (
    DROP,
    FORWARD,
    LATER,
    PASS,
    Answered,
    Drop,
    Later,
    Pass,
    QueryObserver,
    Sink,
    Stage,
    servfail,
)
from resolver.stages.forward import Forwarder

log = logging.getLogger(__name__)


class Pipeline:
    """Decode, the synchronous stages, then the forwarder for a bounded number of clients.

    Every query is counted once, when it is answered or dropped, in resolver_queries_total
    and resolver_request_duration_seconds (one `Queries.record`), then offered to the
    observer if one is configured (the query log). A query answered here is not timed: see
    `LOCAL`."""

    def __init__(self, stages: Sequence[Stage], forwarder: Forwarder, metrics: Metrics,
                 max_inflight: int, clock: Clock, observer: QueryObserver | None = None):
        self._stages = tuple(stages)
        self._forwarder = forwarder
        self._record = metrics.queries.record  # bound once: this runs for every query
        self._max_inflight = max_inflight
        self._clock = clock
        self._observer = observer

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink
               ) -> Answered | Later | Drop:
        """Answer a packet now (Answered), later (LATER: through the forwarder's deliver),
        or never (DROP)."""
        try:
            q = wire.parse_query(data, client, sink.name)
        except wire.FormError as error:
            if error.response is None:
                self._done(None, sink.name, Outcome.DROPPED, None)
                return DROP
            self._done(None, sink.name, Outcome.FORMERR, error.response)
            return Answered(error.response, Outcome.FORMERR)
        except Exception:  # a bug in decoding: with no question, nothing can be answered
            log.exception("unexpected error while decoding a query")
            self._done(None, sink.name, Outcome.DROPPED, None)
            return DROP
        try:
            return self._run(q, sink)
        except Exception as error:
            answered = servfail(q, error)
            self._done(q, sink.name, answered.outcome, answered.data)
            return answered

    def _run(self, q: Query, sink: Sink) -> Answered | Later | Drop:
        per_client = False
        for stage in self._stages:
            result = stage.answer(q)
            if result is PASS:
                continue
            if isinstance(result, Answered):  # _done written out: every local answer's path
                self._record(sink.name, result.outcome, q.qtype, result.data, LOCAL)
                if self._observer is not None:
                    offer(self._observer, q, sink.name, result.outcome, result.data, LOCAL, "")
                if per_client and result.replay is not None:  # not for the next client
                    return Answered(result.data, result.outcome)
                return result
            if result is FORWARD:
                break
            if isinstance(result, Pass):
                per_client = per_client or result.per_client
                continue
            if result is DROP:
                self._done(q, sink.name, Outcome.DROPPED, None)
                return DROP
            raise TypeError(f"{stage!r} returned {result!r}, which is no stage result")
        if self._forwarder.waiting >= self._max_inflight:  # shed load, don't grow memory
            self._done(q, sink.name, Outcome.DROPPED, None)
            return DROP
        q.received = self._clock()
        self._forwarder.submit(q, sink)
        return LATER

    def _done(self, q: Query | None, transport: str, outcome: str, answer: bytes | None
              ) -> None:
        """Count a query answered here (or dropped: answer None); q None: undecodable."""
        self._record(transport, outcome, 0 if q is None else q.qtype, answer, LOCAL)
        if self._observer is not None:
            offer(self._observer, q, transport, outcome, answer, LOCAL, "")


# The duration an answer given synchronously is counted with: none, so it falls in the first
# bucket (25 us). Such an answer (blocked, cached, refused, FORMERR, a packet-cache replay,
# or a drop) is a few microseconds of Python that neither waits on I/O nor, for a replay,
# allocates anything the garbage collector tracks; timing it would take two clock reads,
# ~100 ns, a third of a replay and over 3% of a whole query with the socket calls (measured
# with bench/micro.py; docs/metrics.md). Only the answers that wait are timed.
LOCAL = 0.0


class Delivery:
    """Where the forwarder's later answers go: counted and timed from when the query was
    handed to the forwarder, offered to the observer, then handed to the sink that reaches
    the client."""

    def __init__(self, metrics: Metrics, clock: Clock, observer: QueryObserver | None = None):
        self._record = metrics.queries.record
        self._clock = clock
        self._observer = observer

    def deliver(self, q: Query, sink: Sink, answer: bytes, outcome: str, upstream: str
                ) -> None:
        duration = self._clock() - q.received
        self._record(q.transport, outcome, q.qtype, answer, duration)
        if self._observer is not None:
            offer(self._observer, q, q.transport, outcome, answer, duration, upstream)
        sink.deliver(answer, q.client)


def offer(observer: QueryObserver, q: Query | None, transport: str, outcome: str,
          answer: bytes | None, duration: float, upstream: str) -> None:
    """Show the observer a query; a bug in it is logged and costs no answer."""
    try:
        observer.offer(q, transport, outcome, answer, duration, upstream)
    except Exception:
        log.exception("unexpected error in the query observer")
