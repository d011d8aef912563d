"""The upstream client: send a query to the upstream servers and return a reply that matches.

UDP goes out through a pool of connected sockets per upstream (the kernel drops datagrams
from any other address, and each socket has its own random ephemeral port); every query gets
a fresh random ID and the next socket, and a socket that has carried SOCKET_QUERIES queries is
replaced by a fresh one, so the source ports keep changing. (A new socket per query, as
Unbound does, would cost a socket setup per forward; this keeps the ports moving for a few
percent of that.) A reply is accepted only when its ID
and question match what we sent. A truncated reply is retried over TCP. An upstream configured
for DNS over TLS goes through dot.py instead, on one persistent connection.

The pool picks the upstreams for a name (a conditional-forwarding domain, or the default
servers), orders them by the configured strategy and their health (selection.py), and an
Exchange moves on after a failure until the deadline, then reports failure (None).

An Exchange is driven by callbacks, not by a task: the UDP datagram callback and the
upstream's timeout sweep move it along, so a forward over UDP costs no task, no future, no
coroutine frames and no timer of its own. Queries go out through the Outbox, together at the
end of the loop pass. Only the rare stream paths (TCP after truncation, DNS over TLS) run as a
task per attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import struct
import time
from collections.abc import Coroutine, Iterable

from resolver.message import wire
from resolver.ops.config import UpstreamConfig, UpstreamServer
from resolver.upstream.dot import DotClient, tls_context
from resolver.upstream.ids import random_id
from resolver.ops.metrics import Metrics, Tally
from resolver.message.names import to_wire
from resolver.server.outbox import Outbox
from resolver.message.query import Query
from resolver.upstream.selection import Backoff, Health, arrange
from resolver.message.constants import REFUSED, SERVFAIL, TC

log = logging.getLogger(__name__)

SOCKETS_PER_UPSTREAM = 4  # more sockets measured slower: fewer replies per wake-up
SWEEP_INTERVAL = 0.02  # seconds between timeout sweeps: how late a timeout may fire
SOCKET_QUERIES = 200  # queries one socket carries before a fresh one (a new port) replaces it
ROUNDS = 2  # times each upstream is tried for one query
MOVE_ON = (SERVFAIL, REFUSED)  # rcodes after which another upstream is asked


class UpstreamError(Exception):
    """No upstream gave a usable answer in time."""


ERROR_KINDS = ("timeout", "network", "mismatch", "rcode")  # and "tls", over TLS


class _Attempt(Exception):
    """One attempt failed; `kind` is the upstream_errors_total label."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def _matches(data: bytes, q: Query) -> bool:
    """A reply to our question: a response, one question, same name (any case), type, class."""
    end = 12 + len(q.question)
    return (len(data) >= end and data[2] & 0x80 and data[4:6] == b"\x00\x01"
            and data[12:end - 4].lower() == q.name and data[end - 4:end] == q.question[-4:])


