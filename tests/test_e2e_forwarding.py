"""Forwarding through the running server: to a real NSD for ordinary answers, to the fault
upstream for what NSD won't do."""

from __future__ import annotations

import asyncio

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

from resolver.server.supervisor import free_port
from tests.clock import FakeClock
from tests.conftest import METRICS_ON
from tests.e2e import ask, make_query, metric, raw_udp, rrsets, scrape
from tests.servers import FAULT_A, ZONE

PROTOCOLS = ("udp", "tcp")


async def direct(nsd_upstream, query: dns.message.Message) -> dns.message.Message:
    """NSD's own answer, for comparison."""
    return await dns.asyncquery.udp(query, nsd_upstream.host, port=nsd_upstream.port, timeout=3)


def upstream_sent(server) -> int:
    return sum(server.metrics.upstream_queries.counts.values())


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        (ZONE.www, "A", {(ZONE.www, "A", frozenset({ZONE.www_a}))}),
        (ZONE.www, "AAAA", {(ZONE.www, "AAAA", frozenset({ZONE.www_aaaa}))}),
        (ZONE.alias, "A", {(ZONE.alias, "CNAME", frozenset({ZONE.www})),
                           (ZONE.www, "A", frozenset({ZONE.www_a}))}),
        (ZONE.mixed, "A", {(ZONE.mixed, "A", frozenset(ZONE.mixed_a))}),
        (ZONE.mixed, "TXT", {(ZONE.mixed, "TXT", frozenset({f'"{ZONE.mixed_txt}"'}))}),
        ("WWW.Example.TEST.", "A", {(ZONE.www, "A", frozenset({ZONE.www_a}))}),
    ],
)
async def test_answers_equal_the_zone(server, nsd_upstream, protocol, name, rdtype, expected):
    query = make_query(name, rdtype, edns=0)
    response = await ask(server, protocol, query)

    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.RA
    assert not response.flags & dns.flags.AA
    assert response.question[0].name.to_text() == name  # case as sent
    assert rrsets(response.answer) == expected
    assert rrsets(response.answer) == rrsets((await direct(nsd_upstream, query)).answer)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("edns", [None, 0])
async def test_nxdomain_carries_the_soa(server, protocol, edns):
    response = await ask(server, protocol, make_query(ZONE.missing, "A", edns=edns))

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert not response.flags & dns.flags.AA
    assert response.flags & dns.flags.RA
    assert response.answer == []
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text(ZONE.origin)
    assert (response.edns == 0) == (edns == 0)


async def test_nodata_carries_the_soa(server):
    response = await ask(server, "udp", make_query(ZONE.mixed, "AAAA"))

    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert [rrset.rdtype for rrset in response.authority] == [dns.rdatatype.SOA]


