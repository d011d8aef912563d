"""UDP transport: datagrams in, answers out, with no task for anything answered locally.
Local answers leave at once from the datagram callback; forwarded ones through the Outbox."""

from __future__ import annotations

import asyncio
import functools
import logging

from resolver.server.outbox import Outbox
from resolver.server.pipeline import Pipeline

log = logging.getLogger(__name__)


class UdpServer(asyncio.DatagramProtocol):
    """One listening UDP socket feeding the pipeline."""

    name = "udp"

    def __init__(self, pipeline: Pipeline, outbox: Outbox):
        self._replay = pipeline.packets.answer  # bound once: these run for every datagram
        self._handle = pipeline.handle
        self._send_later = outbox.send
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._sendto = transport.sendto
        # A forwarded answer (Sink.deliver): sent with the others of this loop pass (see
        # outbox.py), through no method of ours.
        self.deliver = functools.partial(self._send_later, transport)

    def datagram_received(self, data: bytes, addr) -> None:
        """First the packet cache, which needs no decoding; then the whole pipeline, whose
        local answers may be remembered for the next identical datagram."""
        answer = self._replay(data)
        if answer is None:
            answer = self._handle(data, addr, self, True)
        if answer:  # None is a drop, PENDING comes later through deliver()
            self._sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp socket error: %s", exc)  # e.g. ICMP port unreachable from a client
