"""The stream driver of one upstream: TCP for a reply that came truncated over UDP, or every
query over DNS over TLS (upstream/dot.py) for a TLS upstream.

Each stream attempt runs as a task (these paths are rare next to UDP, or pipelined on one
TLS connection); when it ends, the exchange hears `stream_reply(reply, now)` or
`stream_failed(error kind, now)`.
A reply counts only if its ID and question match what was sent.
"""

from __future__ import annotations

import asyncio
import ssl
import struct

from resolver.message import wire
from resolver.message.constants import Clock
from resolver.message.query import Query
from resolver.upstream.attempts import Exchange
from resolver.upstream.dot import DotClient
from resolver.upstream.ids import random_id


class _Failed(Exception):
    """One attempt failed; `kind` is the upstream_errors_total label."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class Streams:
    """The stream side of one upstream (attempts.StreamIo)."""

    def __init__(self, host: str, port: int, udp_size: int, clock: Clock,
                 tls: DotClient | None, count: dict[tuple[str, ...], int], key: tuple[str, ...]):
        """tls: the upstream's DNS-over-TLS connection, or None for TCP; count, key: the
        upstream query counter and the label values a stream query counts under."""
        self._address = (host, port)
        self._udp_size = udp_size
        self._clock = clock
        self._tls = tls
        self._counts = count
        self._key = key
        self._tasks: set[asyncio.Task[bytes]] = set()

    def send(self, exchange: Exchange, timeout: float) -> asyncio.Task[bytes]:
        counts = self._counts
        counts[self._key] = counts.get(self._key, 0) + 1
        task = asyncio.get_running_loop().create_task(self.query(exchange.q, timeout))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._ended(exchange, done))
        return task

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tls is not None:
            self._tls.close()

    def _ended(self, exchange: Exchange, task: asyncio.Task[bytes]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            exchange.stream_reply(task.result(), self._clock())
        else:
            exchange.stream_failed(error.kind if isinstance(error, _Failed) else "timeout",
                                   self._clock())

    async def query(self, q: Query, timeout: float) -> bytes:
        """One exchange over the stream: TLS for a DoT upstream, else TCP."""
        if self._tls is not None:
            return await self._query_tls(self._tls, q, timeout)
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
            reader, writer = await asyncio.open_connection(*self._address)
        except OSError as exc:
            raise _Failed("network") from exc
        try:
            writer.write(wire.framed(packet))
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            data = await reader.readexactly(size)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _Failed("network") from exc
        finally:
            writer.close()
        if data[:2] != packet[:2] or not wire.answers(data, q):
            raise _Failed("mismatch")
        return data

    async def _query_tls(self, tls: DotClient, q: Query, timeout: float) -> bytes:
        """One exchange on the shared TLS connection; errors sorted into the metric's kinds
        (TimeoutError and SSLError are OSErrors too, so they are caught first)."""
        try:
            data = await tls.exchange(
                lambda qid: wire.upstream_query(q, qid, self._udp_size), timeout)
        except TimeoutError as exc:
            raise _Failed("timeout") from exc
        except ssl.SSLError as exc:
            raise _Failed("tls") from exc
        except OSError as exc:
            raise _Failed("network") from exc
        if not wire.answers(data, q):
            raise _Failed("mismatch")
        return data