async def test_second_query_is_served_from_the_cache(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    query = make_query(ZONE.ttl3600, "A")
    first = await ask(server, "udp", query)
    before = await scrape(server)
    sent = metric(before, "resolver_upstream_queries_total")

    second = await ask(server, "tcp", query)
    after = await scrape(server)

    assert rrsets(second.answer) == rrsets(first.answer)
    assert metric(after, "resolver_cache_total", result="hit") == \
        metric(before, "resolver_cache_total", result="hit") + 1
    assert metric(after, "resolver_upstream_queries_total") == sent
    assert metric(after, "resolver_queries_total", protocol="tcp", outcome="cached") == 1


async def test_cache_answers_without_the_upstream(start_server, fault_upstream):
    upstream = fault_upstream("answer")
    server = await start_server(upstream)
    query = make_query("cached.example.test", "A")
    await ask(server, "udp", query)
    for protocol in ("udp", "tcp", "udp"):
        response = await ask(server, protocol, query)
        assert [r.to_text() for r in response.answer[0]] == [FAULT_A]
    assert upstream.count() == 1


async def test_ttl_counts_down_with_the_clock(start_server, nsd_upstream):
    clock = FakeClock()
    server = await start_server(nsd_upstream, clock=clock)
    query = make_query(ZONE.ttl3600, "A")
    first = await ask(server, "udp", query)
    assert first.answer[0].ttl == 3600

    # The record counts down; the reply is kept minimal (NSD's NS and glue, which have the
    # zone's shorter default TTL, are not kept: message/scrub.py), so it lives as long as its
    # answer. The steps stay clear of the last tenth of that lifetime, where a popular answer
    # may be prefetched.
    for elapsed, ttl in [(0, 3600), (1.5, 3599), (100, 3500), (2500, 1100)]:
        clock.now = 1000.0 + elapsed
        response = await ask(server, "udp", query)
        assert response.answer[0].ttl == ttl, f"after {elapsed}s"
        assert response.authority == response.additional == []
    assert upstream_sent(server) == 1

    clock.now = 1000.0 + 3600  # expired: asked upstream again, full TTL
    response = await ask(server, "udp", query)
    assert response.answer[0].ttl == 3600
    assert upstream_sent(server) == 2


async def test_negative_answer_ttl_counts_down(start_server, nsd_upstream):
    clock = FakeClock()
    server = await start_server(nsd_upstream, clock=clock)
    query = make_query(ZONE.missing, "A")
    await ask(server, "udp", query)
    clock.now += 100
    response = await ask(server, "udp", query)

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.authority[0].ttl == ZONE.soa_minimum - 100
    assert upstream_sent(server) == 1


@pytest.mark.parametrize("edns", [None, 0])
async def test_big_answer_truncated_over_udp_full_over_tcp(server, edns):
    query = make_query(ZONE.big, "TXT", edns=edns, payload=1232)
    over_udp = await ask(server, "udp", query)
    over_tcp = await ask(server, "tcp", query)

    assert over_udp.flags & dns.flags.TC
    assert over_udp.rcode() == dns.rcode.NOERROR
    assert not over_tcp.flags & dns.flags.TC
    [rrset] = over_tcp.answer
    assert sorted(r.strings[0].decode() for r in rrset) == sorted(ZONE.big_txt)
    assert len(over_tcp.to_wire()) > 1232


async def test_big_answer_fits_a_large_edns_buffer(server):
    response = await ask(server, "udp", make_query(ZONE.big, "TXT", edns=0, payload=4096))

    assert not response.flags & dns.flags.TC
    assert len(response.answer[0]) == len(ZONE.big_txt)


@pytest.mark.parametrize("do", [False, True])
async def test_do_bit_reaches_the_upstream_with_a_fresh_id(start_server, fault_upstream, do):
    upstream = fault_upstream("answer")
    server = await start_server(upstream)
    client_id = 4242
    for index in range(4):
        query = make_query(f"q{index}.example.test", "A", edns=0, do=do, qid=client_id)
        response = await ask(server, "udp", query)
        assert response.id == client_id
        assert bool(response.ednsflags & dns.flags.DO) == do

    sent = [dns.message.from_wire(r.wire) for r in upstream.received]
    assert len(sent) == 4
    assert all(bool(m.ednsflags & dns.flags.DO) == do for m in sent)
    assert all(m.edns == 0 for m in sent)
    assert any(m.id != client_id for m in sent), "the upstream ID is not the client's"
    assert len({m.id for m in sent}) > 1, "each upstream query gets its own random ID"


# -- faults ---------------------------------------------------------------------------------

FAST = {"upstream": {"timeout": 0.3, "deadline": 1.0}}


async def test_silent_upstream_gives_servfail_within_the_deadline(start_server, fault_upstream):
    upstream = fault_upstream("silent")
    server = await start_server(upstream, **FAST)
    # within the client's own timeout (e2e.TIMEOUT, 3 s), or ask raises
    response = await ask(server, "udp", make_query("www.example.test", "A"))
    assert response.rcode() == dns.rcode.SERVFAIL
    assert upstream.count() >= 1


@pytest.mark.parametrize("mode", ["garbage", "wrong_id", "wrong_question"])
@pytest.mark.parametrize("then_answer", [False, True])
async def test_bad_replies_are_ignored(start_server, fault_upstream, mode, then_answer):
    server = await start_server(fault_upstream(mode, then_answer=then_answer), **FAST)
    response = await ask(server, "udp", make_query("www.example.test", "A"))

    if then_answer:
        assert response.rcode() == dns.rcode.NOERROR
        assert rrsets(response.answer) == {("www.example.test.", "A", frozenset({FAULT_A}))}
    else:
        assert response.rcode() == dns.rcode.SERVFAIL
        assert response.answer == []


async def test_truncated_upstream_reply_is_retried_over_tcp(start_server, fault_upstream):
    upstream = fault_upstream("truncate")
    server = await start_server(upstream, **FAST)
    response = await ask(server, "udp", make_query("www.example.test", "A"))

    assert not response.flags & dns.flags.TC
    assert [r.to_text() for r in response.answer[0]] == [FAULT_A]
    assert upstream.tcp_count == 1


@pytest.mark.parametrize("first", ["servfail", "closed"])
async def test_failover_to_the_second_upstream(start_server, fault_upstream, first):
    bad = fault_upstream("servfail") if first == "servfail" else ("127.0.0.1", free_port())
    good = fault_upstream("answer")
    server = await start_server(bad, good, **FAST)
    response = await ask(server, "udp", make_query("www.example.test", "A"))

    assert response.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in response.answer[0]] == [FAULT_A]
    assert good.count() == 1


async def test_identical_queries_in_flight_share_one_upstream_query(start_server, fault_upstream):
    upstream = fault_upstream("slow", delay=0.3)
    server = await start_server(upstream)
    responses = await asyncio.gather(
        *(ask(server, "udp", make_query("same.example.test", "A")) for _ in range(5)))

    assert all([r.to_text() for r in resp.answer[0]] == [FAULT_A] for resp in responses)
    assert upstream.count() == 1


async def test_queries_beyond_max_inflight_are_dropped(start_server, fault_upstream):
    """Overload sheds load: with one query already upstream, a different one gets no answer."""
    server = await start_server(fault_upstream("slow", delay=0.5), server={"max_inflight": 1},
                                upstream={"timeout": 2.0, "deadline": 3.0})
    async with raw_udp(server) as sock:
        sock.send(make_query("first.example.test", "A", qid=1).to_wire())
        await asyncio.sleep(0.05)
        sock.send(make_query("second.example.test", "A", qid=2).to_wire())
        first = await sock.receive()
        assert first is not None and dns.message.from_wire(first).id == 1
        assert await sock.receive(timeout=0.3) is None

    assert server.metrics.queries.counts.get(("udp", "dropped", "A", "none")) == 1
