"""The upstream pool against real servers on 127.0.0.1: order, strategies, backoff, per-server
timeouts and conditional forwarding, counted by the fault upstreams themselves."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from dnslib import DNSRecord
from prometheus_client import CollectorRegistry

from resolver.upstream import pool as upstream_module
from resolver.upstream import udp as udp_module
from resolver.message import wire
from resolver.ops.config import ConditionalForward, UpstreamConfig, UpstreamServer
from resolver.ops.metrics import Metrics
from resolver.message.query import Query
from resolver.upstream.pool import UpstreamError, UpstreamPool
from tests.servers import FAULT_A, FaultUpstream


class NeverExplore(random.Random):
    """A Random whose draws never fall under selection.EXPLORE, so `fastest` is exact."""

    def random(self) -> float:
        return 0.99


def query(name: str = "www.example.org", rdtype: str = "A") -> Query:
    return wire.parse_query(DNSRecord.question(name, rdtype).pack(), ("127.0.0.1", 0), "udp")


def server(upstream: FaultUpstream, **settings) -> UpstreamServer:
    return UpstreamServer(upstream.host, upstream.port, **settings)


@contextlib.asynccontextmanager
async def open_pool(*servers: UpstreamServer, rng: random.Random | None = None,
                    **settings) -> AsyncIterator[tuple[UpstreamPool, CollectorRegistry]]:
    """A pool with short timeouts, opened; settings replace UpstreamConfig fields."""
    registry = CollectorRegistry()
    config = replace(UpstreamConfig(servers=servers, timeout=0.5, deadline=1.5), **settings)
    pool = UpstreamPool(config, Metrics(registry), rng)
    await pool.open()
    try:
        yield pool, registry
    finally:
        pool.close()


def answer_of(data: bytes) -> str:
    return str(DNSRecord.parse(data).a.rdata)


def gauge(registry: CollectorRegistry, name: str, upstream: FaultUpstream) -> float | None:
    return registry.get_sample_value(f"resolver_{name}", {"upstream": upstream.address})


@pytest.mark.parametrize("first, asked", [
    ("answer", (1, 0)),    # the first answers: the second is never asked
    ("servfail", (1, 1)),  # SERVFAIL moves on
    ("silent", (1, 1)),    # so does a timeout
    ("garbage", (1, 1)),   # and a reply that cannot be ours
])
async def test_failover_asks_in_the_configured_order(fault_upstream, first, asked):
    a, b = fault_upstream(first), fault_upstream("answer")
    async with open_pool(server(a, timeout=0.2), server(b)) as (pool, _):
        assert answer_of(await pool.query(query())) == FAULT_A
    assert (a.count(), b.count()) == asked


async def test_random_spreads_queries_over_all_upstreams(fault_upstream):
    upstreams = [fault_upstream("answer") for _ in range(3)]
    async with open_pool(*map(server, upstreams), strategy="random",
                         rng=random.Random(5)) as (pool, _):
        for index in range(30):
            await pool.query(query(f"q{index}.example.org"))
    counts = [upstream.count() for upstream in upstreams]
    assert sum(counts) == 30 and min(counts) > 0, counts


async def test_fastest_prefers_the_upstream_that_answers_sooner(fault_upstream):
    slow, fast = fault_upstream("slow", delay=0.1), fault_upstream("answer")
    async with open_pool(server(slow), server(fast), strategy="fastest",
                         rng=NeverExplore()) as (pool, registry):
        for index in range(20):
            await pool.query(query(f"q{index}.example.org"))
        # Both start unmeasured: the first query measures slow, the second fast, then fast.
        assert (slow.count(), fast.count()) == (1, 19)
        assert gauge(registry, "upstream_rtt_seconds", slow) >= 0.1
        assert gauge(registry, "upstream_rtt_seconds", fast) < 0.05


async def test_a_failing_upstream_is_backed_off_then_probed_again(fault_upstream):
    dead, good = fault_upstream("silent"), fault_upstream("answer")
    async with open_pool(server(dead, timeout=0.1), server(good), unhealthy_after=2,
                         backoff=0.3) as (pool, registry):
        seen = []
        for index in range(4):
            await pool.query(query(f"q{index}.example.org"))
            seen.append(dead.count())
        assert seen == [1, 2, 2, 2], "skipped after the second failure in a row"
        assert gauge(registry, "upstream_healthy", dead) == 0
        assert gauge(registry, "upstream_healthy", good) == 1
        await asyncio.sleep(0.35)  # the backoff is over: the next query probes it
        await pool.query(query("after.example.org"))
        assert dead.count() == 3
        assert good.count() == 5


async def test_when_every_upstream_is_backed_off_they_are_tried_anyway(fault_upstream):
    silent = fault_upstream("silent")
    async with open_pool(server(silent, timeout=0.1), unhealthy_after=1,
                         backoff=60) as (pool, registry):
        with pytest.raises(UpstreamError):
            await pool.query(query())
        assert gauge(registry, "upstream_healthy", silent) == 0
        before = silent.count()
        with pytest.raises(UpstreamError):
            await pool.query(query())
    assert silent.count() > before


@pytest.mark.parametrize("per_server, within", [
    (0.1, 0.5),   # the silent server's own timeout: the second answers quickly
    (None, 2.0),  # the section's timeout (1 s) applies
])
async def test_per_server_timeout(fault_upstream, per_server, within):
    silent, good = fault_upstream("silent"), fault_upstream("answer")
    async with open_pool(server(silent, timeout=per_server), server(good), timeout=1.0,
                         deadline=3.0) as (pool, _):
        started = time.monotonic()
        assert answer_of(await pool.query(query())) == FAULT_A
        elapsed = time.monotonic() - started
    assert elapsed < within
    assert per_server is not None or elapsed >= 1.0


@pytest.mark.parametrize("name, goes_to", [
    ("www.corp.example", "corp"),
    ("corp.example", "corp"),              # the domain itself
    ("WWW.Corp.Example.", "corp"),         # any case
    ("a.dev.corp.example", "dev"),         # the most specific domain wins
    ("dev.corp.example", "dev"),
    ("notcorp.example", "default"),        # label boundaries, not string suffixes
    ("corp.example.org", "default"),
    ("www.example.org", "default"),
])
async def test_conditional_forwarding(fault_upstream, name, goes_to):
    upstreams = {group: fault_upstream("answer") for group in ("default", "corp", "dev")}
    conditional = (
        ConditionalForward(("corp.example",), (server(upstreams["corp"]),)),
        ConditionalForward(("dev.corp.example", "lab.example"), (server(upstreams["dev"]),)),
    )
    async with open_pool(server(upstreams["default"]), conditional=conditional) as (pool, _):
        assert answer_of(await pool.query(query(name))) == FAULT_A
    assert {group: upstream.count() for group, upstream in upstreams.items()} == {
        group: int(group == goes_to) for group in upstreams}


async def test_a_conditional_group_never_falls_back_to_the_default(fault_upstream):
    default, corp = fault_upstream("answer"), fault_upstream("silent")
    conditional = (ConditionalForward(("corp.example",), (server(corp, timeout=0.1),)),)
    async with open_pool(server(default), conditional=conditional, deadline=0.5) as (pool, _):
        with pytest.raises(UpstreamError):
            await pool.query(query("www.corp.example"))
    assert default.count() == 0, "internal names must not leak to the public upstreams"


async def test_source_ports_keep_changing(fault_upstream):
    """Each socket of the pool is replaced after SOCKET_QUERIES queries, so an off-path
    attacker faces ports that move, not a fixed set, on top of the random ID."""
    a = fault_upstream("answer")
    ports: set[int] = set()
    total = udp_module.SOCKETS_PER_UPSTREAM * udp_module.SOCKET_QUERIES * 3
    async with open_pool(server(a)) as (pool, _):
        sockets = pool.upstreams[0].udp._sockets
        for index in range(total):
            if index % 100 == 0:
                ports.update(s.transport.get_extra_info("sockname")[1] for s in sockets)
            assert answer_of(await pool.query(query(f"q{index}.example.org"))) == FAULT_A
        await asyncio.sleep(0.05)  # let the last renewals land
        ports.update(s.transport.get_extra_info("sockname")[1] for s in sockets)
    assert len(sockets) == 0  # closed with the pool
    assert len(ports) >= 3 * udp_module.SOCKETS_PER_UPSTREAM
    assert a.count() == total


async def test_a_failing_timeout_handler_stops_neither_the_sweep_nor_other_queries(
        fault_upstream, caplog):
    """A bug in what one timed-out exchange does next is logged; the sweep still fails the
    other attempts due with it, and keeps running for the queries after it."""
    silent = fault_upstream("silent")

    class Broken(upstream_module._Awaited):
        def done(self, data: bytes | None) -> None:
            raise RuntimeError("a bug in what follows a timeout")

    async with open_pool(server(silent), timeout=0.1, deadline=0.1) as (pool, _):
        broken = Broken(query("broken.example.org"), pool)
        broken.start(time.monotonic())
        later = asyncio.ensure_future(pool.query(query("later.example.org")))
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(later, 2)
        with pytest.raises(UpstreamError):  # the sweep still runs for a new query
            await asyncio.wait_for(pool.query(query("after.example.org")), 2)
    assert "unexpected error while failing an upstream query" in caplog.text
