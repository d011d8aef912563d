"""UDP transport: datagrams in, answers out, with no task for anything answered locally."""

from __future__ import annotations

import asyncio
import logging

from .pipeline import Pipeline

log = logging.getLogger(__name__)


class UdpServer(asyncio.DatagramProtocol):
    """One listening UDP socket feeding the pipeline."""

    name = "udp"

    def __init__(self, pipeline: Pipeline):
        self._replay = pipeline.packets.answer  # bound once: these run for every datagram
        self._handle = pipeline.handle
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._sendto = transport.sendto

    def datagram_received(self, data: bytes, addr) -> None:
        """First the packet cache, which needs no decoding; then the whole pipeline, whose
        local answers may be remembered for the next identical datagram."""
        answer = self._replay(data)
        if answer is None:
            answer = self._handle(data, addr, self, True)
        if answer:  # None is a drop, PENDING comes later through deliver()
            self._sendto(answer, addr)

    def deliver(self, answer: bytes, client: tuple) -> None:
        if not self.transport.is_closing():
            self.transport.sendto(answer, client)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp socket error: %s", exc)  # e.g. ICMP port unreachable from a client
