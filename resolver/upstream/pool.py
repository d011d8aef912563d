"""The upstream pool: the configured upstreams and which of them a question goes to.

The pool builds one `attempts.Upstream` per configured server, with its I/O: UDP sockets
(upstream/udp.py) with TCP after truncation, or DNS over TLS (upstream/stream.py), and its
health. For each question it picks the upstreams (a conditional-forwarding domain's, or the
default servers) and orders them by the strategy and their health (upstream/selection.py);
an `attempts.Exchange` then walks that order.
"""

from __future__ import annotations

import asyncio
import random
import time

from resolver.message.constants import Clock
from resolver.message.names import to_wire
from resolver.message.query import Query
from resolver.ops.config import UpstreamConfig, UpstreamServer
from resolver.ops.metrics import Metrics
from resolver.server.outbox import Outbox
from resolver.upstream.attempts import ERROR_KINDS, Exchange, Upstream
from resolver.upstream.dot import DotClient, tls_context
from resolver.upstream.selection import Backoff, Health, arrange
from resolver.upstream.stream import Streams
from resolver.upstream.udp import UdpSockets


class UpstreamError(Exception):
    """No upstream gave a usable answer in time."""


def address_label(server: UpstreamServer) -> str:
    """The `upstream` metric label: the address as written in config, [v6]:port."""
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{host}:{server.port}"


class _Awaited(Exchange):
    """An exchange whose result a coroutine awaits (UpstreamPool.query)."""

    def __init__(self, q: Query, pool: UpstreamPool):
        super().__init__(q, pool)
        self.result: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

    def done(self, data: bytes | None) -> None:
        if not self.result.done():
            self.result.set_result(data)


class UpstreamPool:
    """The configured upstreams: the default group and the conditional-forwarding groups
    (an attempts.Plan)."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics,
                 rng: random.Random | None = None, outbox: Outbox | None = None,
                 clock: Clock = time.monotonic):
        self._config = config
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._outbox = outbox or Outbox()
        self._clock = clock
        self.deadline = config.deadline
        self._connections = metrics.counter(
            "upstream_tls_connections_total",
            "TLS connections opened to DNS-over-TLS upstreams (each is a handshake; reused "
            "connections keep this low).", ("upstream",))
        self._drivers: list[UdpSockets | Streams] = []
        self._by_server: dict[UpstreamServer, Upstream] = {}
        self._default = self._group(config.servers)
        # One dict lookup per label of the query name, most specific first, as in rules.
        self._routes = {to_wire(domain): self._group(forward.servers)
                        for forward in config.conditional for domain in forward.domains}
        self.upstreams = list(self._by_server.values())
        # The usual setup, one upstream and no conditional forwarding: every query's order,
        # shared (exchanges only read it).
        self._alone = self._default if len(self._default) == 1 and not self._routes else None
        # Each worker process keeps its own health; across workers the highest value is
        # shown: the slowest worker's RTT, and healthy unless every worker backed it off.
        metrics.gauge("upstream_rtt_seconds",
                      "Smoothed round-trip time of each upstream (EWMA; failures count as "
                      "their timeout).", ("upstream",), self._rtts, merge="max")
        metrics.gauge("upstream_healthy",
                      "1 while an upstream is healthy, 0 while it is backed off after "
                      "consecutive failures.", ("upstream",), self._health, merge="max")

    def _group(self, servers: tuple[UpstreamServer, ...]) -> list[Upstream]:
        """The Upstreams for these servers; one object per server however many groups name
        it, so its sockets, connection and health are shared."""
        group = []
        for server in servers:
            upstream = self._by_server.get(server)
            if upstream is None:
                upstream = self._by_server[server] = self._upstream(server)
            group.append(upstream)
        return group

    def _upstream(self, server: UpstreamServer) -> Upstream:
        """One server with its health and I/O, every series it can count at 0 from the start."""
        config, metrics = self._config, self._metrics
        name = address_label(server)
        timeout = server.timeout or config.timeout
        health = Health(Backoff(config.unhealthy_after, config.backoff, config.max_backoff),
                        timeout)
        counts = metrics.upstream_queries.counts
        tls = None
        udp = None
        if server.protocol == "tls":
            assert server.tls_name is not None  # the config requires it with tls
            tls = DotClient(server.host, server.port, server.tls_name,
                            tls_context(server.ca_file), timeout, config.tls_idle_timeout,
                            lambda: self._connections.inc((name,)))
            keys = [(name, "tls")]
            self._connections.expect([(name,)])
        else:
            udp = UdpSockets(server.host, server.port, config.udp_size, self._clock,
                             self._outbox, timeout + 1.0, counts, (name, "udp"),
                             (metrics.upstream_errors.counts, (name, "mismatch")))
            self._drivers.append(udp)
            keys = [(name, "udp"), (name, "tcp")]
        streams = Streams(server.host, server.port, config.udp_size, self._clock, tls, counts,
                          keys[-1])
        self._drivers.append(streams)
        metrics.upstream_queries.expect(keys)
        kinds = (*ERROR_KINDS, "tls") if tls is not None else ERROR_KINDS
        metrics.upstream_errors.expect((name, kind) for kind in kinds)
        return Upstream(name, timeout, health, udp, streams,
                        metrics.upstream_durations.row((name,)))

    def _rtts(self) -> dict[tuple[str, ...], float]:
        return {(u.name,): u.health.srtt for u in self.upstreams if u.health.srtt is not None}

    def _health(self) -> dict[tuple[str, ...], float]:
        return {(u.name,): float(u.health.healthy) for u in self.upstreams}

    def heard(self) -> tuple[float | None, float | None]:
        """When any upstream last replied, and when an attempt last failed (this pool's
        clock; None: never), for the readiness check (resolver/ops/health.py)."""
        answered = [u.health.answered for u in self.upstreams if u.health.answered is not None]
        failed = [u.health.failed for u in self.upstreams if u.health.failed is not None]
        return max(answered, default=None), max(failed, default=None)

    async def open(self) -> None:
        """The UDP sockets; a TLS connection is opened by the first query that needs it."""
        for driver in self._drivers:
            if isinstance(driver, UdpSockets):
                await driver.open()

    def close(self) -> None:
        for driver in self._drivers:
            driver.close()

    def group_for(self, q: Query) -> list[Upstream]:
        """The upstreams for q's name: the most specific conditional domain at or above it,
        else the default servers."""
        routes = self._routes
        if routes:
            name = q.name
            for offset in q.offsets:
                group = routes.get(name[offset:])
                if group is not None:
                    return group
        return self._default

    def order(self, q: Query, now: float) -> list[Upstream]:
        """The upstreams to try for q, in the strategy's order (see selection.arrange)."""
        alone = self._alone
        if alone is not None:  # one upstream for every name: nothing to choose
            if alone[0].health.failures:
                alone[0].health.ready(now)  # a probe after a backoff still counts
            return alone
        group = self.group_for(q) if self._routes else self._default
        return arrange(self._config.strategy, group, now, self._rng)

    def count_error(self, upstream: Upstream, kind: str) -> None:
        self._metrics.upstream_errors.inc((upstream.name, kind))

    async def query(self, q: Query) -> bytes:
        """A usable reply for q, or UpstreamError: an exchange awaited, for tools and tests."""
        exchange = _Awaited(q, self)
        exchange.start(self._clock())
        try:
            data = await exchange.result
        finally:
            exchange.cancel()
        if data is None:
            raise UpstreamError(f"no usable answer within {self._config.deadline:g}s")
        return data
