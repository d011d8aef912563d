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
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from resolver.message.constants import Clock
from resolver.message.query import Outcome
from resolver.message.reply import TtlPolicy
from resolver.ops.config import Address, Config, Overrides
from resolver.ops.http import Endpoint, Reload
from resolver.ops.metrics import Metrics
from resolver.ops.watch import Watcher
from resolver.rules.matcher import RuleSet
from resolver.rules.sources import Feeds
from resolver.server.outbox import Outbox
from resolver.server.packetcache import PacketCache
from resolver.server.pipeline import Delivery, Pipeline
from resolver.server.reload import FAILED, HTTP_WAIT, OK, UNCHANGED, Install, Reloads, pending
from resolver.server.reload import Outcome as ReloadOutcome
from resolver.server.tcp import TcpConnection, TcpLimits
from resolver.server.udp import UdpServer
from resolver.stages.blocking import Blocker
from resolver.stages.cache import Cache, CacheLookup
from resolver.stages.cname import CnameBlocker, CnameCheck
from resolver.stages.contract import CallLater, Stage
from resolver.stages.forward import Forwarder
from resolver.stages.prefetch import Prefetch
from resolver.stages.stale import ServeStale
from resolver.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

UDP_RECEIVE_BUFFER = 4 * 1024 * 1024  # bytes asked for; the kernel may grant less
BIND_ATTEMPTS = 20  # port 0: retry when the TCP port's UDP twin is taken
WATCH_IDLE = 1.0  # seconds between looks at blocking.watch_interval while watching is off


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
                   clock: Clock, schedule: CallLater, wall: Clock = time.time) -> Chain:
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
    3. CNAME blocking: a fresh cached answer whose CNAME chain leads into a blocked domain
       is answered as blocked (cname.py); after the cache, which passes such entries (and
       expired ones, which go on to 4) instead of answering them;
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
    """What a started server exposes: its bound addresses, its chain and metrics, and its
    rule reloads (`reloads` is None in a worker process, whose supervisor reloads)."""

    addresses: list[tuple[str, int]]
    chain: Chain
    metrics: Metrics
    metrics_address: tuple[str, int] | None
    config: Config  # as given at startup (the `blocking` section in force: current.blocking)
    current: Install  # the rules in force, the `blocking` section they came with, and when
    reloads: Reloads | None = None
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # fair: reloads in order

    @property
    def installed_at(self) -> float:
        """Wall-clock time the rules in force were installed."""
        return self.current.at

    @property
    def blocker(self) -> Blocker:
        return self.chain.blocker

    @property
    def rules(self) -> RuleSet:
        return self.chain.blocker.rules

    def install(self, install: Install) -> None:
        """Swap in a compiled rule set, in one step on the event loop."""
        self.blocker.install(install.rules, install.blocking)
        self.current = install

    async def reload(self, force: bool = False, trigger: str = "signal") -> ReloadOutcome:
        """Read the files again and swap in what they say, unless it is broken, refused by
        the guard (and not forced) or unchanged; the old rules answer meanwhile. Reloads run
        one at a time, in the order asked. Reading and compiling run in a thread (which forks
        the child that compiles: rules/apart.py), so a large list does not stall answering."""
        reloads = self.reloads
        if reloads is None:
            raise RuntimeError("a worker's rules come from its supervisor")
        async with self._turn:
            read = await asyncio.to_thread(reloads.read)
            try:
                judged = reloads.judge(read, force, trigger)
                if isinstance(judged, Install):
                    self.install(judged)
                    judged = reloads.installed(judged)
            except Exception as exc:  # a bug must not end reloading, nor go unsaid
                log.exception("reload (%s) failed", trigger)
                judged = ReloadOutcome(FAILED, self.rules.version, (f"internal error: {exc!r}",))
            # an unchanged reload may still bring a new watch interval or guard
            self.current = reloads.current
            return reloads.report(judged, trigger)

    async def reload_rules(self) -> bool:
        """A forced reload, for tests and tools that change the files and want them served
        (the guard is for operators' changes): True when the rules in force are the files'."""
        outcome = await self.reload(force=True, trigger="api")
        return outcome.result in (OK, UNCHANGED)


