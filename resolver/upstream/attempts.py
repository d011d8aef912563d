"""The attempt plan for one question: which upstream next, timeouts, TC to TCP, health.

Pure logic, no sockets and no clock: every step is a method given `now` (the driver reads
the one injected clock), and every effect goes through the upstream's I/O objects, which a
driver implements (upstream/udp.py, upstream/stream.py) and a test records. So failover,
backoff and truncation are table tests that run in microseconds.

An Exchange tries the upstreams in the order the plan gives (the strategy and health,
upstream/selection.py), each up to ROUNDS times, until a usable reply, the last SERVFAIL or
REFUSED, or the deadline; then `done(reply bytes or None)` is called once, with `by` naming
the upstream the reply came from. Each reply's time since its attempt was sent feeds the
upstream's health and its duration histogram. SERVFAIL and
REFUSED move on, since another upstream may do better, but do not make an upstream
unhealthy: a live server said them, and the next name may be fine. A truncated UDP reply is
asked again over a stream (TCP) within what is left of the attempt's timeout.
"""

from __future__ import annotations

import logging
from typing import Protocol

from resolver.message.constants import REFUSED, SERVFAIL, TC, Cancellable
from resolver.message.query import Query
from resolver.ops.metrics import Row, observe
from resolver.upstream.selection import Health

log = logging.getLogger(__name__)

ROUNDS = 2  # times each upstream is tried for one query
MOVE_ON = (SERVFAIL, REFUSED)  # rcodes after which another upstream is asked
ERROR_KINDS = ("timeout", "network", "mismatch", "rcode")  # and "tls", over TLS
_TC = TC >> 8  # the TC bit in the header's third byte


class UdpIo(Protocol):
    """Sends an exchange's query over UDP; the driver calls `udp_reply` with the matching
    reply, or `udp_failed` when the attempt times out (after `Exchange.due`) or the network
    fails. The ticket names the attempt in flight to the driver."""

    def send(self, exchange: Exchange) -> object: ...

    def forget(self, ticket: object) -> None: ...


class StreamIo(Protocol):
    """Runs one exchange over a stream (TCP, or TLS for a DNS-over-TLS upstream) within
    timeout seconds; the driver calls `Exchange.stream_reply` or `stream_failed` when it ends,
    unless cancelled."""

    def send(self, exchange: Exchange, timeout: float) -> Cancellable: ...


class Upstream:
    """One upstream as the plan sees it: its name (the metric label), attempt timeout,
    health, the I/O that carries its queries (udp None: every query over the stream), and
    its row of resolver_upstream_duration_seconds."""

    __slots__ = ("name", "timeout", "health", "udp", "stream", "durations")

    def __init__(self, name: str, timeout: float, health: Health, udp: UdpIo | None,
                 stream: StreamIo, durations: Row):
        self.name = name
        self.timeout = timeout
        self.health = health
        self.udp = udp
        self.stream = stream
        self.durations = durations

    def replied(self, rtt: float, now: float) -> None:
        """A reply of any kind came at now, rtt seconds after the attempt was sent."""
        self.health.success(rtt, now)
        observe(self.durations, rtt)


class Plan(Protocol):
    """Where an exchange's upstreams come from (upstream.pool.UpstreamPool)."""

    deadline: float  # seconds for the whole exchange

    def order(self, q: Query, now: float) -> list[Upstream]: ...

    def count_error(self, upstream: Upstream, kind: str) -> None: ...


