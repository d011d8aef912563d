"""The query path from bytes to answer, shared by the UDP and TCP transports.

A packet is decoded once and offered to the synchronous stages in order (server.app writes
the order); only if none of them answers is it handed to the forwarder, which answers later
through its `deliver` callback. Both halves run under the same guard: an exception becomes
SERVFAIL (stages.contract.servfail), counted like any other answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from resolver.message import wire
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
    Sink,
    Stage,
    servfail,
)
from resolver.stages.forward import Forwarder

log = logging.getLogger(__name__)


class Pipeline:
    """Decode, the synchronous stages, then the forwarder for a bounded number of clients."""

    def __init__(self, stages: Sequence[Stage], forwarder: Forwarder, metrics: Metrics,
                 max_inflight: int):
        self._stages = tuple(stages)
        self._forwarder = forwarder
        self._counts = metrics.queries.counts  # counted inline: this runs for every query
        self._max_inflight = max_inflight

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink
               ) -> Answered | Later | Drop:
        """Answer a packet now (Answered), later (LATER: through the forwarder's deliver),
        or never (DROP)."""
        try:
            q = wire.parse_query(data, client, sink.name)
        except wire.FormError as error:
            if error.response is None:
                self._count(sink.name, Outcome.DROPPED)
                return DROP
            self._count(sink.name, Outcome.FORMERR)
            return Answered(error.response, Outcome.FORMERR)
        except Exception:  # a bug in decoding: with no question, nothing can be answered
            log.exception("unexpected error while decoding a query")
            self._count(sink.name, Outcome.DROPPED)
            return DROP
        try:
            return self._run(q, sink)
        except Exception as error:
            answered = servfail(q, error)
            self._count(sink.name, answered.outcome)
            return answered

    def _run(self, q: Query, sink: Sink) -> Answered | Later | Drop:
        per_client = False
        for stage in self._stages:
            result = stage.answer(q)
            if result is PASS:
                continue
            if isinstance(result, Answered):
                self._count(sink.name, result.outcome)
                if per_client and result.replay is not None:  # not for the next client
                    return Answered(result.data, result.outcome)
                return result
            if result is FORWARD:
                break
            if isinstance(result, Pass):
                per_client = per_client or result.per_client
                continue
            if result is DROP:
                self._count(sink.name, Outcome.DROPPED)
                return DROP
            raise TypeError(f"{stage!r} returned {result!r}, which is no stage result")
        if self._forwarder.waiting >= self._max_inflight:  # shed load, don't grow memory
            self._count(sink.name, Outcome.DROPPED)
            return DROP
        self._forwarder.submit(q, sink)
        return LATER

    def _count(self, transport: str, outcome: str) -> None:
        counts = self._counts
        key = (transport, outcome)
        counts[key] = counts.get(key, 0) + 1


class Delivery:
    """Where the forwarder's later answers go: counted by transport and outcome, then
    handed to the sink that reaches the client."""

    def __init__(self, metrics: Metrics):
        self._counts = metrics.queries.counts

    def deliver(self, q: Query, sink: Sink, answer: bytes, outcome: str) -> None:
        counts = self._counts
        key = (q.transport, outcome)
        counts[key] = counts.get(key, 0) + 1
        sink.deliver(answer, q.client)