@contextlib.asynccontextmanager
async def running_server(config: Config, rules: RuleSet, clock: Clock | None = None,
                         reuse_port: bool = False, serve_metrics: bool = True, *,
                         overrides: Overrides = Overrides(), wall: Clock = time.time,
                         worker: Install | None = None, watcher: Watcher | None = None,
                         feeds: Feeds | None = None) -> AsyncIterator[RunningServer]:
    """Serve until the context exits; yields the bound addresses (port 0 resolved).

    reuse_port: bind with SO_REUSEPORT so several worker processes share the ports.
    serve_metrics: start the HTTP endpoint here (a worker leaves it to its supervisor).
    overrides: the command-line flags, which a reload applies over the config file again.
    wall: the wall clock, for when rules were installed.
    worker: in a worker process, the rule set it was forked with (and when that was
    installed); its supervisor reloads and sends it new sets, so it neither watches files
    nor reloads itself.
    feeds: the URL sources the rules were loaded with (reload.load_at_start), refreshed here.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    outbox = Outbox()
    clock = clock or time.monotonic
    upstreams = UpstreamPool(config.upstream, metrics, outbox=outbox, clock=clock)
    loop = asyncio.get_running_loop()
    chain = build_pipeline(config, rules, metrics, upstreams, clock, loop.call_later, wall)
    limits = TcpLimits(config.server.tcp_idle_timeout, config.server.tcp_max_connections)
    closers: list[Callable[[], None]] = []
    endpoint = None
    watching = refreshing = None
    try:
        await upstreams.open()  # in here: a failure part-way still closes what it opened
        addresses = [await _bind(address, chain, outbox, limits, closers, reuse_port)
                     for address in config.server.listen]
        reloads = None if worker is not None else Reloads(config, overrides, rules,
                                                          metrics.reloads, wall, feeds)
        current = worker if reloads is None else reloads.current
        assert current is not None
        server = RunningServer(addresses, chain, metrics, None, config, current, reloads)
        del rules, worker, current  # the server holds them: a reload frees what it replaces
        if reloads is not None:
            # the baseline: given, taken before the rules were read, so a change made
            # meanwhile is seen; else what the files hold now
            watching = loop.create_task(
                _watch_files(server, watcher or Watcher(reloads.watch_paths)))
            reloads.feeds.export(metrics)
            refreshing = loop.create_task(_refresh_sources(server, reloads.feeds))
        _rule_gauges(metrics, server)
        listen = config.metrics.listen
        if serve_metrics and listen is not None:
            endpoint = Endpoint(listen.host, listen.port, registry,
                                _reload_from(server, loop) if reloads is not None else None)
            server.metrics_address = endpoint.address
        yield server
    finally:
        for task in (watching, refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for close in reversed(closers):
            close()
        for connection in list(limits.open):
            connection.transport.close()
        chain.forwarder.drain()
        chain.blocker.close()
        upstreams.close()
        if endpoint is not None:
            endpoint.stop()


def _rule_gauges(metrics: Metrics, server: RunningServer) -> None:
    """The version served (1 per process: the supervisor's sum counts the workers serving
    each version) and when it was installed (the latest across workers)."""
    metrics.gauge("rules_info", "The rule set version served, by version; the value is the "
                  "number of worker processes serving it.", ("version",),
                  lambda: {(server.rules.version,): 1})
    metrics.gauge("rules_last_reload_timestamp_seconds", "Wall-clock time the rules in force "
                  "were installed (at startup, or by the last successful reload).", (),
                  lambda: {(): server.installed_at}, merge="max")


def _reload_from(server: RunningServer, loop: asyncio.AbstractEventLoop) -> Reload:
    """What the HTTP thread calls for POST /-/reload: the reload runs on the event loop, in
    turn with every other, and the request waits for its result a while."""

    def reload(force: bool) -> ReloadOutcome:
        future = asyncio.run_coroutine_threadsafe(server.reload(force, "http"), loop)
        try:
            return future.result(HTTP_WAIT)
        except TimeoutError:  # concurrent.futures' is the builtin since 3.11
            return pending(server.rules.version)

    return reload


async def _watch_files(server: RunningServer, watcher: Watcher) -> None:
    """Reload when the rule files (or the config file) change: a look every
    `blocking.watch_interval` seconds, in a thread (a slow disk must not stall answering).
    The interval is read again each time, since a reload may change it; at 0 nothing is
    looked at."""
    reloads = server.reloads
    assert reloads is not None
    loop = asyncio.get_running_loop()
    while True:
        interval = server.current.blocking.watch_interval
        await asyncio.sleep(interval or WATCH_IDLE)
        if not interval:
            continue
        try:
            watcher.watch(reloads.watch_paths)
            if await asyncio.to_thread(watcher.poll, loop.time(), interval):
                await server.reload(trigger="watch")
        except Exception:  # a bug must not end watching without a word
            log.exception("watching the rule files failed; trying again")


async def _refresh_sources(server: RunningServer, feeds: Feeds) -> None:
    """Fetch URL sources when due, in a thread (a slow feed must not stall answering), and
    reload when one brought new content: the same reload as a file change's, whose outcome
    keeps or drops the new copy (Reloads.report)."""
    while True:
        await asyncio.sleep(feeds.sleep())
        try:
            if feeds.due() and await asyncio.to_thread(feeds.refresh_due):
                await server.reload(trigger="source")
        except Exception:  # a bug must not end refreshing without a word
            log.exception("refreshing the rule sources failed; trying again")


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
                                reuse_port: bool = False, serve_metrics: bool = True, *,
                                overrides: Overrides = Overrides(),
                                worker: Install | None = None,
                                watcher: Watcher | None = None,
                                feeds: Feeds | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the rules (keeping them on error), but
    in a worker, whose supervisor reloads and sends it the new set (see running_server)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = running_server(config, rules, reuse_port=reuse_port,
                             serve_metrics=serve_metrics, overrides=overrides,
                             worker=worker, watcher=watcher, feeds=feeds)
    reloading = worker is None
    del rules, worker  # held by the server from here (its context drops them on entry)
    async with serving as server:
        reloads: set[asyncio.Task[ReloadOutcome]] = set()

        def reload() -> None:
            task = loop.create_task(server.reload(trigger="signal"))  # in turn: server._turn
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        if reloading:
            loop.add_signal_handler(signal.SIGHUP, reload)
        on_ready(server)
        await stop.wait()