class _UdpSocket(asyncio.DatagramProtocol):
    """One connected UDP socket with its exchanges in flight, by query ID."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, Exchange] = {}
        self.uses = 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        qid = (data[0] << 8) | data[1]
        exchange = self.pending.get(qid)
        if exchange is not None and _matches(data, exchange.q):  # else late, or a guess
            del self.pending[qid]
            exchange.udp_reply(data)

    def error_received(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        _fail_each(pending.values(), "network")


def _fail_each(exchanges: Iterable[Exchange], kind: str) -> None:
    """Fail every one of these UDP attempts. A bug in one failure's handling is logged and
    costs no other its turn, nor the sweep that calls this its next round."""
    for exchange in exchanges:
        try:
            exchange.udp_failed(kind)
        except Exception:
            log.exception("unexpected error while failing an upstream query")


def address_label(server: UpstreamServer) -> str:
    """The `upstream` metric label: the address as written in config, [v6]:port."""
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{host}:{server.port}"


class Upstream:
    """One upstream server: over UDP with TCP when the reply is truncated, or over TLS."""

    def __init__(self, server: UpstreamServer, config: UpstreamConfig, metrics: Metrics,
                 connections: Tally, outbox: Outbox):
        self.server = server
        self.name = address_label(server)
        self.timeout = server.timeout or config.timeout
        self.health = Health(Backoff(config.unhealthy_after, config.backoff, config.max_backoff),
                             self.timeout)
        self._udp_size = config.udp_size
        self._metrics = metrics
        self._sockets: list[_UdpSocket] = []
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._renewals: set[asyncio.Task] = set()
        self._udp_key = (self.name, "udp")  # label values bound once, off the hot path
        self._counts = metrics.upstream_queries.counts  # counted inline on the hot path
        self._outbox = outbox
        self._retiring: set[_UdpSocket] = set()  # replaced, open for late replies a while
        self._sweep: asyncio.TimerHandle | None = None
        self._tcp_key = (self.name, "tcp")
        self._tls_key = (self.name, "tls")
        self._tls: DotClient | None = None
        self.streams = server.protocol == "tls"  # every query over a stream, not UDP first
        if server.protocol == "tls":
            self._tls = DotClient(server.host, server.port, server.tls_name,
                                  tls_context(server.ca_file), self.timeout,
                                  config.tls_idle_timeout,
                                  lambda: connections.inc((self.name,)))
        # every series this upstream can count, at 0 from the start
        metrics.upstream_queries.expect([self._tls_key] if self.streams
                                        else [self._udp_key, self._tcp_key])
        kinds = ERROR_KINDS + ("tls",) if self.streams else ERROR_KINDS
        metrics.upstream_errors.expect((self.name, kind) for kind in kinds)
        if self.streams:
            connections.expect([(self.name,)])

    async def open(self) -> None:
        """UDP sockets now; a TLS connection is opened by the first query that needs it."""
        self._loop = asyncio.get_running_loop()
        if self._tls is not None:
            return
        for _ in range(SOCKETS_PER_UPSTREAM):
            self._sockets.append(await self._new_socket())

    async def _new_socket(self) -> _UdpSocket:
        _, protocol = await self._loop.create_datagram_endpoint(
            _UdpSocket, remote_addr=(self.server.host, self.server.port))
        return protocol

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for task in self._renewals:
            task.cancel()
        for sock in (*self._sockets, *self._retiring):
            sock.close()
        self._sockets.clear()
        self._retiring.clear()
        if self._tls is not None:
            self._tls.close()

    def send_udp(self, exchange: Exchange) -> tuple[_UdpSocket, int]:
        """Send the exchange's query on the next socket of the pool with a fresh random ID;
        the socket and ID it went out with, for the exchange to keep."""
        sockets = self._sockets
        self._turn = turn = (self._turn + 1) % len(sockets)
        sock = sockets[turn]
        sock.uses += 1
        if sock.uses == SOCKET_QUERIES:
            self._renew(turn, sock)
        pending = sock.pending
        qid = random_id()
        while qid in pending:
            qid = random_id()
        pending[qid] = exchange
        counts = self._counts
        counts[self._udp_key] = counts.get(self._udp_key, 0) + 1
        self._outbox.send(sock.transport, wire.upstream_query(exchange.q, qid, self._udp_size))
        if self._sweep is None:
            self._sweep = self._loop.call_later(SWEEP_INTERVAL, self._expire)
        return sock, qid

    def _expire(self) -> None:
        """Time out the UDP attempts whose time is up.

        One timer per upstream instead of one per query: while anything is in flight, the
        sockets' pending tables are looked over every SWEEP_INTERVAL, so a query costs no
        timer of its own and a timeout fires at most that much late. The tables hold only
        what is in flight, about as many entries as clients waiting.
        """
        now = time.monotonic()
        sockets = (*self._sockets, *self._retiring)
        for sock in sockets:
            if sock.pending:
                _fail_each([e for e in sock.pending.values() if e.due <= now], "timeout")
        busy = any(sock.pending for sock in sockets)
        self._sweep = self._loop.call_later(SWEEP_INTERVAL, self._expire) if busy else None

    def _renew(self, index: int, old: _UdpSocket) -> None:
        """Open a fresh socket (a new random port) to take `old`'s place in the pool."""
        task = self._loop.create_task(self._new_socket())
        self._renewals.add(task)
        task.add_done_callback(functools.partial(self._swap, index, old))

    def _swap(self, index: int, old: _UdpSocket, task: asyncio.Task) -> None:
        """Put the fresh socket in; the old one closes once no reply it carries can still be
        waited for. If opening failed, the old one carries on and is renewed again later."""
        self._renewals.discard(task)
        if task.cancelled() or task.exception() is not None:
            old.uses = 0
            return
        fresh = task.result()
        if index < len(self._sockets) and self._sockets[index] is old:
            self._sockets[index] = fresh
            self._retiring.add(old)
            self._loop.call_later(self.timeout + 1.0, self._retire, old)
        else:  # the pool was closed meanwhile
            fresh.close()

    def _retire(self, old: _UdpSocket) -> None:
        self._retiring.discard(old)
        old.close()

    async def stream(self, q: Query, timeout: float) -> bytes:
        """One exchange over a stream: TLS for a DoT upstream, else TCP (after truncation)."""
        if self._tls is not None:
            return await self._query_tls(q, timeout)
        self._metrics.upstream_queries.inc(self._tcp_key)
        try:
            return await asyncio.wait_for(self._tcp(q), timeout)
        except Exception as exc:
            # On 3.11, wait_for's frame sits in the traceback and holds the inner task,
            # which holds the exception again: a cycle the frozen-GC policy would never
            # collect (see cli.py). The traceback goes; the exception and its cause stay.
            raise exc.with_traceback(None) from exc.__cause__

    async def _tcp(self, q: Query) -> bytes:
        qid = random_id()
        packet = wire.upstream_query(q, qid, self._udp_size)
        try:
            reader, writer = await asyncio.open_connection(self.server.host, self.server.port)
        except OSError as exc:
            raise _Attempt("network") from exc
        try:
            writer.write(wire.framed(packet))
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            data = await reader.readexactly(size)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _Attempt("network") from exc
        finally:
            writer.close()
        if data[:2] != packet[:2] or not _matches(data, q):
            raise _Attempt("mismatch")
        return data

    async def _query_tls(self, q: Query, timeout: float) -> bytes:
        """One exchange on the shared TLS connection; errors sorted into the metric's kinds
        (TimeoutError and SSLError are OSErrors too, so they are caught first)."""
        self._metrics.upstream_queries.inc(self._tls_key)
        try:
            data = await self._tls.exchange(
                lambda qid: wire.upstream_query(q, qid, self._udp_size), timeout)
        except TimeoutError as exc:
            raise _Attempt("timeout") from exc
        except ssl.SSLError as exc:
            raise _Attempt("tls") from exc
        except OSError as exc:
            raise _Attempt("network") from exc
        if not _matches(data, q):
            raise _Attempt("mismatch")
        return data


