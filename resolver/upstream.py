"""The upstream client: send a query to the upstream servers and return a reply that matches.

UDP goes out through a small pool of connected sockets per upstream (the kernel drops
datagrams from any other address, and each socket has its own random ephemeral port); every
query gets a fresh random ID and a randomly chosen socket. A reply is accepted only when its ID
and question match what we sent. A truncated reply is retried over TCP. An upstream configured
for DNS over TLS goes through dot.py instead, on one persistent connection.

The pool picks the upstreams for a name (a conditional-forwarding domain, or the default
servers), orders them by the configured strategy and their health (selection.py), and moves
on after a failure until the deadline; then it raises UpstreamError, which the pipeline turns
into SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import struct
import time

from . import wire
from .config import UpstreamConfig, UpstreamServer
from .dot import DotClient, tls_context
from .metrics import Metrics, Tally
from .names import to_wire
from .query import Query
from .selection import Backoff, Health, arrange

log = logging.getLogger(__name__)

SOCKETS_PER_UPSTREAM = 8
ROUNDS = 2  # times each upstream is tried for one query


class UpstreamError(Exception):
    """No upstream gave a usable answer in time."""


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
    """One connected UDP socket with its queries in flight, by ID."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[asyncio.Future, Query]] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        waiter = self.pending.get(int.from_bytes(data[:2], "big"))
        if waiter is None:  # late, or a guess at our ID: ignore it
            return
        future, q = waiter
        if not future.done() and _matches(data, q):
            future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(_Attempt("network"))

    def new_id(self) -> int:
        while True:
            qid = int.from_bytes(os.urandom(2), "big")
            if qid not in self.pending:
                return qid


def address_label(server: UpstreamServer) -> str:
    """The `upstream` metric label: the address as written in config, [v6]:port."""
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{host}:{server.port}"


class Upstream:
    """One upstream server: over UDP with TCP when the reply is truncated, or over TLS."""

    def __init__(self, server: UpstreamServer, config: UpstreamConfig, metrics: Metrics,
                 connections: Tally):
        self.server = server
        self.name = address_label(server)
        self.timeout = server.timeout or config.timeout
        self.health = Health(Backoff(config.unhealthy_after, config.backoff, config.max_backoff),
                             self.timeout)
        self._udp_size = config.udp_size
        self._metrics = metrics
        self._sockets: list[_UdpSocket] = []
        self._udp_key = (self.name, "udp")  # label values bound once, off the hot path
        self._tcp_key = (self.name, "tcp")
        self._tls_key = (self.name, "tls")
        self._tls: DotClient | None = None
        if server.protocol == "tls":
            self._tls = DotClient(server.host, server.port, server.tls_name,
                                  tls_context(server.ca_file), self.timeout,
                                  config.tls_idle_timeout,
                                  lambda: connections.inc((self.name,)))

    async def open(self) -> None:
        """UDP sockets now; a TLS connection is opened by the first query that needs it."""
        if self._tls is not None:
            return
        loop = asyncio.get_running_loop()
        for _ in range(SOCKETS_PER_UPSTREAM):
            _, protocol = await loop.create_datagram_endpoint(
                _UdpSocket, remote_addr=(self.server.host, self.server.port))
            self._sockets.append(protocol)

    def close(self) -> None:
        for sock in self._sockets:
            if sock.transport is not None:
                sock.transport.close()
        self._sockets.clear()
        if self._tls is not None:
            self._tls.close()

    async def query(self, q: Query, timeout: float) -> bytes:
        """The upstream's reply to q: over TLS, or UDP and then TCP if it came back truncated."""
        if self._tls is not None:
            return await self._query_tls(q, timeout)
        self._metrics.upstream_queries.inc(self._udp_key)
        data = await self._udp(q, timeout)
        if data[2] & (wire.TC >> 8):
            self._metrics.upstream_queries.inc(self._tcp_key)
            data = await asyncio.wait_for(self._tcp(q), timeout)
        return data

    async def _udp(self, q: Query, timeout: float) -> bytes:
        sock = random.choice(self._sockets)
        qid = sock.new_id()
        future = asyncio.get_running_loop().create_future()
        sock.pending[qid] = (future, q)
        timer = asyncio.get_running_loop().call_later(timeout, _expire, future)
        try:
            sock.transport.sendto(wire.upstream_query(q, qid, self._udp_size))
            return await future
        finally:
            timer.cancel()
            del sock.pending[qid]

    async def _tcp(self, q: Query) -> bytes:
        qid = int.from_bytes(os.urandom(2), "big")
        packet = wire.upstream_query(q, qid, self._udp_size)
        try:
            reader, writer = await asyncio.open_connection(self.server.host, self.server.port)
        except OSError as exc:
            raise _Attempt("network") from exc
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
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


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Attempt("timeout"))


class UpstreamPool:
    """The configured upstreams: the default group and the conditional-forwarding groups,
    each tried in the strategy's order until one answers or the deadline passes."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics,
                 rng: random.Random | None = None):
        self._config = config
        self._metrics = metrics
        self._rng = rng or random.Random()
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
                    server, self._config, self._metrics, self._connections)
            group.append(upstream)
        return group

    def _rtts(self) -> dict[tuple[str, ...], float]:
        return {(u.name,): u.health.srtt for u in self.upstreams if u.health.srtt is not None}

    def _health(self) -> dict[tuple[str, ...], float]:
        return {(u.name,): float(u.health.healthy) for u in self.upstreams}

    async def open(self) -> None:
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

    async def query(self, q: Query) -> bytes:
        """A usable reply from the first upstream that gives one; UpstreamError otherwise.

        Each upstream is tried up to ROUNDS times in turn, within the deadline, so a lost
        datagram is retried but a refused port does not spin. SERVFAIL and REFUSED count as
        failures and move on, since another upstream may do better; when all say so, the
        last such reply is relayed. They do not make an upstream unhealthy, though: a live
        server said them, and the next name may be fine.
        """
        start = time.monotonic()
        deadline = start + self._config.deadline
        order = arrange(self._config.strategy, self.group_for(q), start, self._rng)
        last = None
        for attempt in range(ROUNDS * len(order)):
            sent = time.monotonic()
            remaining = deadline - sent
            if remaining <= 0:
                break
            upstream = order[attempt % len(order)]
            timeout = min(upstream.timeout, remaining)
            try:
                data = await upstream.query(q, timeout)
            except (_Attempt, asyncio.TimeoutError) as exc:
                kind = exc.kind if isinstance(exc, _Attempt) else "timeout"
                self._metrics.upstream_errors.inc((upstream.name, kind))
                upstream.health.failure(time.monotonic(), timeout)
                continue
            upstream.health.success(time.monotonic() - sent)
            if data[3] & 0xF not in (wire.SERVFAIL, wire.REFUSED):
                return data
            self._metrics.upstream_errors.inc((upstream.name, "rcode"))
            last = data
        if last is not None:
            return last
        raise UpstreamError(f"no usable answer within {self._config.deadline:g}s")
