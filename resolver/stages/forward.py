"""The forward half: ask upstream once per distinct question in flight, cache the reply, and
answer each waiting client, from the reply, blocked (CNAME cloaking), or stale.

Each distinct question in flight is one Flight, kept by cache key with the clients waiting
for it, so an expiring popular name costs the upstream one query, not a stampede. A Flight is
the upstream attempts.Exchange itself and lands here when it ends; answers go to the one
`deliver` callback given at construction. A prefetch (`refresh`) is a flight nobody waits for.

No sockets, no loop, no clock of its own: time comes from the injected clock, the RFC 8767
client response timer from the injected `schedule` (loop.call_later in the server), so
coalescing, stale fallbacks and prefetch flights are table tests with a fake clock.
"""

from __future__ import annotations

import logging
import struct

from resolver.message import wire
from resolver.message.constants import HEADER_SIZE, SERVFAIL, Cancellable, Clock
from resolver.message.query import CacheKey, Outcome, Query
from resolver.message.reply import Reply, TtlPolicy, failure, render, scan_reply
from resolver.message.scrub import scrub
from resolver.ops.metrics import Metrics
from resolver.stages.cache import Cache, Entry
from resolver.stages.cname import CnameCheck
from resolver.stages.contract import Answered, CallLater, Deliver, Sink, servfail
from resolver.stages.stale import ServeStale
from resolver.upstream.attempts import MOVE_ON, Exchange, Plan

log = logging.getLogger(__name__)


class Flight(Exchange):
    """One question on its way upstream, and the clients waiting for it. The first client is
    the exchange's own query (`sink` is where its answer goes; None for a prefetch); clients
    asking the same question meanwhile queue in `more`."""

    more: list[tuple[Query, Sink]] | None = None
    stale: Entry | None = None  # the expired answer to fall back on, if any
    stale_due = False  # the client response timer fired: serve stale at once
    stale_timer: Cancellable | None = None

    def __init__(self, q: Query, sink: Sink | None, forwarder: Forwarder):
        Exchange.__init__(self, q, forwarder.upstreams)  # not super(): a hot path
        self.forwarder = forwarder
        self.sink = sink

    def done(self, data: bytes | None) -> None:
        self.forwarder.landed(self, data)

    def join(self, q: Query, sink: Sink) -> None:
        if self.more is None:
            self.more = []
        self.more.append((q, sink))

    def take_waiters(self) -> list[tuple[Query, Sink]]:
        """Every client still waiting, who will not be waiting any more."""
        waiters = [] if self.sink is None else [(self.q, self.sink)]
        if self.more:
            waiters += self.more
        self.sink = self.more = None
        return waiters


