"""The upstream client: send a query to the upstream servers and return a reply that matches.

UDP goes out through a small pool of connected sockets per upstream (the kernel drops
datagrams from any other address, and each socket has its own random ephemeral port); every
query gets a fresh random ID and a randomly chosen socket. A reply is accepted only when its ID
and question match what we sent. A truncated reply is retried over TCP. Failures move on to the
next upstream until the deadline, and then raise UpstreamError, which the pipeline turns into
SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import time

from . import wire
from .config import UpstreamConfig, UpstreamServer
from .metrics import Metrics
from .query import Query

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


class Upstream:
    """One upstream server, over UDP with TCP when the UDP reply is truncated."""

    def __init__(self, server: UpstreamServer, config: UpstreamConfig, metrics: Metrics):
        self.server = server
        self.name = (f"[{server.host}]:{server.port}" if ":" in server.host
                     else f"{server.host}:{server.port}")
        self._udp_size = config.udp_size
        self._metrics = metrics
        self._sockets: list[_UdpSocket] = []

    async def open(self) -> None:
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

    async def query(self, q: Query, timeout: float) -> bytes:
        """The upstream's reply to q, over UDP and then TCP if it came back truncated."""
        self._metrics.upstream_queries.inc((self.name, "udp"))
        data = await self._udp(q, timeout)
        if data[2] & (wire.TC >> 8):
            self._metrics.upstream_queries.inc((self.name, "tcp"))
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


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Attempt("timeout"))


class UpstreamPool:
    """The configured upstreams, tried in order until one answers or the deadline passes."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics):
        self._config = config
        self._metrics = metrics
        self.upstreams = [Upstream(server, config, metrics) for server in config.servers]

    async def open(self) -> None:
        for upstream in self.upstreams:
            await upstream.open()

    def close(self) -> None:
        for upstream in self.upstreams:
            upstream.close()

    async def query(self, q: Query) -> bytes:
        """A usable reply from the first upstream that gives one; UpstreamError otherwise.

        Each upstream is tried up to ROUNDS times in turn, within the deadline, so a lost
        datagram is retried but a refused port does not spin. SERVFAIL and REFUSED count as
        failures and move on, since another upstream may do better; when all say so, the
        last such reply is relayed.
        """
        deadline = time.monotonic() + self._config.deadline
        last = None
        for attempt in range(ROUNDS * len(self.upstreams)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            upstream = self.upstreams[attempt % len(self.upstreams)]
            try:
                data = await upstream.query(q, min(self._config.timeout, remaining))
            except (_Attempt, asyncio.TimeoutError) as exc:
                kind = exc.kind if isinstance(exc, _Attempt) else "timeout"
                self._metrics.upstream_errors.inc((upstream.name, kind))
                continue
            if data[3] & 0xF not in (wire.SERVFAIL, wire.REFUSED):
                return data
            self._metrics.upstream_errors.inc((upstream.name, "rcode"))
            last = data
        if last is not None:
            return last
        raise UpstreamError(f"no usable answer within {self._config.deadline:g}s")