class Exchange:
    """One question's way through the upstreams: attempts in the strategy's order, each
    upstream up to ROUNDS times, until a usable reply, the last SERVFAIL/REFUSED, or the
    deadline; then `done(reply bytes or None)` is called once. Subclasses say what done does
    (forward.Flight caches and answers; UpstreamPool.query resolves a future), so a forward
    is one object, not an exchange plus a callback.

    SERVFAIL and REFUSED move on, since another upstream may do better, but do not make an
    upstream unhealthy: a live server said them, and the next name may be fine.
    """

    # Starting values as class attributes, so making one (per forward) sets two. No
    # __slots__ for the same reason: slots cannot have class-level defaults.
    due = 0.0  # when the UDP attempt in flight times out
    _attempt = 0
    _last: bytes | None = None  # the last SERVFAIL/REFUSED, relayed if nothing better comes
    _sock: _UdpSocket | None = None
    _task: asyncio.Task | None = None
    _over = False

    def __init__(self, q: Query, pool: UpstreamPool):
        self.q = q
        self._pool = pool

    def done(self, data: bytes | None) -> None:
        raise NotImplementedError

    def start(self) -> None:
        now = time.monotonic()
        self._order = self._pool.order(self.q, now)
        self._deadline = now + self._pool.deadline
        self._next(now)

    def cancel(self) -> None:
        """Stop without calling back (shutdown, or nobody waits any more)."""
        self._over = True
        self._stop_udp()
        if self._task is not None:
            self._task.cancel()

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
        if upstream.streams:
            self._stream(upstream.stream(self.q, timeout))
        else:
            self.due = now + timeout  # the sweep fails the attempt then (Upstream._expire)
            self._sock, self._qid = upstream.send_udp(self)

    def udp_reply(self, data: bytes) -> None:
        """A matching datagram (already taken off the socket's pending table): done, the
        next attempt after SERVFAIL or REFUSED, or a retry over TCP when it came truncated."""
        self._sock = None
        now = time.monotonic()
        if data[2] & (TC >> 8):
            self._stream(self._upstream.stream(self.q, max(self._timeout - (now - self._sent),
                                                           0.001)))
        elif data[3] & 0xF in MOVE_ON:
            self._got(data, now)
        else:  # the usual ending, without _got's and _finish's calls
            self._upstream.health.success(now - self._sent)
            if not self._over:
                self._over = True
                self.done(data)

    def udp_failed(self, kind: str) -> None:
        self._stop_udp()
        self._failed(kind)

    def _stop_udp(self) -> None:
        if self._sock is not None:
            self._sock.pending.pop(self._qid, None)
            self._sock = None

    def _stream(self, exchange: Coroutine) -> None:
        self._task = self._pool.loop.create_task(exchange)
        self._task.add_done_callback(self._streamed)

    def _streamed(self, task: asyncio.Task) -> None:
        self._task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self._got(task.result(), time.monotonic())
        else:
            self._failed(error.kind if isinstance(error, _Attempt) else "timeout")

    def _failed(self, kind: str) -> None:
        upstream = self._upstream
        self._pool.count_error(upstream, kind)
        now = time.monotonic()
        upstream.health.failure(now, self._timeout, self._sent)
        self._next(now)

    def _got(self, data: bytes, now: float) -> None:
        upstream = self._upstream
        upstream.health.success(now - self._sent)
        if data[3] & 0xF in MOVE_ON:
            self._pool.count_error(upstream, "rcode")
            self._last = data
            self._next(now)
        else:
            self._finish(data)

    def _finish(self, data: bytes | None) -> None:
        if not self._over:
            self._over = True
            self.done(data)