class Forwarder:
    """Resolves queries through the upstreams, coalescing identical questions."""

    def __init__(self, upstreams: Plan, cache: Cache, policy: TtlPolicy, stale: ServeStale,
                 cname: CnameCheck, deliver: Deliver, schedule: CallLater, clock: Clock,
                 metrics: Metrics, max_inflight: int):
        self.upstreams = upstreams
        self._cache = cache
        self._policy = policy
        self._stale = stale
        self._cname = cname
        self._deliver = deliver
        self._schedule = schedule
        self._clock = clock
        self._max_inflight = max_inflight
        self._inflight: dict[CacheKey, Flight] = {}
        self.waiting = 0  # clients waiting on a flight
        metrics.gauge("inflight", "Queries waiting for an upstream answer.", (),
                      lambda: {(): self.waiting})

    @property
    def flights(self) -> int:
        """Distinct questions in flight (prefetches included)."""
        return len(self._inflight)

    def submit(self, q: Query, sink: Sink) -> None:
        """Answer q later, through deliver, once its question has been asked upstream."""
        flight = self._inflight.get(q.cache_key)
        if flight is None:
            self.waiting += 1
            flight = self._open(q, sink)
            try:
                flight.start(self._clock())  # may end at once: the flight knows its client
            except BaseException:  # a bug in the plan: the pipeline's guard answers, and
                # nothing stays in flight (a driver that cannot send fails its attempt instead)
                self._abandon(flight)
                raise
        elif flight.stale_due:
            self._respond(q, sink, None, flight.stale, "")
        else:
            if flight.stale is None and q.cache_key in self._cache.entries:
                self._arm_stale(flight)  # a prefetch began before the answer expired
            self.waiting += 1  # only now: nothing above left this client half joined
            flight.join(q, sink)

    def refresh(self, q: Query) -> bool:
        """Refresh q's cached answer in the background (a prefetch), unless a fetch for it is
        already in flight or too many are; whether one was started."""
        if q.cache_key in self._inflight or len(self._inflight) >= self._max_inflight:
            return False
        flight = self._open(q, None)
        try:
            flight.start(self._clock())
        except Exception:  # a bug in the plan costs the refresh, not the hit that asked
            log.exception("unexpected error while starting a prefetch")
            self._abandon(flight)
            return False
        return True

    def _abandon(self, flight: Flight) -> None:
        if self._inflight.get(flight.q.cache_key) is flight:
            del self._inflight[flight.q.cache_key]
        flight.cancel()
        if flight.stale_timer is not None:
            flight.stale_timer.cancel()
        if flight.sink is not None:
            flight.sink = None
            self.waiting -= 1

    def drain(self) -> None:
        """Abandon the flights still in the air (at shutdown)."""
        for flight in self._inflight.values():
            flight.cancel()
            if flight.stale_timer is not None:
                flight.stale_timer.cancel()
        self._inflight.clear()
        self.waiting = 0

    def _open(self, q: Query, sink: Sink | None) -> Flight:
        """Register a flight for q's question, ready to start."""
        key = q.cache_key
        flight = self._inflight[key] = Flight(q, sink, self)
        if key in self._cache.entries:  # else there is nothing to be stale: no call
            self._arm_stale(flight)
        return flight

    def _arm_stale(self, flight: Flight) -> None:
        """If the cache holds an expired answer that may be served stale, keep it on the
        flight and start RFC 8767's client response timer."""
        stale = flight.stale = self._stale.fallback(flight.q.cache_key)
        if stale is not None:
            flight.stale_timer = self._schedule(self._stale.client_timeout, self._stale_due,
                                                flight)

    def landed(self, flight: Flight, data: bytes | None) -> None:
        """The exchange ended: cache what came back (answer or failure), answer the waiters."""
        q = flight.q
        key = q.cache_key
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if flight.stale_timer is not None:
            flight.stale_timer.cancel()
        reply = self._read(data, HEADER_SIZE + len(q.question))
        try:
            self._store(key, reply)
        except Exception:  # a bug in caching costs the cache entry, not the waiters' answer
            log.exception("unexpected error while caching an upstream reply")
        by = flight.by if reply is not None else ""
        if flight.more is None:  # the usual case: one client, or a prefetch with none
            sink = flight.sink
            if sink is not None:
                flight.sink = None
                self.waiting -= 1
                self._respond(q, sink, reply, flight.stale, by)
            return
        for waiter, sink in flight.take_waiters():
            self.waiting -= 1
            self._respond(waiter, sink, reply, flight.stale, by)

    def _read(self, data: bytes | None, qend: int) -> Reply | None:
        """The upstream's reply, scrubbed of records that do not belong to its answer
        (message/scrub.py) and ready to replay; None when no usable reply came (a malformed
        one counts as none)."""
        if data is not None:
            try:
                return scan_reply(scrub(data, qend), qend, self._policy)
            except (ValueError, IndexError, struct.error):
                pass
        return None

    def _store(self, key: CacheKey, reply: Reply | None) -> None:
        """Keep the reply in the cache, or the failure (see stale.ServeStale.failed)."""
        if reply is None:
            self._stale.failed(key, failure(self._policy))
        elif reply.rcode in MOVE_ON:  # SERVFAIL is cached briefly, REFUSED not at all
            self._stale.failed(key, reply)
        else:
            self._cache.put(key, reply)

    def _stale_due(self, flight: Flight) -> None:
        """RFC 8767 client response timer: the waiters get the stale answer now; the flight
        goes on and refreshes the cache when it lands."""
        flight.stale_timer = None
        flight.stale_due = True
        for q, sink in flight.take_waiters():
            self.waiting -= 1
            self._respond(q, sink, None, flight.stale, "")

    def _respond(self, q: Query, sink: Sink, reply: Reply | None, stale: Entry | None,
                 by: str) -> None:
        """Deliver one waiter's answer; if making it raises, SERVFAIL (contract.servfail). A
        delivery that raises (a bug in a transport) is logged and costs no other waiter.
        by: the upstream the reply came from, named with the answer unless it is stale."""
        try:
            answered = self.answer(q, reply, stale)
        except Exception as error:
            answered = servfail(q, error)
        outcome = answered.outcome
        try:
            self._deliver(q, sink, answered.data, outcome, "" if outcome == Outcome.STALE else by)
        except Exception:
            log.exception("unexpected error while delivering an answer")

    def answer(self, q: Query, reply: Reply | None, stale: Entry | None) -> Answered:
        """What one waiting client gets: from the reply (None: no usable reply came, or none
        is waited for), else the stale answer, else SERVFAIL."""
        if reply is None or reply.rcode in MOVE_ON:  # failures to refresh (RFC 8767 4)
            if stale is not None:
                return self._stale.serve(q, stale)
            if reply is None:
                return Answered(wire.error_answer(q, SERVFAIL), Outcome.SERVFAIL)
            if reply.rcode == SERVFAIL:
                return Answered(render(q, reply, 0), Outcome.SERVFAIL)
        if reply.cnames:
            cloak = self._cname.verdict(reply.cnames)
            if cloak is not None:
                return self._cname.answer(q, cloak)
        return Answered(render(q, reply, 0), Outcome.FORWARDED)
