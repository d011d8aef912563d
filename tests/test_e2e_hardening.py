"""Hardening over real sockets: access control, rate limits, RFC 8482 ANY, TCP caps, upstream
mismatches, scrubbing, and the packets no client should send. Clients bind to other 127.x
addresses to be another client (only loopback is reachable here)."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import replace

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from resolver.cli import banner
from resolver.ops.config import Config
from resolver.rules.loader import load_rules
from resolver.server.app import RunningServer
from tests.conftest import METRICS_ON, StartFault, StartServer
from tests.e2e import TIMEOUT, frame, make_query, read_framed, rrsets, value, where
from tests.servers import FAULT_A, POISON_A, ZONE, NsdServer

OTHER = "127.0.0.2"  # a client outside allow: [127.0.0.1/32]
DROP_WAIT = 0.3  # how long to listen for an answer that must not come


async def udp_from(server: RunningServer, source: str, query: dns.message.Message,
                   timeout: float = TIMEOUT) -> dns.message.Message:
    host, port = where(server)
    return await dns.asyncquery.udp(query, host, port=port, source=source, timeout=timeout)


async def tcp_from(server: RunningServer, source: str, query: dns.message.Message
                   ) -> dns.message.Message:
    host, port = where(server)
    return await dns.asyncquery.tcp(query, host, port=port, source=source, timeout=TIMEOUT)


async def raw_from(server: RunningServer, source: str, data: bytes,
                   timeout: float = TIMEOUT) -> bytes | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect(where(server))
        sock.send(data)
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
        except TimeoutError:
            return None


async def still_answers(server: RunningServer, source: str = "127.0.0.1") -> None:
    response = await udp_from(server, source, make_query(ZONE.www, "A"))
    assert response.rcode() == dns.rcode.NOERROR and response.answer


# -- access control ---------------------------------------------------------------------------

async def test_a_client_outside_allow_is_refused_before_the_packet_cache(
        start_server: StartServer, nsd_upstream: NsdServer) -> None:
    server = await start_server(nsd_upstream, server={"allow": ("127.0.0.1/32",)},
                                metrics=METRICS_ON)
    query = make_query("www.example.org", "A", qid=7)  # blocked: kept by the packet cache
    assert (await udp_from(server, "127.0.0.1", query)).rcode() == dns.rcode.NXDOMAIN
    for ask in (udp_from, tcp_from):
        response = await ask(server, OTHER, query)
        assert response.rcode() == dns.rcode.REFUSED and response.id == 7
        assert response.answer == response.authority == []
    assert await value(server, "resolver_queries_total", outcome="refused") == 2
    assert await value(server, "resolver_queries_total", outcome="blocked") == 1


async def test_drop_answers_an_outsider_nothing(start_server: StartServer,
                                                nsd_upstream: NsdServer) -> None:
    server = await start_server(nsd_upstream, metrics=METRICS_ON,
                                server={"allow": ("127.0.0.1/32",), "refuse_action": "drop"})
    query = make_query(ZONE.www, "A").to_wire()
    assert await raw_from(server, OTHER, query, DROP_WAIT) is None
    with pytest.raises((ConnectionError, EOFError, dns.exception.DNSException)):
        await tcp_from(server, OTHER, make_query(ZONE.www, "A"))  # closed at once
    await still_answers(server)
    assert await value(server, "resolver_queries_total", protocol="udp",
                       outcome="dropped") == 1


async def test_the_default_allows_loopback(server: RunningServer) -> None:
    await still_answers(server, OTHER)


@pytest.mark.parametrize(("allow", "warns"), [
    (("0.0.0.0/0", "::/0"), True),
    (("0.0.0.0/0",), True),
    (("127.0.0.0/8",), False),
    (Config().server.allow, False),
])
def test_an_open_config_warns_in_the_banner(allow: tuple[str, ...], warns: bool) -> None:
    config = Config()
    config = replace(config, server=replace(config.server, allow=allow))
    line = banner(config, load_rules([]), [("0.0.0.0", 53)], 1)
    assert ("WARNING: open to every client" in line) is warns
    if warns:
        assert all(network in line for network in allow)


# -- rate limits ------------------------------------------------------------------------------

async def test_over_the_limit_udp_slips_and_drops_and_tcp_is_not_limited(
        start_server: StartServer, nsd_upstream: NsdServer) -> None:
    server = await start_server(nsd_upstream, metrics=METRICS_ON, ratelimit={
        "qps": 0.001, "burst": 3, "slip": 2})
    query = make_query("www.example.org", "A", qid=9).to_wire()
    replies = [await raw_from(server, "127.0.0.3", query, DROP_WAIT) for _ in range(7)]
    answered = [dns.message.from_wire(r) for r in replies if r is not None]
    assert [r.rcode() for r in answered[:3]] == [dns.rcode.NXDOMAIN] * 3
    assert replies[3] is None and replies[5] is None  # dropped; every second one slips
    for slipped in (replies[4], replies[6]):
        assert slipped is not None
        assert dns.message.from_wire(slipped).flags & dns.flags.TC
    response = await tcp_from(server, "127.0.0.3", make_query(ZONE.www, "A"))
    assert response.answer, "a slipped client retrying over TCP is answered"
    await still_answers(server, "127.0.1.1")  # another /24 has its own bucket
    assert await value(server, "resolver_queries_total", outcome="ratelimited") == 4
    assert await value(server, "resolver_ratelimit_tracked_prefixes") == 2


# -- ANY (RFC 8482) ---------------------------------------------------------------------------

def forwarded(response: dns.message.Message) -> bool:
    """Whether an ANY answer is NSD's (which gives one of the name's RRsets, minimal too), not
    ours."""
    types = {rdtype for _, rdtype, _ in rrsets(response.answer)}
    return bool(types) and types <= {"A", "TXT"}

async def test_any_over_udp_is_minimal_and_over_tcp_forwarded(server: RunningServer) -> None:
    query = make_query(ZONE.mixed, "ANY", edns=0)
    response = await udp_from(server, "127.0.0.1", query)
    assert rrsets(response.answer) == {(ZONE.mixed, "HINFO", frozenset({'"RFC8482" ""'}))}
    assert len(response.to_wire()) < 100
    response = await tcp_from(server, "127.0.0.1", query)
    assert forwarded(response)


async def test_any_forward_turns_it_off(start_server: StartServer,
                                        nsd_upstream: NsdServer) -> None:
    server = await start_server(nsd_upstream, server={"any": "forward"})
    response = await udp_from(server, "127.0.0.1", make_query(ZONE.mixed, "ANY", edns=0))
    assert forwarded(response)


# -- TCP caps ---------------------------------------------------------------------------------

async def open_from(server: RunningServer, source: str
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*where(server), local_addr=(source, 0))


async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, qid: int) -> bool:
    """Whether the connection answers a query (False: it was closed)."""
    writer.write(frame(make_query("www.example.org", "A", qid=qid).to_wire()))
    try:
        return dns.message.from_wire(await read_framed(reader)).id == qid
    except (asyncio.IncompleteReadError, ConnectionError):
        return False


async def test_connections_per_client_are_capped(start_server: StartServer,
                                                 nsd_upstream: NsdServer) -> None:
    server = await start_server(nsd_upstream, server={"tcp_max_connections_per_client": 2})
    first = [await open_from(server, "127.0.0.4") for _ in range(3)]
    try:
        assert [await served(r, w, i) for i, (r, w) in enumerate(first)] == [True, True, False]
        other = await open_from(server, "127.0.0.5")
        assert await served(*other, 9), "another client has connections of its own"
        other[1].close()
        first[0][1].close()
        await asyncio.sleep(0.1)
        assert await served(*await open_from(server, "127.0.0.4"), 10), "a slot came back"
    finally:
        for _, writer in first:
            writer.close()


async def test_pipelined_queries_in_flight_are_capped(start_server: StartServer,
                                                      fault_upstream: StartFault) -> None:
    upstream = fault_upstream("slow", delay=0.5)
    server = await start_server(upstream, server={"tcp_max_pipelined": 2},
                                upstream={"timeout": 2.0, "deadline": 5.0})
    reader, writer = await open_from(server, "127.0.0.1")
    try:
        writer.write(b"".join(frame(make_query(f"n{i}.example.test", "A", qid=i).to_wire())
                              for i in range(5)))
        await asyncio.sleep(0.3)
        assert upstream.count() == 2, "only two in flight: the rest wait unread"
        ids = {dns.message.from_wire(await read_framed(reader, 5.0)).id for _ in range(5)}
        assert ids == set(range(5))
    finally:
        writer.close()


# -- upstream replies: mismatches and scrubbing ------------------------------------------------

async def test_a_mismatched_udp_reply_is_counted(start_server: StartServer,
                                                 fault_upstream: StartFault) -> None:
    upstream = fault_upstream("wrong_id", then_answer=True)
    server = await start_server(upstream, metrics=METRICS_ON)
    response = await udp_from(server, "127.0.0.1", make_query("a.example.test", "A"))
    assert [rr.to_text() for rrset in response.answer for rr in rrset] == [FAULT_A]
    await asyncio.sleep(0.05)
    assert await value(server, "resolver_upstream_errors_total", kind="mismatch") == 1


async def test_a_poisoning_reply_is_scrubbed_before_it_is_cached_or_served(
        start_server: StartServer, fault_upstream: StartFault) -> None:
    server = await start_server(fault_upstream("poison"))
    for protocol in ("udp", "tcp", "udp"):  # the last two from the cache
        ask = udp_from if protocol == "udp" else tcp_from
        response = await ask(server, "127.0.0.1", make_query("a.example.test", "A", edns=0))
        assert rrsets(response.answer) == {("a.example.test.", "A", frozenset({FAULT_A}))}
        assert response.authority == [] and response.additional == []
        assert POISON_A not in response.to_text()


# -- packets no client should send ------------------------------------------------------------

async def test_an_unknown_class_is_answered(server: RunningServer) -> None:
    query = make_query(ZONE.www, "A", qid=5)
    query.question[0].rdclass = dns.rdataclass.RdataClass.make(4660)  # CLASS4660
    reply = await raw_from(server, "127.0.0.1", query.to_wire())
    assert reply is not None and dns.message.from_wire(reply).id == 5
    await still_answers(server)


@pytest.mark.parametrize("head", [b"", make_query(ZONE.www, "A").to_wire()])
async def test_a_64k_datagram(server: RunningServer, head: bytes) -> None:
    data = head + bytes(65507 - len(head))  # the largest UDP payload over IPv4
    reply = await raw_from(server, "127.0.0.1", data, DROP_WAIT)
    if reply is not None:
        dns.message.from_wire(reply)
    await still_answers(server)


async def test_a_frame_longer_than_what_comes_then_close(server: RunningServer) -> None:
    reader, writer = await open_from(server, "127.0.0.1")
    writer.write(struct.pack("!H", 60000) + make_query(ZONE.www, "A").to_wire())
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed, nothing said
    writer.close()
    await still_answers(server)
    reader, writer = await open_from(server, "127.0.0.1")
    assert await served(reader, writer, 3)
    writer.close()
