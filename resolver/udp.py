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
        self._handle = pipeline.handle_udp  # bound once: this runs for every datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._sendto = transport.sendto

    def datagram_received(self, data: bytes, addr) -> None:
        answer = self._handle(data, addr, self)
        if answer:  # None is a drop, PENDING comes later through deliver()
            self._sendto(answer, addr)

    def deliver(self, answer: bytes, client: tuple) -> None:
        if not self.transport.is_closing():
            self.transport.sendto(answer, client)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp socket error: %s", exc)  # e.g. ICMP port unreachable from a client
