"""The test servers themselves: if these fail, every end-to-end test would mislead."""

from __future__ import annotations

import socket
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from tests.conftest import FaultSettings, StartFault
from tests.servers import FAULT_A, ZONE, FaultUpstream, NsdServer, require_tool

FAULT_NAME = "fault.example.test."


Record = tuple[str, str, int, str]  # name, type, TTL, data


def rrs(section: list[dns.rrset.RRset]) -> set[Record]:
    """A message section as comparable (name, type, ttl, rdata) tuples."""
    return {
        (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rrset.ttl, rdata.to_text())
        for rrset in section
        for rdata in rrset
    }


def a(name: str, address: str, ttl: int = ZONE.default_ttl) -> tuple[str, str, int, str]:
    return (name, "A", ttl, address)


def ask(server: NsdServer | FaultUpstream, name: str, rdtype: str) -> dns.message.Message:
    """One UDP query with dnspython, an independent client."""
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, server.host, port=server.port, timeout=2)


SOA = (ZONE.origin, "SOA", ZONE.soa_minimum,
       f"ns.{ZONE.origin} hostmaster.{ZONE.origin} 1 3600 900 604800 {ZONE.soa_minimum}")


@pytest.mark.parametrize(
    "name, rdtype, rcode, answer, authority",
    [
        (ZONE.www, "A", "NOERROR", {a(ZONE.www, ZONE.www_a)}, None),
        (ZONE.www, "AAAA", "NOERROR", {(ZONE.www, "AAAA", 300, ZONE.www_aaaa)}, None),
        (ZONE.alias, "A", "NOERROR",
         {(ZONE.alias, "CNAME", 300, ZONE.www), a(ZONE.www, ZONE.www_a)}, None),
        (ZONE.mixed, "A", "NOERROR", {a(ZONE.mixed, address) for address in ZONE.mixed_a}, None),
        (ZONE.mixed, "TXT", "NOERROR", {(ZONE.mixed, "TXT", 300, f'"{ZONE.mixed_txt}"')}, None),
        (ZONE.mixed, "AAAA", "NOERROR", set(), {SOA}),
        (ZONE.short_ttl, "A", "NOERROR",
         {a(ZONE.short_ttl, ZONE.short_ttl_a, ZONE.short_ttl_ttl)}, None),
        (ZONE.ttl3600, "A", "NOERROR", {a(ZONE.ttl3600, ZONE.ttl3600_a, 3600)}, None),
        (ZONE.missing, "A", "NXDOMAIN", set(), {SOA}),
        (ZONE.org_www, "A", "NOERROR", {a(ZONE.org_www, ZONE.org_www_a)}, None),
    ],
)
def test_nsd_answers_from_the_zone(
    nsd_upstream: NsdServer, name: str, rdtype: str, rcode: str, answer: set[Record],
    authority: set[Record] | None
) -> None:
    reply = ask(nsd_upstream, name, rdtype)
    assert dns.rcode.to_text(reply.rcode()) == rcode
    assert rrs(reply.answer) == answer
    if authority is not None:
        assert rrs(reply.authority) == authority


def test_nsd_follows_a_cname_into_its_other_zone(nsd_upstream: NsdServer) -> None:
    reply = ask(nsd_upstream, ZONE.outside, "A")
    cname = (ZONE.outside, "CNAME", 300, ZONE.org_www)
    assert rrs(reply.answer) == {cname, a(ZONE.org_www, ZONE.org_www_a)}


@pytest.mark.parametrize("payload", [None, 1232])  # None: no EDNS, the classic 512 bytes
def test_nsd_big_txt_is_truncated_over_udp(nsd_upstream: NsdServer, payload: int | None) -> None:
    query = dns.message.make_query(ZONE.big, "TXT", use_edns=payload is not None,
                                   payload=payload or 512)
    reply = dns.query.udp(query, nsd_upstream.host, port=nsd_upstream.port, timeout=2)
    assert reply.flags & dns.flags.TC
    assert not reply.answer


def test_nsd_big_txt_is_complete_over_tcp(nsd_upstream: NsdServer) -> None:
    query = dns.message.make_query(ZONE.big, "TXT")
    reply = dns.query.tcp(query, nsd_upstream.host, port=nsd_upstream.port, timeout=2)
    assert not reply.flags & dns.flags.TC
    assert rrs(reply.answer) == {(ZONE.big, "TXT", 300, f'"{text}"') for text in ZONE.big_txt}
    assert len(reply.to_wire()) > 2048


def test_nsd_address(nsd_upstream: NsdServer) -> None:
    assert nsd_upstream.address == f"127.0.0.1:{nsd_upstream.port}"


# --------------------------------------------------------------------------------------------