class Exchange:
    """One question's way through the upstreams. Subclasses say what `done` does
    (stages.forward.Flight caches and answers; the pool's awaited exchange resolves a
    future), so a forward is one object, not an exchange plus a callback."""

    # Starting values as class attributes, so making one (per forward) sets two. No
    # __slots__ for the same reason: slots cannot have class-level defaults.
    due = 0.0  # when the UDP attempt in flight times out
    by = ""  # the upstream whose reply `done` got (the last SERVFAIL's, if that is relayed)
    ticket: object = None  # the UDP attempt in flight, as its driver names it
    _attempt = 0
    _last: bytes | None = None  # the last SERVFAIL/REFUSED, relayed if nothing better comes
    _stream: Cancellable | None = None
    _over = False

    def __init__(self, q: Query, plan: Plan):
        self.q = q
        self._plan = plan

    def done(self, data: bytes | None) -> None:
        raise NotImplementedError

    def start(self, now: float) -> None:
        self._order = self._plan.order(self.q, now)
        self._deadline = now + self._plan.deadline
        self._next(now)

    def cancel(self) -> None:
        """Stop without calling back (shutdown, or nobody waits any more)."""
        self._over = True
        self._stop_udp()
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def udp_reply(self, data: bytes, now: float) -> None:
        """A matching datagram (the driver has forgotten the attempt already): done, the next
        attempt after SERVFAIL or REFUSED, or a retry over TCP when it came truncated."""
        self.ticket = None
        if data[2] & _TC:
            left = self._timeout - (now - self._sent)
            self._send(self._upstream, left if left > 0.001 else 0.001, now, stream=True)
        elif data[3] & 0xF in MOVE_ON:
            self._got(data, now)
        else:  # the usual ending, without _got's and _finish's calls
            upstream = self._upstream
            upstream.replied(now - self._sent, now)
            if not self._over:
                self._over = True
                self.by = upstream.name
                self.done(data)

    def udp_failed(self, kind: str, now: float) -> None:
        """The UDP attempt timed out or failed on the network (kind: the error label)."""
        self._stop_udp()
        self._failed(kind, now)

    def stream_reply(self, data: bytes, now: float) -> None:
        """A stream attempt ended with a matching reply."""
        self._stream = None
        self._got(data, now)

    def stream_failed(self, kind: str, now: float) -> None:
        """A stream attempt failed (kind: the error label)."""
        self._stream = None
        self._failed(kind, now)

    def _next(self, now: float) -> None:
        if self._over:  # cancelled while a stream attempt was finishing
            return
        order = self._order
        remaining = self._deadline - now
        if self._attempt >= ROUNDS * len(order) or remaining <= 0:
            self._finish(self._last)
            return
        upstream = self._upstream = order[self._attempt % len(order)]
        self._attempt += 1
        timeout = upstream.timeout
        if remaining < timeout:
            timeout = remaining
        self._sent, self._timeout = now, timeout
        self._send(upstream, timeout, now, stream=upstream.udp is None)

    def _send(self, upstream: Upstream, timeout: float, now: float, stream: bool) -> None:
        """One attempt through the upstream's I/O. A driver that cannot send (closed at
        shutdown, or a bug) fails the attempt as `network` and the exchange moves on, so it
        still ends and its waiters are answered; the upstream's health is not charged, since
        nothing reached it."""
        try:
            if stream:
                self._stream = upstream.stream.send(self, timeout)
            else:
                self.due = now + timeout  # the driver fails the attempt then
                self.ticket = upstream.udp.send(self)  # type: ignore[union-attr]  # has UDP
        except Exception:
            log.exception("could not send a query to upstream %s", upstream.name)
            self._plan.count_error(upstream, "network")
            self._next(now)

    def _stop_udp(self) -> None:
        if self.ticket is not None:
            self._upstream.udp.forget(self.ticket)  # type: ignore[union-attr]  # went by UDP
            self.ticket = None

    def _failed(self, kind: str, now: float) -> None:
        upstream = self._upstream
        self._plan.count_error(upstream, kind)
        upstream.health.failure(now, self._timeout, self._sent)
        self._next(now)

    def _got(self, data: bytes, now: float) -> None:
        upstream = self._upstream
        upstream.replied(now - self._sent, now)
        self.by = upstream.name  # kept with _last, or with the reply that ends it here
        if data[3] & 0xF in MOVE_ON:
            self._plan.count_error(upstream, "rcode")
            self._last = data
            self._next(now)
        else:
            self._finish(data)

    def _finish(self, data: bytes | None) -> None:
        if not self._over:
            self._over = True
            self.done(data)
