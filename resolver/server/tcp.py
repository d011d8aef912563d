"""TCP transport: two-byte length framing, many queries per connection, answered as they
complete (RFC 7766), an idle timeout, and a cap on open connections."""

from __future__ import annotations

import asyncio

from resolver.message import wire
from resolver.server.pipeline import Pipeline
from resolver.stages.contract import LATER, Answered


class TcpLimits:
    """Connection bookkeeping shared by all connections of one server."""

    def __init__(self, idle_timeout: float, max_connections: int):
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.open: set[TcpConnection] = set()


class TcpConnection(asyncio.Protocol):
    """One client connection."""

    name = "tcp"

    def __init__(self, pipeline: Pipeline, limits: TcpLimits):
        self._pipeline = pipeline
        self._limits = limits
        self._buffer = bytearray()
        self._waiting = 0  # queries gone upstream whose answers are not yet written
        self._eof = False  # the client half-closed: close once every answer is written
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport  # these two from connection_made on
        self.peer: tuple[str, int]

    # asyncio types the argument as a BaseTransport; a stream protocol gets a Transport (and
    # uvloop's is no subclass of it that isinstance could check).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self._loop = asyncio.get_running_loop()  # once: each call costs a getpid() syscall
        if len(self._limits.open) >= self._limits.max_connections:
            transport.abort()  # over the cap: refuse cheaply rather than queue
            return
        self.peer = transport.get_extra_info("peername")
        self._limits.open.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._limits.open.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        messages = wire.unframe(self._buffer)
        if messages:
            received = self._pipeline.clock()  # the messages in one read came together
        for message in messages:
            result = self._pipeline.handle(message, self.peer, self, received)
            if isinstance(result, Answered):
                self._write(result.data)
            elif result is LATER:
                self._waiting += 1
        if messages:  # a byte now and then of a frame never finished keeps no one's slot
            self._arm_idle()

    def eof_received(self) -> bool:
        """The client sent all it will: keep the connection for the answers still owed."""
        self._eof = True
        return self._waiting > 0  # True keeps our half open; False lets asyncio close

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None:
        self._waiting -= 1
        if self.transport.is_closing():  # the client went away meanwhile
            return
        self._write(answer)
        if self._eof and not self._waiting:
            self.transport.close()  # after the buffered answers are written
        else:
            self._arm_idle()

    def pause_writing(self) -> None:
        """The client does not read its answers: stop reading its queries until it does, so
        the write buffer cannot grow without bound."""
        self.transport.pause_reading()

    def resume_writing(self) -> None:
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
