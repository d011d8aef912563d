"""The last stage: ask upstream, once per distinct question in flight, cache the reply, and
answer each waiting client: from the reply, blocked (CNAME cloaking), or stale (RFC 8767).

Each distinct question in flight is one Flight, kept in `_inflight` by cache key, with the
clients waiting for it; an expiring popular name costs the upstream one query, not a
stampede. Nothing here is a task: a Flight is the upstream Exchange itself and calls `landed`
when it ends, and a timer serves stale answers to clients that should not wait longer (RFC
8767's client response timer). A prefetch is a flight with nobody waiting.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from resolver.message import wire
from resolver.stages.blocking import Blocker
from resolver.stages.cache import Cache, Entry
from resolver.ops.config import CacheConfig
from resolver.ops.metrics import Metrics
from resolver.message.query import Outcome, Query
from resolver.message.reply import Reply, TtlPolicy, failure, render, render_stale, scan_reply
from resolver.upstream.pool import MOVE_ON, Exchange, UpstreamError, UpstreamPool
from resolver.message.constants import SERVFAIL

if TYPE_CHECKING:
    from resolver.server.pipeline import Sink  # noqa: F401 (annotations only: pipeline imports this module)

Respond = Callable[..., None]  # Pipeline.respond(q, sink, reply, stale)
_PREFETCH = ("prefetch",)  # the cache_total result a refresh counts


class Flight(Exchange):
    """One question on its way upstream, and the clients waiting for it: the exchange itself,
    so a forward costs one object. The first client is the exchange's own query (`sink` is
    where its answer goes; None for a prefetch, which nobody waits for); clients asking the
    same question meanwhile queue in `more`."""

    more: list[tuple[Query, Sink]] | None = None
    stale: Entry | None = None  # the expired answer to fall back on, if any
    stale_due = False  # the client response timer fired: serve stale at once
    stale_timer: asyncio.TimerHandle | None = None

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
    """Resolves queries through the upstream pool, coalescing identical questions."""

    def __init__(self, upstreams: UpstreamPool, cache: Cache, policy: TtlPolicy,
                 blocker: Blocker, config: CacheConfig, metrics: Metrics, max_inflight: int):
        self.upstreams = upstreams
        self._cache = cache
        self._policy = policy
        self._blocker = blocker
        self._stale_ttl = config.stale_ttl
        self._stale_timeout = config.stale_client_timeout
        self._tally = metrics.cache
        self._tally.expect([_PREFETCH])
        self._max_inflight = max_inflight
        self._inflight: dict[tuple, Flight] = {}
        self.waiting = 0  # clients waiting on a flight
        self.respond: Respond = _unwired

    def submit(self, q: Query, sink: Sink) -> None:
        """Answer q later, through respond(), once its question has been asked upstream."""
        flight = self._inflight.get(q.cache_key)
        if flight is None:
            self.waiting += 1
            self._open(q, sink).start()  # may end at once: the flight knows its client
        elif flight.stale_due:
            self.respond(q, sink, None, flight.stale)
        else:
            self.waiting += 1
            flight.join(q, sink)
            if flight.stale is None and q.cache_key in self._cache.entries:
                self._arm_stale(flight)  # a prefetch began before the answer expired

    def prefetch(self, q: Query) -> None:
        """Refresh q's cached answer in the background (a popular answer about to expire),
        unless a fetch for it is already in flight or too many are."""
        if q.cache_key in self._inflight or len(self._inflight) >= self._max_inflight:
            return
        self._open(q, None).start()
        self._tally.inc(_PREFETCH)

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
        stale = flight.stale = self._cache.stale(flight.q.cache_key)
        if stale is not None:
            flight.stale_timer = self.upstreams.loop.call_later(
                self._stale_timeout, self._stale_due, flight)

    def landed(self, flight: Flight, data: bytes | None) -> None:
        """The exchange ended: cache what came back (answer or failure), answer the waiters."""
        q = flight.q
        key = q.cache_key
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if flight.stale_timer is not None:
            flight.stale_timer.cancel()
        reply = None
        if data is not None:
            try:
                reply = scan_reply(data, 12 + len(q.question), self._policy)
            except (ValueError, IndexError, struct.error):
                pass  # a malformed reply counts as no reply
        if reply is None:
            self._cache.failed(key, failure(self._policy))
        elif reply.rcode in MOVE_ON:  # SERVFAIL is cached briefly, REFUSED not at all
            self._cache.failed(key, reply)
        else:
            self._cache.put(key, reply)
        if flight.more is None:  # the usual case: one client, or a prefetch with none
            if flight.sink is not None:
                self.waiting -= 1
                self.respond(q, flight.sink, reply, flight.stale)
            return
        for q, sink in flight.take_waiters():
            self.waiting -= 1
            self.respond(q, sink, reply, flight.stale)

    def _stale_due(self, flight: Flight) -> None:
        """RFC 8767 client response timer: the waiters get the stale answer now; the flight
        goes on and refreshes the cache when it lands."""
        flight.stale_timer = None
        flight.stale_due = True
        for q, sink in flight.take_waiters():
            self.waiting -= 1
            self.respond(q, sink, None, flight.stale)

    def answer(self, q: Query, reply: Reply | None, stale: Entry | None) -> tuple[bytes, str]:
        """What one waiting client gets: from the reply (None: no usable reply came, or
        none is waited for), else the stale answer, else SERVFAIL (by raising)."""
        if reply is None or reply.rcode in MOVE_ON:  # failures to refresh (RFC 8767 4)
            if stale is not None:
                return self._stale(q, stale.reply)
            if reply is None:
                raise UpstreamError("no usable answer from any upstream")
            if reply.rcode == SERVFAIL:
                return render(q, reply, 0), Outcome.SERVFAIL
        if reply.cnames:
            cloak = self._blocker.check_chain(reply.cnames)
            if cloak is not None:
                return self._blocker.answer_chain(q, cloak), Outcome.BLOCKED
        return render(q, reply, 0), Outcome.FORWARDED

    def _stale(self, q: Query, reply: Reply) -> tuple[bytes, str]:
        self._tally.inc(("stale",))
        return render_stale(q, reply, self._stale_ttl), Outcome.STALE


def _unwired(*args) -> None:
    raise RuntimeError("Forwarder.respond is set by the Pipeline that owns it")
