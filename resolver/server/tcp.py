"""TCP transport: two-byte length framing, many queries per connection, answered as they
complete (RFC 7766), an idle timeout, and caps: on open connections, on connections per
client address, and on queries in flight per connection.

TCP clients cannot forge their address, so they are not rate limited (server/front.py does
that for UDP); what one client can take is bounded by the caps instead. Access control is
decided once, when a connection opens (a client outside `server.allow` is closed at once, or
has each query answered REFUSED, per `server.refuse_action`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from resolver.message import wire
from resolver.server.pipeline import Pipeline
from resolver.stages.contract import LATER, Answered

ALLOW, REFUSE, CLOSE = "allow", "refuse", "close"  # what Gate.connection says


class Gate(Protocol):
    """Access control for TCP (server.front.Front)."""

    def connection(self, host: str) -> str: ...

    def refuse(self, data: bytes, client: tuple[str, int], transport: str) -> bytes | None: ...


class TcpLimits:
    """Connection bookkeeping and caps shared by all connections of one server."""

    def __init__(self, idle_timeout: float, max_connections: int, per_client: int = 1 << 30,
                 pipelined: int = 1 << 30, gate: Gate | None = None):
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.per_client = per_client  # open connections from one address
        self.pipelined = pipelined  # forwarded queries in flight on one connection
        self.gate = gate
        self.open: set[TcpConnection] = set()
        self.clients: dict[str, int] = {}  # open connections by client address


class TcpConnection(asyncio.Protocol):
    """One client connection."""

    name = "tcp"

    def __init__(self, pipeline: Pipeline, limits: TcpLimits):
        self._pipeline = pipeline
        self._limits = limits
        self._buffer = bytearray()
        self._waiting = 0  # queries gone upstream whose answers are not yet written
        self._eof = False  # the client half-closed: close once every answer is written
        self._refused = False  # outside server.allow: every query is answered REFUSED
        self._host: str | None = None  # the client address, once the connection is counted
        self._unread = False  # the client does not read its answers
        self._full = False  # tcp_max_pipelined queries in flight: the rest wait unread
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport  # these two from connection_made on
        self.peer: tuple[str, int]

    # asyncio types the argument as a BaseTransport; a stream protocol gets a Transport (and
    # uvloop's is no subclass of it that isinstance could check).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self._loop = asyncio.get_running_loop()  # once: each call costs a getpid() syscall
        limits = self._limits
        if len(limits.open) >= limits.max_connections:
            transport.abort()  # over the cap: refuse cheaply rather than queue
            return
        self.peer = transport.get_extra_info("peername")
        host = self.peer[0]
        verdict = ALLOW if limits.gate is None else limits.gate.connection(host)
        if verdict == CLOSE or limits.clients.get(host, 0) >= limits.per_client:
            transport.abort()
            return
        self._refused = verdict == REFUSE
        self._host = host
        limits.clients[host] = limits.clients.get(host, 0) + 1
        limits.open.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        limits, host = self._limits, self._host
        limits.open.discard(self)
        if host is not None:
            self._host = None
            left = limits.clients[host] - 1
            if left:
                limits.clients[host] = left
            else:
                del limits.clients[host]
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._serve():  # a byte now and then of a frame never finished keeps no one's slot
            self._arm_idle()

    def _serve(self) -> bool:
        """Answer the whole queries in the buffer, while fewer than the cap are in flight
        (the rest stay in the buffer, and reading stops until answers make room); whether
        any query was taken."""
        pipeline, cap, took = self._pipeline, self._limits.pipelined, False
        while self._waiting < cap:
            messages = wire.unframe(self._buffer, cap - self._waiting)
            if not messages:
                break
            took = True
            for message in messages:
                if self._refused:
                    refusal = self._limits.gate.refuse(  # type: ignore[union-attr]  # has one
                        message, self.peer, self.name)
                    if refusal is not None:
                        self._write(refusal)
                    continue
                result = pipeline.handle(message, self.peer, self)
                if isinstance(result, Answered):
                    self._write(result.data)
                elif result is LATER:
                    self._waiting += 1
        self._hold(full=self._waiting >= cap)
        return took

    def eof_received(self) -> bool:
        """The client sent all it will: keep the connection for the answers still owed."""
        self._eof = True
        return self._waiting > 0  # True keeps our half open; False lets asyncio close

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None:
        self._waiting -= 1
        if self.transport.is_closing():  # the client went away meanwhile
            return
        self._write(answer)
        if self._full:
            self._serve()  # the queries held back, now that one more may go
        if self._eof and not self._waiting:
            self.transport.close()  # after the buffered answers are written
        else:
            self._arm_idle()

    def pause_writing(self) -> None:
        """The client does not read its answers: stop reading its queries until it does, so
        the write buffer cannot grow without bound."""
        self._hold(unread=True)

    def resume_writing(self) -> None:
        self._hold(unread=False)

    def _hold(self, *, unread: bool | None = None, full: bool | None = None) -> None:
        """Read from the client only while it reads its answers and the pipeline cap leaves
        room: either reason alone stops reading, and reading starts again when neither holds."""
        held = self._unread or self._full
        if unread is not None:
            self._unread = unread
        if full is not None:
            self._full = full
        if self.transport.is_closing():
            return
        if self._unread or self._full:
            if not held:
                self.transport.pause_reading()
        elif held:
            self.transport.resume_reading()

    def _write(self, answer: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(wire.framed(answer))

    def _arm_idle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._limits.idle_timeout, self._idle)

    def _idle(self) -> None:
        """Close a quiet connection, but not while answers are still owed to it. One whose
        client stopped reading is aborted: close() would wait for the unread answers to be
        written, and the connection would hold its slot and buffer for good."""
        if self._waiting > 0:
            self._arm_idle()
        elif self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()
