"""The cache as clients see it through the running server: TTLs counting down on an injected
clock, negative and failure caching, serve-stale when the upstream dies, prefetch, coalescing
of identical queries, and CNAME chains into blocked domains."""

from __future__ import annotations

import asyncio
import contextlib
import time

import dns.asyncquery
import dns.rcode
import dns.rdatatype
import pytest

from tests.clock import FakeClock
from tests.conftest import BLOCK_TTL, RULES_YAML
from tests.e2e import ask, ede, make_query, rrsets
from tests.servers import FAULT_A, ZONE, FaultUpstream

PROTOCOLS = ("udp", "tcp")


def sent_upstream(server) -> int:
    return sum(server.metrics.upstream_queries.counts.values())


async def eventually(check, timeout: float = 3.0) -> None:
    """Wait for something a background task does (a prefetch, a failing refresh)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# -- TTLs, negative answers, failures --------------------------------------------------------

# (seconds after the first query, TTL the client sees, queries the upstream has had by then)
COUNTDOWN = [(0, 100, 1), (0.9, 100, 1), (1, 99, 1), (42.5, 58, 1), (99.9, 1, 1),
             (100, 100, 2), (150, 50, 2)]


async def test_ttls_count_down_on_hits_until_expiry(start_server, fault_upstream):
    upstream = fault_upstream("answer", ttl=100)
    clock = FakeClock()
    server = await start_server(upstream, clock=clock, cache={"prefetch": False})
    query = make_query("www.example.test", "A")
    for elapsed, ttl, sent in COUNTDOWN:
        clock.at(elapsed)
        response = await ask(server, "udp", query)
        assert [r.to_text() for r in response.answer[0]] == [FAULT_A]
        assert (response.answer[0].ttl, upstream.count()) == (ttl, sent), f"at {elapsed}s"


@pytest.mark.parametrize(("name", "rdtype", "rcode"), [
    (ZONE.missing, "A", dns.rcode.NXDOMAIN),
    (ZONE.www, "MX", dns.rcode.NOERROR),  # NODATA
])
async def test_negative_answers_are_cached_for_the_soa_minimum(start_server, nsd_upstream,
                                                               name, rdtype, rcode):
    clock = FakeClock()
    server = await start_server(nsd_upstream, clock=clock, cache={"prefetch": False})
    query = make_query(name, rdtype)
    for elapsed, ttl, sent in [(0, ZONE.soa_minimum, 1), (120, ZONE.soa_minimum - 120, 1),
                               (ZONE.soa_minimum - 1, 1, 1),
                               (ZONE.soa_minimum, ZONE.soa_minimum, 2)]:
        clock.at(elapsed)
        response = await ask(server, "udp", query)
        assert response.rcode() == rcode and response.answer == []
        [soa] = response.authority
        assert soa.rdtype == dns.rdatatype.SOA
        assert (soa.ttl, sent_upstream(server)) == (ttl, sent), f"at {elapsed}s"


@pytest.mark.parametrize("mode", ["servfail", "silent"])
async def test_failures_are_cached_for_servfail_ttl_only(start_server, fault_upstream, mode):
    upstream = fault_upstream(mode)
    clock = FakeClock(live=True)  # the silent upstream's timeouts must fire
    server = await start_server(upstream, clock=clock, cache={"servfail_ttl": 5},
                                upstream={"timeout": 0.2, "deadline": 0.4})
    query = make_query("failing.example.test", "A", edns=0)
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.SERVFAIL
    asked = upstream.count()
    assert asked >= 1

    # The failure was cached when the deadline (0.4 s) ran out: 4.5 s on is within
    # servfail_ttl (5 s), 7 s on is past it, with room for a slow machine either way.
    clock.at(4.5)  # within servfail_ttl: answered from the cache, upstream spared
    response = await ask(server, "tcp", query)
    assert response.rcode() == dns.rcode.SERVFAIL and response.edns == 0
    assert upstream.count() == asked
    assert server.metrics.queries.counts[("tcp", "cached", "A", "SERVFAIL")] == 1

    clock.at(7)  # expired: asked again
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.SERVFAIL
    assert upstream.count() > asked


async def test_servfail_ttl_zero_caches_no_failure(start_server, fault_upstream):
    upstream = fault_upstream("servfail")
    server = await start_server(upstream, cache={"servfail_ttl": 0})
    query = make_query("failing.example.test", "A")
    await ask(server, "udp", query)
    asked = upstream.count()
    await ask(server, "udp", query)
    assert upstream.count() == 2 * asked


# -- serve-stale -----------------------------------------------------------------------------

STALE = {"upstream": {"timeout": 0.2, "deadline": 0.5},
         "cache": {"stale_client_timeout": 0.3, "servfail_ttl": 5, "prefetch": False}}


@pytest.mark.parametrize("outage", ["stopped", "silent", "servfail"])
async def test_stale_answer_when_the_upstream_dies_after_caching(start_server, outage):
    clock = FakeClock(live=True)  # the silent upstream's timeouts must fire
    query = make_query("www.example.test", "A", edns=0)
    running = contextlib.ExitStack()
    upstream = running.enter_context(FaultUpstream("answer", ttl=60))
    server = await start_server(upstream, clock=clock, **STALE)
    fresh = await ask(server, "udp", query)
    if outage == "stopped":
        running.close()  # its port refuses from now on
    else:
        upstream.mode = outage

    clock.at(61)  # expired: the upstream is asked, fails, and the stale answer stands in
    stale = await ask(server, "udp", query)
    assert rrsets(stale.answer) == rrsets(fresh.answer)
    assert stale.rcode() == dns.rcode.NOERROR and stale.answer[0].ttl == 30
    assert ede(stale) == [(3, None)]  # RFC 8914 Stale Answer

    def stale_answers(protocol: str) -> int:
        return server.metrics.queries.counts.get((protocol, "stale", "A", "NOERROR"), 0)

    assert stale_answers("udp") == 1

    # Once the refresh has failed, the stale answer comes straight from the cache for
    # servfail_ttl seconds, without asking upstream again (RFC 8767 failure recheck).
    await eventually(lambda: server.chain.forwarder.flights == 0)
    asked = upstream.count()
    clock.at(65.5)
    again = await ask(server, "tcp", make_query("www.example.test", "A"))
    assert again.answer[0].ttl == 30 and again.edns == -1
    assert upstream.count() == asked and stale_answers("tcp") == 1

    clock.at(67.5)  # recheck over (failed at 61 + the 0.5 s deadline, + 5 s): asked again
    await ask(server, "udp", query)
    assert stale_answers("udp") == 2
    assert server.metrics.cache.counts[("stale",)] == 3
    if outage != "stopped":
        assert upstream.count() > asked

    clock.at(60 + 86400 + 5)  # past the stale window (with room for the live clock)
    await eventually(lambda: server.chain.forwarder.flights == 0)
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.SERVFAIL
    running.close()


async def test_a_refusing_upstream_gets_the_stale_answer_served_too(start_server,
                                                                   fault_upstream):
    """RFC 8767 4: an rcode other than NOERROR or NXDOMAIN is a failure to refresh."""
    upstream = fault_upstream("answer", ttl=60)
    clock = FakeClock()
    server = await start_server(upstream, clock=clock, **STALE)
    query = make_query("www.example.test", "A", edns=0)
    await ask(server, "udp", query)
    upstream.mode = "refused"
    clock.at(61)
    stale = await ask(server, "udp", query)
    assert stale.rcode() == dns.rcode.NOERROR and stale.answer[0].ttl == 30
    assert ede(stale) == [(3, None)]
    clock.at(60 + 86400)  # past the stale window: the upstream's answer is relayed
    await eventually(lambda: server.chain.forwarder.flights == 0)
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.REFUSED


async def test_a_client_joining_a_prefetch_gets_the_stale_answer(start_server,
                                                                 fault_upstream):
    """A prefetch starts before the answer expires, so it found nothing stale to fall back
    on; a client that joins it after the expiry still gets the stale answer when it fails."""
    upstream = fault_upstream("answer", ttl=100)
    clock = FakeClock()
    server = await start_server(upstream, clock=clock,
                                upstream={"timeout": 0.3, "deadline": 0.6},
                                cache={"prefetch_min_hits": 2, "stale_client_timeout": 0.3})
    query = make_query("popular.example.test", "A")
    await ask(server, "udp", query)
    upstream.mode = "silent"
    clock.at(50)
    await ask(server, "udp", query)
    clock.at(95)
    await ask(server, "udp", query)  # in the prefetch window: a refresh starts, and hangs
    clock.at(101)  # expired while the prefetch is still out
    stale = await ask(server, "tcp", query)
    assert stale.rcode() == dns.rcode.NOERROR and stale.answer[0].ttl == 30
    assert server.metrics.cache.counts[("prefetch",)] == 1
    assert server.metrics.queries.counts[("tcp", "stale", "A", "NOERROR")] == 1


async def test_no_stale_answers_when_serve_stale_is_off(start_server, fault_upstream):
    upstream = fault_upstream("answer", ttl=60)
    clock = FakeClock(live=True)  # the silent upstream's timeouts must fire
    server = await start_server(upstream, clock=clock, upstream=STALE["upstream"],
                                cache={**STALE["cache"], "serve_stale": False})
    query = make_query("www.example.test", "A")
    await ask(server, "udp", query)
    upstream.mode = "silent"
    clock.at(61)
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.SERVFAIL
    assert ("stale",) not in server.metrics.cache.counts


async def test_a_fresh_answer_replaces_the_stale_one(start_server, fault_upstream):
    upstream = fault_upstream("slow", delay=0.5, ttl=60)
    clock = FakeClock()
    server = await start_server(upstream, clock=clock, upstream={"timeout": 2, "deadline": 3},
                                cache={"stale_client_timeout": 0.1, "prefetch": False})
    query = make_query("www.example.test", "A")
    await ask(server, "udp", query)
    clock.at(61)
    assert (await ask(server, "udp", query)).answer[0].ttl == 30  # the upstream is slow
    await eventually(lambda: upstream.count() == 2 and not server.chain.forwarder.flights)
    clock.at(62)  # the slow refresh arrived meanwhile and was cached at 61
    assert (await ask(server, "udp", query)).answer[0].ttl == 59
    assert server.metrics.queries.counts[("udp", "cached", "A", "NOERROR")] == 1


# -- prefetch --------------------------------------------------------------------------------

async def test_prefetch_refreshes_a_popular_answer_before_it_expires(start_server, fault_upstream):
    upstream = fault_upstream("answer", ttl=100)
    clock = FakeClock()
    server = await start_server(upstream, clock=clock, cache={"prefetch_min_hits": 2})
    query = make_query("popular.example.test", "A")
    await ask(server, "udp", query)
    for elapsed, ttl in [(50, 50), (95, 5)]:  # the second hit is in the last 10% of the TTL
        clock.at(elapsed)
        assert (await ask(server, "udp", query)).answer[0].ttl == ttl  # served at once
    await eventually(lambda: upstream.count() == 2)
    assert server.metrics.cache.counts[("prefetch",)] == 1

    clock.at(150)  # past the first answer's expiry: the refreshed one (stored at 95) is hit
    assert (await ask(server, "udp", query)).answer[0].ttl == 45
    assert upstream.count() == 2
    assert server.metrics.queries.counts == {("udp", "forwarded", "A", "NOERROR"): 1,
                                             ("udp", "cached", "A", "NOERROR"): 3}


async def test_no_prefetch_for_an_answer_hit_once(start_server, fault_upstream):
    upstream = fault_upstream("answer", ttl=100)
    clock = FakeClock()
    server = await start_server(upstream, clock=clock)
    query = make_query("rare.example.test", "A")
    await ask(server, "udp", query)
    clock.at(95)
    await ask(server, "udp", query)
    await asyncio.sleep(0.1)
    assert upstream.count() == 1 and ("prefetch",) not in server.metrics.cache.counts


# -- coalescing ------------------------------------------------------------------------------

@pytest.mark.parametrize(("variant", "upstream_queries"), [
    ("same", 1),
    ("case", 1),  # names compare case-insensitively: one question
    ("do", 2),  # DNSSEC OK answers differ: two questions
])
async def test_concurrent_identical_queries_share_one_upstream_query(
        start_server, fault_upstream, variant, upstream_queries):
    upstream = fault_upstream("slow", delay=0.5)
    server = await start_server(upstream, upstream={"timeout": 2.0, "deadline": 3.0})
    count = 20

    def query_for(index: int):
        name = "Same.Example.TEST" if variant == "case" and index % 2 else "same.example.test"
        return make_query(name, "A", do=variant == "do" and index % 2 == 1, qid=1000 + index)

    queries = [query_for(index) for index in range(count)]
    responses = await asyncio.gather(*(ask(server, PROTOCOLS[index % 2], query)
                                       for index, query in enumerate(queries)))

    assert upstream.count() == upstream_queries
    assert [r.id for r in responses] == [q.id for q in queries]  # each client its own ID
    assert [r.question[0].name.to_text() for r in responses] == \
        [q.question[0].name.to_text() for q in queries]  # and its own question, case kept
    assert all([r.to_text() for r in resp.answer[0]] == [FAULT_A] for resp in responses)
    assert sum(server.metrics.queries.counts.values()) == count
    assert set(server.metrics.queries.counts) == {("udp", "forwarded", "A", "NOERROR"),
                                                 ("tcp", "forwarded", "A", "NOERROR")}


async def test_concurrent_queries_share_one_failure(start_server, fault_upstream):
    upstream = fault_upstream("silent")
    server = await start_server(upstream, upstream={"timeout": 0.2, "deadline": 0.5})
    responses = await asyncio.gather(*(ask(server, "udp", make_query("x.example.test", "A"))
                                       for _ in range(10)))
    assert {r.rcode() for r in responses} == {dns.rcode.SERVFAIL}
    assert upstream.count() <= 3  # one query's attempts within the deadline, not ten


# -- CNAME chains into blocked domains (CNAME cloaking) --------------------------------------

NOT_EXAMPLE_ORG = "lists:\n  - name: other\n    domains: [blocked.test]\n"
SINKHOLE_EXAMPLE_ORG = "lists:\n  - name: sinks\n    action: sinkhole\n    domains: [example.org]\n"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_cname_into_a_blocked_domain_is_blocked(start_server, nsd_upstream, protocol):
    server = await start_server(nsd_upstream)  # RULES_YAML blocks example.org
    query = make_query(ZONE.outside, "A", edns=0)
    for _ in range(2):  # from upstream, then from the cache
        response = await ask(server, protocol, query)
        assert response.rcode() == dns.rcode.NXDOMAIN and response.answer == []
        [soa] = response.authority
        assert (soa.name.to_text(), soa.rdtype, soa.ttl) == \
            ("example.org.", dns.rdatatype.SOA, BLOCK_TTL)  # owned by the blocked domain
        assert ede(response) == [
            (15, f"blocked by list tracking (rules {server.blocker.rules.version})")]
    assert server.metrics.blocked.counts == {("tracking", "example", "nxdomain"): 2}
    assert server.metrics.queries.counts == {(protocol, "blocked", "A", "NXDOMAIN"): 2}
    assert sent_upstream(server) == 1


async def test_cname_into_a_sinkholed_domain_gets_the_sinkhole(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, rules=SINKHOLE_EXAMPLE_ORG)
    response = await ask(server, "udp", make_query(ZONE.outside, "A"))
    assert rrsets(response.answer) == {(ZONE.outside, "A", frozenset({"0.0.0.0"}))}


@pytest.mark.parametrize(("name", "rules"), [
    (ZONE.outside, NOT_EXAMPLE_ORG),  # nothing blocks the target
    (ZONE.alias, RULES_YAML),  # a chain that stays in allowed names
])
async def test_cname_into_an_allowed_domain_resolves(start_server, nsd_upstream, name, rules):
    server = await start_server(nsd_upstream, rules=rules)
    query = make_query(name, "A")
    direct = await dns.asyncquery.udp(query, nsd_upstream.host, port=nsd_upstream.port,
                                      timeout=3)
    for _ in range(2):
        response = await ask(server, "udp", query)
        assert response.rcode() == dns.rcode.NOERROR
        assert rrsets(response.answer) == rrsets(direct.answer)
        assert response.answer[0].rdtype == dns.rdatatype.CNAME
    assert server.metrics.blocked.counts == {}


async def test_reload_rechecks_cached_cname_chains(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, rules=NOT_EXAMPLE_ORG)
    rules_file = server.config.blocking.rules[0]
    query = make_query(ZONE.outside, "A")
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.NOERROR

    with open(rules_file, "w") as out:
        out.write(RULES_YAML)
    assert await server.reload_rules()
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.NXDOMAIN  # cached, now blocked

    with open(rules_file, "w") as out:
        out.write(NOT_EXAMPLE_ORG)
    assert await server.reload_rules()
    assert (await ask(server, "udp", query)).rcode() == dns.rcode.NOERROR
    assert sent_upstream(server) == 1
    assert server.metrics.queries.counts == {("udp", "forwarded", "A", "NOERROR"): 1,
                                             ("udp", "blocked", "A", "NXDOMAIN"): 1,
                                             ("udp", "cached", "A", "NOERROR"): 1}
