"""Assembly and lifecycle: build the chain once, bind the sockets, run, close cleanly.

`build_pipeline` is the one place the order of stages is written down. `running_server` is an
async context manager: rules are compiled before any socket is bound, TCP is bound before UDP
on the same port (so port 0 gives one port for both), and everything is closed on exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from resolver.message.constants import Clock
from resolver.message.query import Outcome
from resolver.message.reply import TtlPolicy
from resolver.ops.config import STDERR, STDOUT, Address, Config, Overrides
from resolver.ops.health import LOOP_DEADLINE, Probe, Probed, Status
from resolver.ops.http import Endpoint, Reload
from resolver.ops.metrics import Metrics
from resolver.ops.querylog import QueryLog
from resolver.ops.watch import Watcher
from resolver.rules.matcher import RuleSet
from resolver.rules.sources import Feeds
from resolver.server import privileges
from resolver.server.front import Front
from resolver.server.outbox import Outbox
from resolver.server.packetcache import PacketCache
from resolver.server.pipeline import Delivery, Pipeline
from resolver.server.reload import FAILED, HTTP_WAIT, OK, UNCHANGED, Install, Reloads, pending
from resolver.server.reload import Outcome as ReloadOutcome
from resolver.server.tcp import TcpConnection, TcpLimits
from resolver.server.udp import UdpServer
from resolver.stages.access import Networks
from resolver.stages.blocking import Blocker
from resolver.stages.cache import Cache, CacheLookup
from resolver.stages.cname import CnameBlocker, CnameCheck
from resolver.stages.contract import CallLater, QueryObserver, Stage
from resolver.stages.forward import Forwarder
from resolver.stages.minimal_any import MinimalAny
from resolver.stages.prefetch import Prefetch
from resolver.stages.ratelimit import Limiter
from resolver.stages.stale import ServeStale
from resolver.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

UDP_RECEIVE_BUFFER = 4 * 1024 * 1024  # bytes asked for; the kernel may grant less
BIND_ATTEMPTS = 20  # port 0: retry when the TCP port's UDP twin is taken
WATCH_IDLE = 1.0  # seconds between looks at blocking.watch_interval while watching is off


@dataclass(frozen=True)
class Chain:
    """What build_pipeline made: the pipeline, the packet cache in front of it and the access
    and rate limit front before that (UDP), and the parts the server drives from outside
    (rule installs, shutdown, in-flight counts)."""

    pipeline: Pipeline
    packets: PacketCache
    front: Front
    blocker: Blocker
    cache: Cache
    forwarder: Forwarder
    querylog: QueryLog | None = None  # None: the query log is off


def build_pipeline(config: Config, rules: RuleSet, metrics: Metrics, upstreams: UpstreamPool,
                   clock: Clock, schedule: CallLater, wall: Clock = time.time) -> Chain:
    """The chain, in order, and why:

    00. access control, then the rate limit (UDP; server/front.py, stages/access.py,
       stages/ratelimit.py): who asks decides before anything else, so a refused or limited
       client costs no decoding and is never answered from the packet cache; TCP checks
       access once per connection and has caps instead of a rate (server/tcp.py);
    0. the packet cache (UDP only, before decoding; server/packetcache.py): answers that a
       stage below gave and said still hold, replayed for identical query bytes; cleared
       whenever the rules change;
    1. blocking: policy first, so a blocked name is never answered from the cache or
       upstream, even just after a rule change;
    1b. minimal ANY (UDP, unless server.any is forward; minimal_any.py): RFC 8482's small
       answer, before the cache could replay a large forwarded one;
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
    The query log (config.query_log; ops/querylog.py), when on, is offered every query the
    pipeline or the packet cache answered or dropped; the front's refusals and rate limits
    (server/front.py) are counted in resolver_queries_total but not offered.
    """
    blocker = Blocker(rules, config.blocking, metrics, clock=clock, wall=wall,
                      schedule=schedule)
    # its writer thread runs until running_server closes it
    querylog = (QueryLog(config.query_log, lambda: blocker.rules, metrics, wall=wall,
                         clock=clock) if config.query_log.path is not None else None)
    observer: QueryObserver | None = querylog
    cname = CnameCheck(blocker)
    cache = Cache(config.cache, metrics, clock, inspect=cname.verdict)
    blocker.on_install(cache.recheck)
    stale = ServeStale(cache, config.cache, metrics)
    policy = TtlPolicy(config.cache.min_ttl, config.cache.max_ttl, config.cache.negative_ttl,
                       config.cache.servfail_ttl)
    forwarder = Forwarder(upstreams, cache, policy, stale, cname,
                          Delivery(metrics, clock, observer).deliver, schedule, clock, metrics,
                          config.server.max_inflight)
    stages: list[Stage] = [
        blocker,
        *([MinimalAny(metrics)] if config.server.any == "minimal" else []),
        CacheLookup(cache, metrics, Prefetch(config.cache, metrics, forwarder.refresh)),
        CnameBlocker(cname, cache),
        stale,
    ]
    metrics.queries.expect((UdpServer.name, TcpConnection.name), Outcome.ALL)
    pipeline = Pipeline(stages, forwarder, metrics, config.server.max_inflight, clock, observer)
    packets = PacketCache(pipeline, config.cache.packet_entries, clock, metrics.queries,
                          observer)
    blocker.on_install(packets.clear)
    limiter = (Limiter(config.ratelimit, clock, schedule) if config.ratelimit.qps > 0
               else None)
    front = Front(packets, Networks(config.server.allow), config.server.refuse_action,
                  limiter, metrics)
    metrics.gauge("packet_cache_entries", "Whole UDP answers kept by query bytes.", (),
                  lambda: {(): len(packets)})
    return Chain(pipeline, packets, front, blocker, cache, forwarder, querylog)


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
    upstreams: UpstreamPool | None = None  # what readiness asks when upstreams last answered
    clock: Clock = time.monotonic  # the server's, which the upstream times are read on
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

    def status(self) -> Status:
        """What this event loop tells /healthz and /readyz (called on the loop)."""
        answered, failed = (None, None) if self.upstreams is None else self.upstreams.heard()
        return Status(self.rules.version, self.clock(), answered, failed)

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
                         feeds: Feeds | None = None, process: str = "main",
                         listeners: Sequence[Listener] | None = None
                         ) -> AsyncIterator[RunningServer]:
    """Serve until the context exits; yields the bound addresses (port 0 resolved).

    reuse_port: bind with SO_REUSEPORT so several worker processes share the ports.
    serve_metrics: start the HTTP endpoint here (a worker leaves it to its supervisor).
    overrides: the command-line flags, which a reload applies over the config file again.
    wall: the wall clock, for when rules were installed.
    worker: in a worker process, the rule set it was forked with (and when that was
    installed); its supervisor reloads and sends it new sets, so it neither watches files
    nor reloads itself.
    feeds: the URL sources the rules were loaded with (reload.load_at_start), refreshed here.
    process: the `process` label of this process' resolver_process_* metrics.
    listeners: sockets bound already (a worker's, by its supervisor); else they are bound
    here, and then privileges are dropped to server.user (privileges.py), before any is read.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry, process)
    outbox = Outbox()
    clock = clock or time.monotonic
    upstreams = UpstreamPool(config.upstream, metrics, outbox=outbox, clock=clock)
    loop = asyncio.get_running_loop()
    chain = build_pipeline(config, rules, metrics, upstreams, clock, loop.call_later, wall)
    limits = TcpLimits(config.server.tcp_idle_timeout, config.server.tcp_max_connections,
                       config.server.tcp_max_connections_per_client,
                       config.server.tcp_max_pipelined, chain.front)
    closers: list[Callable[[], None]] = []
    endpoint = None
    watching = refreshing = None
    try:
        await upstreams.open()  # in here: a failure part-way still closes what it opened
        if listeners is None:
            listeners = bind_listeners(config.server.listen, reuse_port)
            closers += [listener.close for listener in listeners]
            privileges.drop(config.server.user, config.server.group, owned(config))
        addresses = [await _serve(listener, chain, outbox, limits, closers)
                     for listener in listeners]
        reloads = None if worker is not None else Reloads(config, overrides, rules,
                                                          metrics.reloads, wall, feeds)
        current = worker if reloads is None else reloads.current
        assert current is not None
        server = RunningServer(addresses, chain, metrics, None, config, current, reloads,
                               upstreams, clock)
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
                                _reload_from(server, loop) if reloads is not None else None,
                                _probe_from(server, loop), Networks(config.metrics.allow))
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
        if chain.querylog is not None:
            chain.querylog.close()
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


