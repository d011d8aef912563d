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
from resolver.ops.metrics import UNTIMED, Metrics
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
    and, if it is timed, resolver_request_duration_seconds (one `Queries.record`), then
    offered to the observer if one is configured (the query log). Which queries are timed:
    see `TIME_EVERY`."""

    def __init__(self, stages: Sequence[Stage], forwarder: Forwarder, metrics: Metrics,
                 max_inflight: int, clock: Clock, observer: QueryObserver | None = None):
        self._stages = tuple(stages)
        self._forwarder = forwarder
        self._record = metrics.queries.record  # bound once: this runs for every query
        self._max_inflight = max_inflight
        self._clock = clock
        self._observer = observer

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink,
               started: float | None = None) -> Answered | Later | Drop:
        """Answer a packet now (Answered), later (LATER: through the forwarder's deliver),
        or never (DROP). started: when the packet came (the clock's reading), UNTIMED for
        a query counted but not timed, or None to read the clock now (TCP, which times
        every query)."""
        if started is None:
            started = self._clock()
        try:
            q = wire.parse_query(data, client, sink.name)
        except wire.FormError as error:
            if error.response is None:
                self._done(None, sink.name, Outcome.DROPPED, None, started, data)
                return DROP
            self._done(None, sink.name, Outcome.FORMERR, error.response, started, data)
            return Answered(error.response, Outcome.FORMERR)
        except Exception:  # a bug in decoding: with no question, nothing can be answered
            log.exception("unexpected error while decoding a query")
            self._done(None, sink.name, Outcome.DROPPED, None, started, data)
            return DROP
        try:
            return self._run(q, sink, started)
        except Exception as error:
            answered = servfail(q, error)
            self._done(q, sink.name, answered.outcome, answered.data, started)
            return answered

    def _run(self, q: Query, sink: Sink, started: float) -> Answered | Later | Drop:
        per_client = False
        for stage in self._stages:
            result = stage.answer(q)
            if result is PASS:
                continue
            if isinstance(result, Answered):  # _done written out: every local answer's path
                took = UNTIMED if started < 0 else self._clock() - started
                self._record(sink.name, result.outcome, q.qtype, result.data, took)
                if self._observer is not None:
                    offer(self._observer, q, sink.name, result.outcome, result.data, took, "")
                if per_client and result.replay is not None:  # not for the next client
                    return Answered(result.data, result.outcome)
                return result
            if result is FORWARD:
                break
            if isinstance(result, Pass):
                per_client = per_client or result.per_client
                continue
            if result is DROP:
                self._done(q, sink.name, Outcome.DROPPED, None, started)
                return DROP
            raise TypeError(f"{stage!r} returned {result!r}, which is no stage result")
        if self._forwarder.waiting >= self._max_inflight:  # shed load, don't grow memory
            self._done(q, sink.name, Outcome.DROPPED, None, started)
            return DROP
        q.received = self._clock() if started < 0 else started
        self._forwarder.submit(q, sink)
        return LATER

    def _done(self, q: Query | None, transport: str, outcome: str, answer: bytes | None,
              started: float, data: bytes = b"") -> None:
        """Count a query answered here (or dropped: answer None); q None: undecodable, its
        type read off the packet's bytes (data) as far as they go, as the front does."""
        took = UNTIMED if started < 0 else self._clock() - started
        qtype = wire.question_type(data) if q is None else q.qtype  # as the front counts it
        self._record(transport, outcome, qtype, answer, took)
        if self._observer is not None:
            offer(self._observer, q, transport, outcome, answer, took, "")


# Which UDP queries answered at once are timed: one in TIME_EVERY (the packet cache, which
# sees them first, counts them off), and every one while an observer (the query log) is on.
# Such an answer (blocked, cached, FORMERR, a drop, a packet-cache replay) is a few
# microseconds of Python; timing each would take two clock reads, ~80 ns, about a fifth of
# a replay and 2-3% of a whole query with its socket calls, where counting off costs one
# subtraction (bench/micro.py). One in 16 still gives the latency histogram hundreds of
# samples a second at the lightest load worth watching. Answers that wait on an upstream
# and every TCP query are always timed; the front's refusals and rate limits never.
TIME_EVERY = 16


class Delivery:
    """Where the forwarder's later answers go: counted and timed from Query.received (when
    the packet came, or when the query was handed to the forwarder), offered to the
    observer, then handed to the sink that reaches the client."""

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
