"""DNS over TLS: the connection's framing and ID matching on bytes, then the upstream pool and
the whole resolver against a real TLS upstream (Unbound with a test certificate, forwarding
to NSD)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from dnslib import QTYPE, DNSRecord
from prometheus_client import CollectorRegistry

from resolver.ops.config import (
    Address,
    BlockingConfig,
    Config,
    MetricsConfig,
    ServerConfig,
    UpstreamConfig,
    UpstreamServer,
)
from resolver.rules.loader import load_rules
from resolver.server.app import running_server
from resolver.upstream.dot import Connection
from resolver.upstream.pool import UpstreamError, UpstreamPool
from tests.servers import LOOPBACK, ZONE
from tests.test_upstream import open_pool, query
from tests.tls import IDLE_MS, TLS_NAME, UnboundDot

# --- the connection, fed bytes by hand ---------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what the connection writes; closing it is what the idle timer does."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def frames(data: bytes) -> list[bytes]:
    """Split a stream of length-prefixed messages."""
    out: list[bytes] = []
    while data:
        size = int.from_bytes(data[:2], "big")
        out.append(data[2:2 + size])
        data = data[2 + size:]
    return out


def frame(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def reply_to(query: bytes, address: str) -> bytes:
    record = DNSRecord.parse(query)
    return record.replyZone(f"{record.q.qname} 60 A {address}").pack()


def connection(idle_timeout: float = 10.0
               ) -> tuple[Connection, FakeTransport, list[Connection]]:
    lost: list[Connection] = []
    conn = Connection(idle_timeout, lost.append)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport, lost


def ask(conn: Connection, name: str, timeout: float = 2.0) -> asyncio.Task[bytes]:
    packet = DNSRecord.question(name).pack()
    return asyncio.get_running_loop().create_task(
        conn.exchange(lambda qid: qid.to_bytes(2, "big") + packet[2:], timeout))


@pytest.mark.parametrize("chunk", [1, 7, 10_000])  # byte by byte, odd splits, all at once
async def test_pipelined_replies_in_any_order_reach_their_queries(chunk):
    conn, transport, _ = connection()
    tasks = [ask(conn, f"q{index}.example.org") for index in range(3)]
    await asyncio.sleep(0)
    queries = frames(bytes(transport.written))
    assert len(queries) == 3, "all three written at once, none waiting for a reply"
    assert len({q[:2] for q in queries}) == 3, "each under its own ID"
    stream = b"".join(frame(reply_to(q, f"192.0.2.{index}"))
                      for index, q in reversed(list(enumerate(queries))))
    for start in range(0, len(stream), chunk):
        conn.data_received(stream[start:start + chunk])
    for index, task in enumerate(tasks):
        assert str(DNSRecord.parse(await task).a.rdata) == f"192.0.2.{index}"


async def test_a_reply_for_an_unknown_id_is_ignored():
    conn, transport, _ = connection()
    task = ask(conn, "q.example.org", timeout=0.2)
    await asyncio.sleep(0)
    [query] = frames(bytes(transport.written))
    stray = bytearray(reply_to(query, "192.0.2.1"))
    stray[:2] = ((int.from_bytes(query[:2], "big") + 1) & 0xFFFF).to_bytes(2, "big")
    conn.data_received(frame(bytes(stray)))
    with pytest.raises(TimeoutError):
        await task
    assert not transport.closed, "the upstream is alive: it sent something meanwhile"


async def test_a_connection_silent_since_a_query_timed_out_is_closed():
    """Wedged (a middlebox dropped its state, the upstream hung): every later query would
    time out on it too, so it is closed and the next query opens a new one."""
    conn, transport, _ = connection()
    with pytest.raises(TimeoutError):
        await ask(conn, "q.example.org", timeout=0.1)
    assert transport.closed


async def test_a_closed_connection_fails_what_waits_on_it():
    conn, _, lost = connection()
    task = ask(conn, "q.example.org")
    await asyncio.sleep(0)
    conn.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        await task
    assert lost == [conn], "the client forgets it, so the next query reconnects"


async def test_an_idle_connection_is_closed_after_its_last_reply():
    conn, transport, _ = connection(idle_timeout=0.05)
    task = ask(conn, "q.example.org")
    await asyncio.sleep(0)
    [query] = frames(bytes(transport.written))
    conn.data_received(frame(reply_to(query, "192.0.2.1")))
    await task
    assert not transport.closed
    await asyncio.sleep(0.1)
    assert transport.closed



async def test_a_query_on_a_connection_already_closed_fails_at_once():
    """Not after its whole timeout: nothing would ever answer it."""
    conn, transport, _ = connection()
    transport.closed = True
    with pytest.raises(ConnectionResetError):
        await ask(conn, "q.example.org", timeout=5.0)
    assert transport.written == b""


async def test_a_connection_nobody_used_is_closed_when_idle():
    """Every query that waited for the handshake gave up: the connection still closes."""
    _, transport, _ = connection(idle_timeout=0.05)
    await asyncio.sleep(0.1)
    assert transport.closed

# --- against Unbound ------------------------------------------------------------------------


def over_tls(unbound: UnboundDot, ca: Path | None, tls_name: str = TLS_NAME) -> UpstreamServer:
    return UpstreamServer(unbound.host, unbound.port, "tls", tls_name,
                          str(ca) if ca is not None else None)


def sample(registry: CollectorRegistry, name: str, unbound: UnboundDot, **labels: str) -> float:
    """A series the pool exports (from the start: never missing)."""
    labels["upstream"] = f"{unbound.host}:{unbound.port}"
    value = registry.get_sample_value(f"resolver_{name}", labels)
    assert value is not None, f"no series resolver_{name}{labels}"
    return value


EXPECTED_A = {
    ZONE.www: {ZONE.www_a},
    ZONE.mixed: set(ZONE.mixed_a),
    ZONE.ttl3600: {ZONE.ttl3600_a},
    ZONE.alias: {ZONE.www_a},  # CNAME to www
    ZONE.short_ttl: {ZONE.short_ttl_a},
    ZONE.ns: {ZONE.ns_a},
}


async def resolve_a(pool: UpstreamPool, name: str) -> set[str]:
    reply = DNSRecord.parse(await pool.query(query(name)))
    assert reply.header.rcode == 0
    return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}


async def test_answers_over_tls_on_one_reused_connection(unbound_dot, tls_files):
    before = unbound_dot.stats()
    async with open_pool(over_tls(unbound_dot, tls_files.ca)) as (pool, registry):
        names = list(EXPECTED_A)
        # The first queries go out together: they share one handshake, then pipeline.
        together = await asyncio.gather(*(resolve_a(pool, name) for name in names[:3]))
        one_by_one = [await resolve_a(pool, name) for name in names[3:]]
        assert together + one_by_one == list(EXPECTED_A.values())
        assert sample(registry, "upstream_queries_total", unbound_dot, protocol="tls") == 6
        assert sample(registry, "upstream_tls_connections_total", unbound_dot) == 1
        after = unbound_dot.stats()
    assert after["num.query.tls"] - before["num.query.tls"] == 6, "Unbound got them over TLS"
    assert after["total.tcpusage"] == 1, "on the one connection it holds open"


@pytest.mark.parametrize("tls_name, trusted", [
    ("other.example.test", True),  # a certificate for another name
    (TLS_NAME, False),             # the right name, from a CA the system does not trust
])
async def test_an_unverified_certificate_fails_and_counts_a_tls_error(
        unbound_dot, tls_files, tls_name, trusted):
    server = over_tls(unbound_dot, tls_files.ca if trusted else None, tls_name)
    async with open_pool(server) as (pool, registry):
        with pytest.raises(UpstreamError):
            await pool.query(query(ZONE.www))
        assert sample(registry, "upstream_errors_total", unbound_dot, kind="tls") >= 1
        # exported at 0 from the start, and never counted
        assert sample(registry, "upstream_tls_connections_total", unbound_dot) == 0


async def test_reconnects_after_the_upstream_closes_an_idle_connection(unbound_dot, tls_files):
    async with open_pool(over_tls(unbound_dot, tls_files.ca)) as (pool, registry):
        assert await resolve_a(pool, ZONE.www) == {ZONE.www_a}
        await asyncio.sleep(IDLE_MS / 1000 + 0.5)  # Unbound has closed it by now
        assert await resolve_a(pool, ZONE.ttl3600) == {ZONE.ttl3600_a}
        assert sample(registry, "upstream_tls_connections_total", unbound_dot) == 2
        assert sample(registry, "upstream_errors_total", unbound_dot, kind="network") == 0


async def test_we_close_a_connection_idle_longer_than_tls_idle_timeout(unbound_dot, tls_files):
    async with open_pool(over_tls(unbound_dot, tls_files.ca), tls_idle_timeout=0.2) as (pool, _):
        assert await resolve_a(pool, ZONE.www) == {ZONE.www_a}
        assert unbound_dot.stats()["total.tcpusage"] == 1
        await asyncio.sleep(0.5)  # sooner than Unbound's own idle timeout
        assert unbound_dot.stats()["total.tcpusage"] == 0


@pytest.mark.parametrize("tls_name, rcode", [
    (TLS_NAME, dns.rcode.NOERROR),
    ("other.example.test", dns.rcode.SERVFAIL),
])
async def test_a_client_of_the_resolver_gets_answers_from_a_tls_upstream(
        unbound_dot, tls_files, tls_name, rcode):
    config = Config(
        server=ServerConfig(listen=(Address(LOOPBACK, 0),)),
        upstream=UpstreamConfig(servers=(over_tls(unbound_dot, tls_files.ca, tls_name),),
                                timeout=0.5, deadline=1.5),
        blocking=BlockingConfig(rules=()),
        metrics=MetricsConfig(listen=None),
    )
    async with running_server(config, load_rules([])) as server:
        host, port = server.addresses[0]
        response = await dns.asyncquery.udp(dns.message.make_query(ZONE.www, "A"), host,
                                            port=port, timeout=3)
    assert response.rcode() == rcode
    if rcode == dns.rcode.NOERROR:
        assert [r.to_text() for rrset in response.answer for r in rrset] == [ZONE.www_a]
