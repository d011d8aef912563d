"""UDP transport: datagrams in, answers out, with no task for anything answered locally.
Local answers leave at once from the datagram callback; forwarded ones through the Outbox."""

from __future__ import annotations

import asyncio
import functools
import logging

from resolver.server.outbox import Datagrams, Outbox
from resolver.server.packetcache import PacketCache

log = logging.getLogger(__name__)


class UdpServer(asyncio.DatagramProtocol):
    """One listening UDP socket feeding the packet cache and the pipeline behind it."""

    name = "udp"

    def __init__(self, packets: PacketCache, outbox: Outbox):
        self._handle = packets.handle  # bound once: this runs for every datagram
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
        answer = self._handle(data, addr, self)
        if answer is not None:  # None: dropped, or coming later through deliver()
            self._sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp socket error: %s", exc)  # e.g. ICMP port unreachable from a client
