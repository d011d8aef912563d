"""Assembly and lifecycle: build the chain once, bind the sockets, run, close cleanly.

`build_pipeline` is the one place the order of stages is written down. `running_server` is an
async context manager: rules are compiled before any socket is bound, TCP is bound before UDP
on the same port (so port 0 gives one port for both), and everything is closed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from resolver.message.constants import Clock
from resolver.message.query import Outcome
from resolver.message.reply import TtlPolicy
from resolver.ops.config import Address, Config
from resolver.ops.errors import ConfigError
from resolver.ops.metrics import Endpoint, Metrics
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.server.outbox import Outbox
from resolver.server.packetcache import PacketCache
from resolver.server.pipeline import Delivery, Pipeline
from resolver.server.tcp import TcpConnection, TcpLimits
from resolver.server.udp import UdpServer
from resolver.stages.blocking import Blocker, Later
from resolver.stages.cache import Cache, CacheLookup
from resolver.stages.cname import CnameBlocker, CnameCheck
from resolver.stages.contract import Stage
from resolver.stages.forward import Forwarder
from resolver.stages.prefetch import Prefetch
from resolver.stages.stale import ServeStale
from resolver.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

UDP_RECEIVE_BUFFER = 4 * 1024 * 1024  # bytes asked for; the kernel may grant less
BIND_ATTEMPTS = 20  # port 0: retry when the TCP port's UDP twin is taken


@dataclass(frozen=True)
class Chain:
    """What build_pipeline made: the pipeline, the packet cache in front of it (UDP), and the
    parts the server drives from outside (rule installs, shutdown, in-flight counts)."""

    pipeline: Pipeline
    packets: PacketCache
    blocker: Blocker
    cache: Cache
    forwarder: Forwarder


def build_pipeline(config: Config, rules: RuleSet, metrics: Metrics, upstreams: UpstreamPool,
                   clock: Clock, schedule: Later, wall: Clock = time.time) -> Chain:
    """The chain, in order, and why:

    0. the packet cache (UDP only, before decoding; server/packetcache.py): answers that a
       stage below gave and said still hold, replayed for identical query bytes; cleared
       whenever the rules change;
    1. blocking: policy first, so a blocked name is never answered from the cache or
       upstream, even just after a rule change;
    2. cache lookup: everything still allowed and recently seen is answered synchronously
       (a popular answer about to expire is refreshed in the background: prefetch.py); when
       the cache holds nothing at all for the question it says FORWARD, skipping 3 and 4,
       which only read its entries;
    3. CNAME blocking: a cached answer whose CNAME chain leads into a blocked domain is
       answered as blocked (cname.py); after the cache, since only such entries get this far;
    4. stale: while upstreams keep failing for an expired answer, it is served stale at once
       (stale.py); last, since it only matters when nothing fresher exists;
    5. forwarding (not a synchronous stage): answers later, through `Delivery`; coalesces,
       checks CNAME chains, and falls back on stale answers when upstreams fail.

    schedule (loop.call_later) arms the forwarder's client response timers and the
    blocker's list-window timer; wall (epoch seconds) is what list windows are written in.
    """
    blocker = Blocker(rules, config.blocking, metrics, clock=clock, wall=wall,
                      schedule=schedule)
    cname = CnameCheck(blocker)
    cache = Cache(config.cache, metrics, clock, inspect=cname.verdict)
    blocker.on_install(cache.recheck)
    stale = ServeStale(cache, config.cache, metrics)
    policy = TtlPolicy(config.cache.min_ttl, config.cache.max_ttl, config.cache.negative_ttl,
                       config.cache.servfail_ttl)
    forwarder = Forwarder(upstreams, cache, policy, stale, cname, Delivery(metrics).deliver,
                          schedule, clock, metrics, config.server.max_inflight)
    stages: list[Stage] = [
        blocker,
        CacheLookup(cache, metrics, Prefetch(config.cache, metrics, forwarder.refresh)),
        CnameBlocker(cname, cache),
        stale,
    ]
    metrics.queries.expect((sink.name, outcome) for sink in (UdpServer, TcpConnection)
                           for outcome in Outcome.ALL)
    pipeline = Pipeline(stages, forwarder, metrics, config.server.max_inflight)
    packets = PacketCache(pipeline, config.cache.packet_entries, clock, metrics.queries)
    blocker.on_install(packets.clear)
    metrics.gauge("packet_cache_entries", "Whole UDP answers kept by query bytes.", (),
                  lambda: {(): len(packets)})
    return Chain(pipeline, packets, blocker, cache, forwarder)


@dataclass
class RunningServer:
    """What a started server exposes: its bound addresses, its chain and metrics."""

    addresses: list[tuple[str, int]]
    chain: Chain
    metrics: Metrics
    metrics_address: tuple[str, int] | None
    config: Config

    @property
    def blocker(self) -> Blocker:
        return self.chain.blocker

    async def reload_rules(self) -> bool:
        """Load the rule files again and swap them in; on any problem keep the old rules.

        Loading runs in a thread so a large list does not stall answering meanwhile.
        """
        try:
            rules = await asyncio.to_thread(load_rules, self.config.blocking.rules)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload failed, keeping the previous rules: %s", problem)
            self.metrics.reloads.inc(("failed",))
            return False
        except Exception:  # a bug must not end reloading, nor go uncounted
            log.exception("reload failed, keeping the previous rules")
            self.metrics.reloads.inc(("failed",))
            return False
        self.blocker.install(rules)
        self.metrics.reloads.inc(("ok",))
        log.info("reloaded rules: %d domains", rules.domain_count)
        return True


@contextlib.asynccontextmanager
async def running_server(config: Config, rules: RuleSet, clock: Clock | None = None,
                         reuse_port: bool = False, serve_metrics: bool = True
                         ) -> AsyncIterator[RunningServer]:
    """Serve until the context exits; yields the bound addresses (port 0 resolved).

    reuse_port: bind with SO_REUSEPORT so several worker processes share the ports.
    serve_metrics: start the HTTP endpoint here (a worker leaves it to its supervisor).
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    outbox = Outbox()
    clock = clock or time.monotonic
    upstreams = UpstreamPool(config.upstream, metrics, outbox=outbox, clock=clock)
    chain = build_pipeline(config, rules, metrics, upstreams, clock,
                           asyncio.get_running_loop().call_later)
    limits = TcpLimits(config.server.tcp_idle_timeout, config.server.tcp_max_connections)
    closers: list[Callable[[], None]] = []
    endpoint = None
    try:
        await upstreams.open()  # in here: a failure part-way still closes what it opened
        addresses = [await _bind(address, chain, outbox, limits, closers, reuse_port)
                     for address in config.server.listen]
        listen = config.metrics.listen
        if serve_metrics and listen is not None:
            endpoint = Endpoint(listen.host, listen.port, registry)
        yield RunningServer(addresses, chain, metrics,
                            endpoint.address if endpoint else None, config)
    finally:
        for close in reversed(closers):
            close()
        for connection in list(limits.open):
            connection.transport.close()
        chain.forwarder.drain()
        upstreams.close()
        if endpoint is not None:
            await asyncio.to_thread(endpoint.stop)


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Ask for a deep UDP receive queue, so a burst waits instead of being dropped by the
    kernel; Linux caps it at net.core.rmem_max (raise that sysctl to get all of it)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
    except OSError as exc:
        log.warning("could not enlarge the UDP receive buffer: %s", exc)


