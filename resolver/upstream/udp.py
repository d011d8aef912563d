"""The UDP driver of one upstream: a pool of connected sockets, and one timeout sweep.

Connected sockets, because the kernel then drops datagrams from any other address, and each
has its own random ephemeral port. Every query gets a fresh random ID and the next socket, and
a socket that has carried SOCKET_QUERIES queries is replaced by a fresh one, so the source
ports keep changing. (A new socket per query, as Unbound does, would cost a socket setup per
forward; this keeps the ports moving for a few percent of that.) A reply is accepted only when
its ID and question match what was sent, and is handed to the exchange with the clock's now.
Any other datagram on our sockets (another ID, another question, a reply that came after its
query timed out, junk) is counted as `upstream_errors_total{kind="mismatch"}` and dropped: a
steady count means spoofing attempts, or an upstream too slow for its timeout.

Queries go out through the Outbox, together at the end of the loop pass, and no query has a
timer of its own: while anything is in flight the pending tables are looked over every
SWEEP_INTERVAL, so a timeout fires at most that much late.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable

from resolver.message import wire
from resolver.message.constants import HEADER_SIZE, Clock
from resolver.server.outbox import Outbox
from resolver.upstream.attempts import Exchange
from resolver.upstream.ids import random_id

log = logging.getLogger(__name__)

SOCKETS_PER_UPSTREAM = 4  # more sockets measured slower: fewer replies per wake-up
SWEEP_INTERVAL = 0.02  # seconds between timeout sweeps: how late a timeout may fire
SOCKET_QUERIES = 200  # queries one socket carries before a fresh one (a new port) replaces it

Ticket = tuple["_UdpSocket", int]  # the socket and ID an attempt went out with


Counter = tuple[dict[tuple[str, ...], int], tuple[str, ...]]  # a tally's counts, one key


class _UdpSocket(asyncio.DatagramProtocol):
    """One connected UDP socket with its exchanges in flight, by query ID."""

    def __init__(self, clock: Clock, mismatches: Counter) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, Exchange] = {}
        self.uses = 0
        self._clock = clock
        self._mismatches = mismatches

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= HEADER_SIZE:
            qid = (data[0] << 8) | data[1]
            exchange = self.pending.get(qid)
            if exchange is not None and wire.answers(data, exchange.q):
                del self.pending[qid]
                exchange.udp_reply(data, self._clock())
                return
        counts, key = self._mismatches  # late, a guess, or junk
        counts[key] = counts.get(key, 0) + 1

    def error_received(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        fail_each(pending.values(), "network", self._clock())


def fail_each(exchanges: Iterable[Exchange], kind: str, now: float) -> None:
    """Fail every one of these UDP attempts. A bug in one failure's handling is logged and
    costs no other its turn, nor the sweep that calls this its next round."""
    for exchange in exchanges:
        try:
            exchange.udp_failed(kind, now)
        except Exception:
            log.exception("unexpected error while failing an upstream query")


class UdpSockets:
    """The UDP side of one upstream (attempts.UdpIo)."""

    def __init__(self, host: str, port: int, udp_size: int, clock: Clock, outbox: Outbox,
                 retire_after: float, counts: dict[tuple[str, ...], int],
                 key: tuple[str, ...], mismatches: Counter):
        """retire_after: seconds a replaced socket stays open for late replies; counts, key:
        the upstream query counter and this upstream's label values in it (counted inline:
        this runs for every forward); mismatches: where datagrams that answer nothing in
        flight are counted (the upstream error counter, this upstream's mismatch key)."""
        self._address = (host, port)
        self._udp_size = udp_size
        self._clock = clock
        self._outbox = outbox
        self._retire_after = retire_after
        self._counts = counts
        self._key = key
        self._mismatches = mismatches
        self._sockets: list[_UdpSocket] = []
        self._retiring: set[_UdpSocket] = set()  # replaced, open for late replies a while
        self._renewals: set[asyncio.Task[_UdpSocket]] = set()
        self._turn = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop  # the running loop, from open() on

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        for _ in range(SOCKETS_PER_UPSTREAM):
            self._sockets.append(await self._new_socket())

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

    def send(self, exchange: Exchange) -> Ticket:
        """Send the exchange's query on the next socket of the pool with a fresh random ID."""
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
        self._outbox.send(sock.transport,  # type: ignore[arg-type]  # set once it is open
                          wire.upstream_query(exchange.q, qid, self._udp_size))
        if self._sweep is None:
            self._sweep = self._loop.call_later(
                SWEEP_INTERVAL, self._expire)
        # in flight only once sent (the outbox sends at the end of the loop pass, so no reply
        # can come before this): a send that raised leaves nothing pending behind
        pending[qid] = exchange
        counts = self._counts
        counts[self._key] = counts.get(self._key, 0) + 1
        return sock, qid

    def forget(self, ticket: object) -> None:
        sock: _UdpSocket
        qid: int
        sock, qid = ticket  # type: ignore[misc]  # the Ticket send() gave: opaque to attempts
        sock.pending.pop(qid, None)

    def _expire(self) -> None:
        """Time out the attempts whose time is up; sweep again while any are in flight. The
        tables hold only what is in flight, about as many entries as clients waiting."""
        now = self._clock()
        sockets = (*self._sockets, *self._retiring)
        for sock in sockets:
            if sock.pending:
                fail_each([e for e in sock.pending.values() if e.due <= now], "timeout", now)
        busy = any(sock.pending for sock in sockets)
        self._sweep = (self._loop.call_later(SWEEP_INTERVAL, self._expire)
                       if busy else None)

    async def _new_socket(self) -> _UdpSocket:
        _, protocol = await self._loop.create_datagram_endpoint(
            lambda: _UdpSocket(self._clock, self._mismatches), remote_addr=self._address)
        return protocol

    def _renew(self, index: int, old: _UdpSocket) -> None:
        """Open a fresh socket (a new random port) to take `old`'s place in the pool."""
        task = self._loop.create_task(self._new_socket())
        self._renewals.add(task)
        task.add_done_callback(functools.partial(self._swap, index, old))

    def _swap(self, index: int, old: _UdpSocket, task: asyncio.Task[_UdpSocket]) -> None:
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
            self._loop.call_later(self._retire_after, self._retire, old)
        else:  # the pool was closed meanwhile
            fresh.close()

    def _retire(self, old: _UdpSocket) -> None:
        self._retiring.discard(old)
        old.close()
