"""DNS over TLS (RFC 7858) to one upstream: one persistent connection, queries pipelined on it.

A TLS handshake costs round trips and CPU on both ends, so all queries to an upstream share
one connection: each is written at once under its own ID, and replies are matched by ID in
whatever order they come (RFC 7766 section 6.2.1.1 lets a server answer out of order). When
the connection closes or breaks, what was waiting on it fails and the next query opens a new
one; a connection with nothing in flight for `idle_timeout` seconds is closed, so an upstream
is not held open for nothing.

This module moves bytes and matches IDs; what a query and an acceptable reply are is the
caller's business (upstream/stream.py). Failures surface as the standard exceptions: ssl.SSLError
for a failed handshake or certificate check, TimeoutError, and OSError for the network.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from resolver.message import wire
from resolver.upstream.ids import random_id

log = logging.getLogger(__name__)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the certificate chain and name (the defaults), TLS 1.2 or newer (RFC 8310).
    ca_file trusts only that CA, for a private upstream; None means the system's store."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class DotClient:
    """The connection to one DNS-over-TLS upstream, opened on demand and shared by queries."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext,
                 connect_timeout: float, idle_timeout: float, on_connect: Callable[[], None]):
        self.host = host
        self.port = port
        self.server_name = server_name  # the name the certificate must carry
        self._context = context
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._on_connect = on_connect  # called once per connection made, for metrics
        self._current: Connection | None = None
        self._connecting: asyncio.Task[Connection] | None = None

    async def exchange(self, build: Callable[[int], bytes], timeout: float) -> bytes:
        """Send build(id) and return the reply carrying that ID, within timeout seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection = self._current
        if connection is None or not connection.usable:
            connection = await self._connection(timeout)
        return await connection.exchange(build, deadline - loop.time())

    async def _connection(self, timeout: float) -> Connection:
        """A new connection, shared by every query that needs one meanwhile. Waiters give up
        at their own timeout, but the handshake goes on so the next query finds it done."""
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.wait_for(asyncio.shield(self._connecting), timeout)

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(self._idle_timeout, self._lost), self.host, self.port,
                    ssl=self._context, server_hostname=self.server_name)
        except (OSError, TimeoutError) as exc:
            log.warning("DNS over TLS to %s:%d (%s) failed: %s",
                        self.host, self.port, self.server_name, exc)
            raise
        self._current = connection
        self._on_connect()
        return connection

    def _connect_done(self, task: asyncio.Task[Connection]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # seen: when every waiter timed out, nobody else looks at it

    def _lost(self, connection: Connection) -> None:
        if self._current is connection:
            self._current = None

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._current is not None:
            self._current.close()


class Connection(asyncio.Protocol):
    """One TLS connection: length-prefixed messages (RFC 1035 4.2.2), waiters by ID."""

    def __init__(self, idle_timeout: float, lost: Callable[[Connection], None]):
        self.transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._buffer = bytearray()
        self._idle_timeout = idle_timeout
        self._idle: asyncio.TimerHandle | None = None
        self._lost = lost
        self._heard = time.monotonic()  # when the upstream last sent anything

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    async def exchange(self, build: Callable[[int], bytes], timeout: float) -> bytes:
        transport = self.transport  # self.usable, spelt out so that mypy sees it is set
        if transport is None or transport.is_closing():
            # lost while the query waited for it: nothing would ever answer
            raise ConnectionResetError("the connection to the upstream is closed")
        loop = asyncio.get_running_loop()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        qid = self._new_id()
        packet = build(qid)
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending[qid] = future
        timer = loop.call_later(timeout, self._timed_out, future, time.monotonic())
        try:
            transport.write(wire.framed(packet))
            return await future
        finally:
            # A failed future holds the exception whose traceback holds this frame: break
            # that cycle, which the frozen-GC policy would never collect (see cli.py).
            del future
            timer.cancel()
            del self._pending[qid]
            if not self._pending and self.usable:
                self._idle = loop.call_later(self._idle_timeout, self.close)

    def _new_id(self) -> int:
        """An ID free on this connection. Nobody can inject replies into a TLS stream, so
        unlike UDP the ID need not be unpredictable, only unique among those in flight."""
        while True:
            qid = random_id()
            if qid not in self._pending:
                return qid

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream's: a Transport
        # Idle from the start: if every query that waited for the handshake gave up, no
        # exchange would ever arm the timer and the connection would stay open for good.
        self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, self.close)

    def data_received(self, data: bytes) -> None:
        self._heard = time.monotonic()
        self._buffer += data
        for message in wire.unframe(self._buffer):
            future = self._pending.get(int.from_bytes(message[:2], "big"))
            if future is not None and not future.done():
                future.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        error = exc or ConnectionResetError("the upstream closed the connection")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _timed_out(self, future: asyncio.Future[bytes], sent: float) -> None:
        """Fail the query; and if the upstream sent nothing at all since it was sent, the
        connection is wedged (a middlebox dropped its state, the server hung): close it, so
        the next query opens a new one instead of every query timing out on this one."""
        if future.done():
            return
        future.set_exception(TimeoutError("no reply in time"))
        if self._heard < sent:
            log.warning("DNS over TLS: nothing from the upstream since a query that timed "
                        "out; reconnecting")
            self.close()