def bound_socket(host: str, port: int, kind: socket.SocketKind, reuse_port: bool
                 ) -> socket.socket:
    """A bound, non-blocking socket, set up as asyncio sets up its TCP servers: IPv6 only for
    an IPv6 address (a dual-stack [::] would take 0.0.0.0's port too, and `[::]:53` beside
    `0.0.0.0:53` would fail to bind), and for TCP, SO_REUSEADDR (a port in TIME_WAIT is free).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _bind(address: Address, chain: Chain, outbox: Outbox, limits: TcpLimits,
                closers: list[Callable[[], None]], reuse_port: bool) -> tuple[str, int]:
    """Bind TCP, then UDP on the port TCP got; return the (host, port) bound."""
    loop = asyncio.get_running_loop()
    for attempt in range(BIND_ATTEMPTS):
        tcp = await loop.create_server(lambda: TcpConnection(chain.pipeline, limits),
                                       address.host, address.port, reuse_address=True,
                                       reuse_port=reuse_port)
        port = tcp.sockets[0].getsockname()[1]
        try:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: UdpServer(chain.packets, outbox),
                sock=bound_socket(address.host, port, socket.SOCK_DGRAM, reuse_port))
        except OSError:
            tcp.close()
            if address.port != 0 or attempt == BIND_ATTEMPTS - 1:
                raise
            continue
        closers.append(tcp.close)
        closers.append(udp.close)
        _grow_receive_buffer(udp.get_extra_info("socket"))
        return address.host, port
    raise AssertionError("unreachable")


async def serve_until_signalled(config: Config, rules: RuleSet,
                                on_ready: Callable[[RunningServer], None],
                                reuse_port: bool = False, serve_metrics: bool = True) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the rules (keeping them on error)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(config, rules, reuse_port=reuse_port,
                              serve_metrics=serve_metrics) as server:
        reloads: set[asyncio.Task[None]] = set()
        one_at_a_time = asyncio.Lock()  # fair: reloads finish in the order they were asked

        async def reload_in_turn() -> None:
            async with one_at_a_time:
                await server.reload_rules()

        def reload() -> None:
            task = loop.create_task(reload_in_turn())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        on_ready(server)
        await stop.wait()