def _probe_from(server: RunningServer, loop: asyncio.AbstractEventLoop) -> Probe:
    """What the HTTP thread calls for /healthz and /readyz: the event loop runs a callback
    that reads the server's status, and the request waits LOOP_DEADLINE for it."""

    def probe() -> Probed:
        answer: concurrent.futures.Future[Status] = concurrent.futures.Future()

        def report() -> None:
            try:
                answer.set_result(server.status())
            except Exception as exc:  # a bug: the check fails saying so, not by timing out
                answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(report)
            return [("main", answer.result(LOOP_DEADLINE))]
        except (TimeoutError, RuntimeError):  # no answer in time, or the loop is closed
            return [("main", None)]

    return probe


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


@dataclass(frozen=True)
class Listener:
    """One listen address's TCP and UDP sockets, bound (on the same port) but not yet read."""

    tcp: socket.socket
    udp: socket.socket

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.tcp.getsockname()[:2]
        return host, port

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


def owned(config: Config) -> tuple[str | None, ...]:
    """What the server made before dropping privileges and goes on writing as the user: the
    state directory (URL sources' copies) and the query log's file (stdout and stderr are
    not files of ours)."""
    log_path = config.query_log.path
    return (config.blocking.state_dir,
            None if log_path in (STDOUT, STDERR) else log_path)


