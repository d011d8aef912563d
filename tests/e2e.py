"""Client helpers for the end-to-end tests: query a running resolver the way real clients do.

dnspython is the client (an implementation independent of ours); the raw helpers send and
receive exact bytes for what dnspython will not produce or must not interpret (malformed
queries, replies compared byte for byte). Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import urllib.request
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.edns
import dns.message
import dns.rdatatype
import dns.rrset
from prometheus_client.parser import text_string_to_metric_families

from resolver.server.app import RunningServer
from tests.servers import require_tool

TIMEOUT = 3.0  # generous: only ever reached when a test is about to fail


def where(server: RunningServer) -> tuple[str, int]:
    host, port = server.addresses[0]
    assert host == "127.0.0.1"
    return host, port


def make_query(name: str, rdtype: str = "A", *, edns: int | None = None, do: bool = False,
               payload: int = 1232, qid: int | None = None) -> dns.message.QueryMessage:
    """A recursive query; edns=None means no OPT record unless do=True (then EDNS 0)."""
    if do and edns is None:
        edns = 0
    query = dns.message.make_query(name, rdtype, use_edns=edns if edns is not None else False,
                                   want_dnssec=do, payload=payload)
    if qid is not None:
        query.id = qid
    return query


async def udp(server: RunningServer, query: dns.message.Message) -> dns.message.Message:
    host, port = where(server)
    return await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)


async def tcp(server: RunningServer, query: dns.message.Message) -> dns.message.Message:
    host, port = where(server)
    return await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)


async def ask(server: RunningServer, protocol: str, query: dns.message.Message
              ) -> dns.message.Message:
    return await (udp if protocol == "udp" else tcp)(server, query)


class RawUdp:
    """A connected UDP socket to the resolver that sends and receives exact bytes.

    A plain socket, not an asyncio transport: asyncio silently skips sending an empty datagram.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def send(self, data: bytes) -> None:
        self._sock.send(data)

    async def receive(self, timeout: float = TIMEOUT) -> bytes | None:
        """The next datagram, or None when none comes within timeout."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self._sock, 65535), timeout)
        except TimeoutError:
            return None


@contextlib.asynccontextmanager
async def raw_udp(server: RunningServer) -> AsyncIterator[RawUdp]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(where(server))
        yield RawUdp(sock)


async def raw_udp_exchange(server: RunningServer, data: bytes, timeout: float = TIMEOUT
                           ) -> bytes | None:
    """Send one datagram; the reply's bytes, or None if none came within timeout."""
    async with raw_udp(server) as sock:
        sock.send(data)
        return await sock.receive(timeout)


async def raw_udp_answer(server: RunningServer, data: bytes) -> bytes:
    """raw_udp_exchange for a datagram that must be answered."""
    reply = await raw_udp_exchange(server, data)
    assert reply is not None, "no answer over UDP"
    return reply


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


async def read_framed(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))
    return await asyncio.wait_for(reader.readexactly(size), timeout)


async def raw_tcp_exchange(server: RunningServer, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*where(server))
    try:
        writer.write(frame(data))
        return await read_framed(reader)
    finally:
        writer.close()


# -- inspecting answers -----------------------------------------------------------------------

def ede(response: dns.message.Message) -> list[tuple[int, str | None]]:
    """The Extended DNS Errors in a response, as (code, text)."""
    return [(int(o.code), o.text) for o in response.options if o.otype == dns.edns.OptionType.EDE]


def question_bytes(wire: bytes) -> bytes:
    """The question section of a single-question message, exactly as on the wire."""
    pos = 12
    while wire[pos]:
        pos += wire[pos] + 1
    return wire[12:pos + 5]


def rrsets(section: list[dns.rrset.RRset]) -> set[tuple[str, str, frozenset[str]]]:
    """A section as comparable (owner, type, rdata texts), TTLs left out."""
    return {(rrset.name.to_text().lower(), dns.rdatatype.to_text(rrset.rdtype),
             frozenset(r.to_text() for r in rrset)) for rrset in section}


# -- metrics ----------------------------------------------------------------------------------

def scrape_sync(server: RunningServer) -> str:
    assert server.metrics_address is not None, "started without metrics"
    host, port = server.metrics_address
    assert host == "127.0.0.1"
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=TIMEOUT) as response:
        assert response.status == 200
        return response.read().decode()


async def scrape(server: RunningServer) -> str:
    """The /metrics page over HTTP (the endpoint runs in its own thread)."""
    return await asyncio.to_thread(scrape_sync, server)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there are none)."""
    return sum(value for sample, have, value in samples(text)
               if sample == name and all(have.get(k) == v for k, v in labels.items()))


async def value(server: RunningServer, name: str, **labels: str) -> float:
    return metric(await scrape(server), name, **labels)


def promtool_check(text: str) -> str:
    """What `promtool check metrics` (Debian package prometheus) says of an exposition: its
    lint findings and errors, empty when it has nothing to say."""
    done = subprocess.run([require_tool("promtool", "prometheus"), "check", "metrics"],
                          input=text, capture_output=True, text=True, timeout=30, check=False)
    return (done.stdout + done.stderr).strip() or ("" if done.returncode == 0 else
                                                   f"exit status {done.returncode}")