def exchange(
    server: FaultUpstream, protocol: str, wire: bytes, expect: int, timeout: float = 2.0
) -> list[tuple[float, bytes]]:
    """Send one query, return (seconds after sending, reply) for each reply received: waits for
    `expect` replies (up to timeout), then 0.1 s more to catch any unexpected extra reply."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    replies: list[tuple[float, bytes]] = []
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.connect((server.host, server.port))
        start = time.monotonic()
        sock.sendall(wire if protocol == "udp" else struct.pack("!H", len(wire)) + wire)
        stream = b""
        while True:
            if len(replies) < expect:
                remaining = start + timeout - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
            else:
                sock.settimeout(0.1)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            if protocol == "udp":
                replies.append((time.monotonic() - start, data))
                continue
            if not data:
                break
            stream += data
            while len(stream) >= 2 and len(stream) >= 2 + struct.unpack("!H", stream[:2])[0]:
                length = struct.unpack("!H", stream[:2])[0]
                replies.append((time.monotonic() - start, stream[2 : 2 + length]))
                stream = stream[2 + length :]
    return replies


def classify(query: dns.message.Message, wire: bytes) -> str:
    """What kind of reply this is, in the fault upstream's own terms."""
    try:
        reply = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return "garbage" if wire[:2] == struct.pack("!H", query.id) else "unparseable, wrong id"
    if reply.id != query.id:
        return "wrong_id"
    if reply.question != query.question:
        return "wrong_question"
    if reply.rcode() == dns.rcode.SERVFAIL:
        return "servfail"
    if reply.flags & dns.flags.TC and not reply.answer:
        return "truncated"
    if rrs(reply.answer) == {a(FAULT_NAME, FAULT_A, 60)} and not reply.flags & dns.flags.AA:
        return "answer"
    return f"unexpected reply:\n{reply}"


@pytest.mark.parametrize(
    "mode, kw, protocol, expected",
    [
        ("answer", {}, "udp", ["answer"]),
        ("answer", {}, "tcp", ["answer"]),
        ("silent", {}, "udp", []),
        ("silent", {}, "tcp", []),
        ("garbage", {}, "udp", ["garbage"]),
        ("garbage", {"then_answer": True}, "tcp", ["garbage", "answer"]),
        ("wrong_id", {}, "udp", ["wrong_id"]),
        ("wrong_id", {"then_answer": True}, "udp", ["wrong_id", "answer"]),
        ("wrong_question", {}, "tcp", ["wrong_question"]),
        ("wrong_question", {"then_answer": True}, "udp", ["wrong_question", "answer"]),
        ("slow", {"delay": 0.3}, "udp", ["answer"]),
        ("slow", {"delay": 0.3}, "tcp", ["answer"]),
        ("truncate", {}, "udp", ["truncated"]),
        ("truncate", {}, "tcp", ["answer"]),
        ("servfail", {}, "udp", ["servfail"]),
        ("servfail", {}, "tcp", ["servfail"]),
    ],
)
def test_fault_upstream_modes(
    fault_upstream: StartFault, mode: str, kw: FaultSettings, protocol: str, expected: list[str]
) -> None:
    server = fault_upstream(mode, **kw)
    query = dns.message.make_query(FAULT_NAME, "A")
    wire = query.to_wire()
    replies = exchange(server, protocol, wire, expect=len(expected))
    assert [classify(query, reply) for _, reply in replies] == expected
    assert all(elapsed >= kw.get("delay", 0) for elapsed, _ in replies)
    assert (server.udp_count, server.tcp_count) == ((1, 0) if protocol == "udp" else (0, 1))
    assert server.received[0].wire == wire
    assert server.received[0].message.q.qname == FAULT_NAME


def test_fault_upstream_answers_other_types_with_nodata(fault_upstream) -> None:
    server = fault_upstream("answer")
    reply = ask(server, FAULT_NAME, "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer


def test_fault_upstream_counts_unparseable_queries_and_ignores_them(fault_upstream) -> None:
    server = fault_upstream("answer")
    assert exchange(server, "udp", b"\x12\x34junk", expect=0) == []
    assert server.count() == 1


def test_fault_upstream_serves_several_queries_on_one_tcp_connection(fault_upstream) -> None:
    server = fault_upstream("answer")
    queries = [dns.message.make_query(FAULT_NAME, "A") for _ in range(3)]
    with socket.create_connection((server.host, server.port), timeout=2) as sock:
        for query in queries:
            dns.query.send_tcp(sock, query)
        replies = [dns.query.receive_tcp(sock)[0] for _ in queries]
    assert [reply.id for reply in replies] == [query.id for query in queries]
    assert server.tcp_count == 3


def test_fault_upstream_address_and_unknown_mode() -> None:
    with FaultUpstream("answer") as server:
        assert server.address == f"127.0.0.1:{server.port}" and server.port > 0
    with pytest.raises(ValueError, match="unknown fault mode"):
        FaultUpstream("nonsense")


@pytest.mark.parametrize("ci, outcome",
                         [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_require_tool_skips_or_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no-such-tool-for-tests is not installed"):
        require_tool("no-such-tool-for-tests")
    assert require_tool("sh").endswith("/sh")
