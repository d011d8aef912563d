"""UDP transport: datagrams in, answers out, with no task for anything answered locally.
Local answers leave at once from the datagram callback; forwarded ones through the Outbox."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from resolver.server.outbox import Datagrams, Outbox
from resolver.stages.contract import Sink

log = logging.getLogger(__name__)


# Answers a datagram now (bytes) or not now (None)
Answer = Callable[[bytes, tuple[str, int], Sink], bytes | None]


class Handler(Protocol):
    """What answers a datagram: the packet cache, and the front before it."""

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink) -> bytes | None: ...


class Gate(Handler, Protocol):
    """server.front.Front: its verdict per client address (True: let through) and the
    handler behind it, which udp.py's shortcut reads."""

    @property
    def verdicts(self) -> Mapping[str, bool | str]: ...

    @property
    def behind(self) -> Answer: ...

    @property
    def buckets(self) -> Mapping[str, list[float]]: ...


class UdpServer(asyncio.DatagramProtocol):
    """One listening UDP socket feeding access control, the packet cache and the pipeline."""

    name = "udp"

    def __init__(self, front: Gate, outbox: Outbox):
        self._handle = front.handle  # bound once: this runs for every datagram
        self._verdicts, self._behind, self._buckets = front.verdicts, front.behind, front.buckets
        self._send_later = outbox.send
        self.transport: Datagrams | None = None

    # asyncio types the argument as a BaseTransport; a datagram endpoint gets a
    # DatagramTransport, and only its sendto is used.
    def connection_made(self, transport: Datagrams) -> None:  # type: ignore[override]
        self.transport = transport
        self._sendto = transport.sendto
        # A forwarded answer (Sink.deliver): sent with the others of this loop pass (see
        # outbox.py), through no method of ours.
        self.deliver = functools.partial(self._send_later, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # The measured shortcut: a client the front has let through before goes straight to
        # the packet cache, saving a Python call a datagram, a fifth of a replay's own cost;
        # so does a rate-limited client whose bucket has a token left, which is taken here
        # as Limiter.admit would first thing (with the calls, limits on cost replays 6-7%;
        # bench/micro.py's replay lines). The front keeps every other decision.
        verdict = self._verdicts.get(addr[0])
        if verdict is True:
            answer = self._behind(data, addr, self)
        elif verdict.__class__ is str and (bucket := self._buckets.get(verdict)) is not None \
                and bucket[0] >= 1.0:  # str: a limiter key
            bucket[0] -= 1.0
            answer = self._behind(data, addr, self)
        else:
            answer = self._handle(data, addr, self)
        if answer is not None:  # None: dropped, or coming later through deliver()
            self._sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp socket error: %s", exc)  # e.g. ICMP port unreachable from a client