class _Awaited(Exchange):
    """An exchange whose result a coroutine awaits (UpstreamPool.query)."""

    def __init__(self, q: Query, pool: UpstreamPool):
        super().__init__(q, pool)
        self.result = pool.loop.create_future()

    def done(self, data: bytes | None) -> None:
        if not self.result.done():
            self.result.set_result(data)


class UpstreamPool:
    """The configured upstreams: the default group and the conditional-forwarding groups,
    each tried in the strategy's order until one answers or the deadline passes."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics,
                 rng: random.Random | None = None, outbox: Outbox | None = None):
        self._config = config
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._outbox = outbox or Outbox()
        self.deadline = config.deadline
        self.loop: asyncio.AbstractEventLoop | None = None  # set by open()
        self._connections = metrics.counter(
            "upstream_tls_connections_total",
            "TLS connections opened to DNS-over-TLS upstreams (each is a handshake; reused "
            "connections keep this low).", ("upstream",))
        self._by_server: dict[UpstreamServer, Upstream] = {}
        self._default = self._group(config.servers)
        # One dict lookup per label of the query name, most specific first, as in rules.py.
        self._routes = {to_wire(domain): self._group(forward.servers)
                        for forward in config.conditional for domain in forward.domains}
        self.upstreams = list(self._by_server.values())
        # The usual setup, one upstream and no conditional forwarding: every query's order,
        # shared (exchanges only read it).
        self._alone = self._default if len(self._default) == 1 and not self._routes else None
        # Each worker process keeps its own health; across workers the highest value is
        # shown: the slowest worker's RTT, and healthy unless every worker backed it off.
        metrics.gauge("upstream_rtt_seconds",
                      "Smoothed round-trip time of each upstream (EWMA; failures count as "
                      "their timeout).", ("upstream",), self._rtts, merge="max")
        metrics.gauge("upstream_healthy",
                      "1 while an upstream is healthy, 0 while it is backed off after "
                      "consecutive failures.", ("upstream",), self._health, merge="max")

    def _group(self, servers: tuple[UpstreamServer, ...]) -> list[Upstream]:
        """The Upstreams for these servers; one object per server however many groups name
        it, so its sockets, connection and health are shared."""
        group = []
        for server in servers:
            upstream = self._by_server.get(server)
            if upstream is None:
                upstream = self._by_server[server] = Upstream(
                    server, self._config, self._metrics, self._connections, self._outbox)
            group.append(upstream)
        return group

    def _rtts(self) -> dict[tuple[str, ...], float]:
        return {(u.name,): u.health.srtt for u in self.upstreams if u.health.srtt is not None}

    def _health(self) -> dict[tuple[str, ...], float]:
        return {(u.name,): float(u.health.healthy) for u in self.upstreams}

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        for upstream in self.upstreams:
            await upstream.open()

    def close(self) -> None:
        for upstream in self.upstreams:
            upstream.close()

    def group_for(self, q: Query) -> list[Upstream]:
        """The upstreams for q's name: the most specific conditional domain at or above it,
        else the default servers."""
        routes = self._routes
        if routes:
            name = q.name
            for offset in q.offsets:
                group = routes.get(name[offset:])
                if group is not None:
                    return group
        return self._default

    def order(self, q: Query, now: float) -> list[Upstream]:
        """The upstreams to try for q, in the strategy's order (see selection.arrange)."""
        alone = self._alone
        if alone is not None:  # one upstream for every name: nothing to choose
            if alone[0].health.failures:
                alone[0].health.ready(now)  # a probe after a backoff still counts
            return alone
        group = self.group_for(q) if self._routes else self._default
        return arrange(self._config.strategy, group, now, self._rng)

    def count_error(self, upstream: Upstream, kind: str) -> None:
        self._metrics.upstream_errors.inc((upstream.name, kind))

    async def query(self, q: Query) -> bytes:
        """A usable reply for q, or UpstreamError: an exchange awaited, for tools and tests."""
        exchange = _Awaited(q, self)
        exchange.start()
        try:
            data = await exchange.result
        finally:
            exchange.cancel()
        if data is None:
            raise UpstreamError(f"no usable answer within {self._config.deadline:g}s")
        return data