def bind_listeners(listen: Sequence[Address], reuse_port: bool) -> list[Listener]:
    """Bind TCP, then UDP on the port TCP got, for every address; nothing is read from them
    yet, so privileges can be dropped before any query is (privileges.py). Port 0 retries
    when the TCP port's UDP twin is taken. On failure, what was bound is closed."""
    bound: list[Listener] = []
    try:
        for address in listen:
            bound.append(_bind_one(address, reuse_port))
    except OSError:
        for listener in bound:
            listener.close()
        raise
    return bound


def _bind_one(address: Address, reuse_port: bool) -> Listener:
    for attempt in range(BIND_ATTEMPTS):
        tcp = bound_socket(address.host, address.port, socket.SOCK_STREAM, reuse_port)
        port = tcp.getsockname()[1]
        try:
            udp = bound_socket(address.host, port, socket.SOCK_DGRAM, reuse_port)
        except OSError:
            tcp.close()
            if address.port != 0 or attempt == BIND_ATTEMPTS - 1:
                raise
            continue
        return Listener(tcp, udp)
    raise AssertionError("unreachable")


async def _serve(listener: Listener, chain: Chain, outbox: Outbox, limits: TcpLimits,
                 closers: list[Callable[[], None]]) -> tuple[str, int]:
    """Serve TCP and UDP on a listener's sockets; return the (host, port) they are bound to."""
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(lambda: TcpConnection(chain.pipeline, limits),
                                   sock=listener.tcp)
    closers.append(tcp.close)
    udp, _ = await loop.create_datagram_endpoint(lambda: UdpServer(chain.front, outbox),
                                                 sock=listener.udp)
    closers.append(udp.close)
    _grow_receive_buffer(udp.get_extra_info("socket"))
    return listener.address


async def serve_until_signalled(config: Config, rules: RuleSet,
                                on_ready: Callable[[RunningServer], None],
                                reuse_port: bool = False, serve_metrics: bool = True, *,
                                overrides: Overrides = Overrides(),
                                worker: Install | None = None,
                                watcher: Watcher | None = None,
                                feeds: Feeds | None = None, process: str = "main",
                                listeners: Sequence[Listener] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the rules (keeping them on error), but
    in a worker, whose supervisor reloads and sends it the new set (see running_server)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = running_server(config, rules, reuse_port=reuse_port,
                             serve_metrics=serve_metrics, overrides=overrides,
                             worker=worker, watcher=watcher, feeds=feeds,
                             process=process, listeners=listeners)
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
