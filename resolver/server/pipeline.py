"""The query path from bytes to answer, shared by the UDP and TCP transports.

A packet is decoded once and offered to the synchronous stages in order; only if none of them
answers is it handed to the forwarder, which answers later through `respond`. `respond` is the
one place where an exception becomes SERVFAIL.
"""

from __future__ import annotations

import logging
from typing import Protocol

from resolver.message import wire
from resolver.stages.cache import Entry
from resolver.stages.forward import Forwarder
from resolver.ops.metrics import Metrics
from resolver.stages.packetcache import PacketCache
from resolver.message.query import FORWARD, Memo, Outcome, Query
from resolver.message.reply import Reply
from resolver.upstream.pool import UpstreamError
from resolver.message.constants import SERVFAIL

log = logging.getLogger(__name__)

PENDING = b""  # handle()'s answer when it will come later through sink.deliver


class Stage(Protocol):
    """A synchronous step that may answer a query (returns bytes), pass it on (None), or
    send it straight upstream (FORWARD: no later stage could answer it).

    memo: set by answer() when that answer may be replayed to identical UDP queries, and
    until when (see packetcache.py); the pipeline takes it and resets it to None.
    """

    outcome: str
    memo: Memo | None

    def answer(self, q: Query) -> bytes | None: ...


class Sink(Protocol):
    """Where answers go: a transport that knows how to reach the client."""

    name: str

    def deliver(self, answer: bytes, client: tuple) -> None: ...


class Pipeline:
    """Decode, the synchronous stages, then the forwarder for a bounded number of clients."""

    def __init__(self, stages: list[Stage], forwarder: Forwarder, metrics: Metrics,
                 max_inflight: int, packets: PacketCache):
        self.stages = stages
        self.packets = packets
        self._forwarder = forwarder
        forwarder.respond = self.respond
        self._metrics = metrics
        self._answered = metrics.queries.counts  # counted inline for forwarded answers
        self._max_inflight = max_inflight
        metrics.gauge("inflight", "Queries waiting for an upstream answer.", (),
                      lambda: {(): forwarder.waiting})

    def handle(self, data: bytes, client: tuple, sink: Sink, remember: bool = False
               ) -> bytes | None:
        """Answer a packet now (the bytes returned), later (PENDING: through sink.deliver), or
        never (None: dropped). remember: offer local answers to the packet cache."""
        try:
            q = wire.parse_query(data, client, sink.name)
        except wire.FormError as exc:
            outcome = Outcome.FORMERR if exc.response is not None else Outcome.DROPPED
            self._metrics.queries.inc((sink.name, outcome))
            return exc.response
        for stage in self.stages:
            answer = stage.answer(q)
            if answer is not None:
                if answer is FORWARD:
                    break
                self._metrics.queries.inc((sink.name, stage.outcome))
                memo = stage.memo
                if memo is not None:
                    stage.memo = None
                    if remember:
                        self.packets.remember(data, answer, stage.outcome, memo)
                return answer
        if self._forwarder.waiting >= self._max_inflight:  # shed load, don't grow memory
            self._metrics.queries.inc((sink.name, Outcome.DROPPED))
            return None
        self._forwarder.submit(q, sink)
        return PENDING

    def respond(self, q: Query, sink: Sink, reply: Reply | None, stale: Entry | None) -> None:
        """Deliver a later answer, made by the forwarder from an upstream reply or a stale
        entry, or SERVFAIL if making it raises."""
        try:
            answer, outcome = self._forwarder.answer(q, reply, stale)
        except UpstreamError as exc:
            log.debug("upstream failed: %s", exc)
            answer, outcome = wire.error_answer(q, SERVFAIL), Outcome.SERVFAIL
        except Exception:
            log.exception("unexpected error while answering a forwarded query")
            answer, outcome = wire.error_answer(q, SERVFAIL), Outcome.SERVFAIL
        counts = self._answered
        key = (q.transport, outcome)
        counts[key] = counts.get(key, 0) + 1
        sink.deliver(answer, q.client)

    def drain(self) -> None:
        """Abandon forwarding still in flight (at shutdown)."""
        self._forwarder.drain()
