"""The upstream pool against real servers on 127.0.0.1: order, strategies, backoff, per-server
timeouts and conditional forwarding, counted by the fault upstreams themselves.

Nothing here asserts how fast the machine is: exact timings (each attempt's timeout and when
it is due, the deadline, backoff periods) are table tests of the attempt plan in
test_attempts.py; these check that the real drivers carry them out."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from dnslib import DNSRecord
from prometheus_client import CollectorRegistry

from resolver.message import wire
from resolver.message.query import Query
from resolver.ops.config import ConditionalForward, UpstreamConfig, UpstreamServer
from resolver.ops.metrics import Metrics
from resolver.upstream import udp as udp_module
from resolver.upstream.attempts import Exchange
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


class Awaited(Exchange):
    """An exchange of the test's own, started on the pool (its Plan) at a `now` the test
    chose; `result` resolves when it is done."""

    def __init__(self, q: Query, pool: UpstreamPool):
        super().__init__(q, pool)
        self.result: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

    def done(self, data: bytes | None) -> None:
        self.result.set_result(data)


def connected_udp_sockets(port: int) -> int:
    """UDP sockets on this host connected to 127.0.0.1:port (from /proc/net/udp): what a pool
    holds open towards that upstream, seen from outside the pool."""
    count = 0
    with open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            address, _, remote_port = line.split()[2].partition(":")
            host = socket.inet_ntoa(struct.pack("=I", int(address, 16)))
            count += (host, int(remote_port, 16)) == ("127.0.0.1", port)
    return count


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
        slow_rtt = gauge(registry, "upstream_rtt_seconds", slow)
        fast_rtt = gauge(registry, "upstream_rtt_seconds", fast)
        assert slow_rtt is not None and slow_rtt >= 0.1  # its delay: however loaded the host
        assert fast_rtt is not None and 0 < fast_rtt < slow_rtt


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


@pytest.mark.parametrize("per_server, applies", [
    (0.1, 0.1),   # the silent server's own timeout
    (None, 0.4),  # else the section's
])
async def test_per_server_timeout(fault_upstream, per_server, applies):
    """The silent server's attempt is given its timeout (the attempt is due then, and a
    failed attempt's RTT sample is its timeout); it times out and the next server answers."""
    silent, good = fault_upstream("silent"), fault_upstream("answer")
    async with open_pool(server(silent, timeout=per_server), server(good), timeout=0.4,
                         deadline=3.0) as (pool, registry):
        assert [upstream.timeout for upstream in pool.upstreams] == [applies, 0.4]
        exchange = Awaited(query(), pool)
        now = time.monotonic()  # the pool's clock: its UDP driver sweeps by it
        exchange.start(now)
        assert exchange.due == now + applies
        data = await asyncio.wait_for(exchange.result, 5)
        assert data is not None and answer_of(data) == FAULT_A
        assert gauge(registry, "upstream_rtt_seconds", silent) == pytest.approx(applies)
        assert registry.get_sample_value("resolver_upstream_errors_total", {
            "upstream": silent.address, "kind": "timeout"}) == 1
    assert (silent.count(), good.count()) == (1, 1)


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
    attacker faces ports that move, not a fixed set, on top of the random ID. The upstream
    sees the ports; /proc sees the sockets close with the pool."""
    a = fault_upstream("answer")
    sockets, uses = udp_module.SOCKETS_PER_UPSTREAM, udp_module.SOCKET_QUERIES
    total = sockets * uses * 7 // 2  # three and a half sockets' worth for each place
    async with open_pool(server(a)) as (pool, _):
        for index in range(total):
            assert answer_of(await pool.query(query(f"q{index}.example.org"))) == FAULT_A
        await asyncio.sleep(0.05)  # let the last renewals land
        assert connected_udp_sockets(a.port) >= sockets
    await asyncio.sleep(0)  # a closed transport closes its socket on the next loop pass
    assert connected_udp_sockets(a.port) == 0, "closed with the pool"
    assert a.count() == total
    ports = Counter(received.port for received in a.received)
    assert len(ports) >= 3 * sockets
    assert max(ports.values()) <= 2 * uses, "no port carries queries for ever"


async def test_a_failing_timeout_handler_stops_neither_the_sweep_nor_other_queries(
        fault_upstream, caplog):
    """A bug in what one timed-out exchange does next is logged; the sweep still fails the
    other attempts due with it, and keeps running for the queries after it."""
    silent = fault_upstream("silent")

    class Broken(Exchange):
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
