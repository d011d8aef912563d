"""The last stage: ask upstream, once per distinct question in flight, cache the reply, and
answer each waiting client: from the reply, blocked (CNAME cloaking), or stale (RFC 8767).

Each distinct question in flight is one fetch task, kept in `_inflight` by cache key; every
client with that question awaits the same task, so an expiring popular name costs the
upstream one query, not a stampede. Clients await through asyncio.shield, so a client that
gives up (a stale answer sent after stale_client_timeout, a shutdown) never cancels the fetch
the others, and the cache, are waiting for. A prefetch is such a fetch with nobody waiting.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct

from . import wire
from .blocking import Blocker
from .cache import Cache
from .config import CacheConfig
from .metrics import Metrics
from .query import Outcome, Query
from .reply import Reply, TtlPolicy, failure, render, render_stale, scan_reply
from .upstream import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)


class Forwarder:
    """Resolves a query through the upstream pool, coalescing identical questions."""

    def __init__(self, upstreams: UpstreamPool, cache: Cache, policy: TtlPolicy,
                 blocker: Blocker, config: CacheConfig, metrics: Metrics, max_inflight: int):
        self._upstreams = upstreams
        self._cache = cache
        self._policy = policy
        self._blocker = blocker
        self._stale_ttl = config.stale_ttl
        self._stale_timeout = config.stale_client_timeout
        self._tally = metrics.cache
        self._max_inflight = max_inflight
        self._inflight: dict[tuple, asyncio.Task] = {}

    async def resolve(self, q: Query) -> tuple[bytes, Outcome]:
        """The answer for q and how it was made; raises UpstreamError when no upstream gave one
        and there is no stale answer to fall back on."""
        key = q.cache_key
        fetch = self._inflight.get(key)
        if fetch is None:
            fetch = self._start(q)
        stale = self._cache.stale(key)
        try:
            if stale is None:
                reply = await asyncio.shield(fetch)
            else:  # RFC 8767 client response timer: do not keep the client past it
                reply = await asyncio.wait_for(asyncio.shield(fetch), self._stale_timeout)
        except (UpstreamError, TimeoutError):
            if stale is None:
                raise
            return self._stale(q, stale.reply), Outcome.STALE
        if stale is not None and reply.rcode == wire.SERVFAIL:
            return self._stale(q, stale.reply), Outcome.STALE
        if reply.cnames:
            cloak = self._blocker.check_chain(reply.cnames)
            if cloak is not None:
                return self._blocker.answer_chain(q, cloak), Outcome.BLOCKED
        return render(q, reply, 0), Outcome.FORWARDED

    def prefetch(self, q: Query) -> None:
        """Refresh q's cached answer in the background (a popular answer about to expire),
        unless a fetch for it is already in flight or too many are."""
        if q.cache_key in self._inflight or len(self._inflight) >= self._max_inflight:
            return
        self._start(q)
        self._tally.inc(("prefetch",))

    async def drain(self) -> None:
        """Cancel the fetches still in flight (at shutdown)."""
        fetches = list(self._inflight.values())
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)

    def _start(self, q: Query) -> asyncio.Task:
        key = q.cache_key
        fetch = asyncio.get_running_loop().create_task(self._fetch(q))
        self._inflight[key] = fetch
        fetch.add_done_callback(functools.partial(self._finished, key))
        return fetch

    def _finished(self, key: tuple, fetch: asyncio.Task) -> None:
        if self._inflight.get(key) is fetch:
            del self._inflight[key]
        if not fetch.cancelled() and fetch.exception() is not None:  # retrieved: not logged
            log.debug("upstream failed: %s", fetch.exception())

    async def _fetch(self, q: Query) -> Reply:
        """Ask upstream, and cache what came back: the answer, or the failure."""
        key = q.cache_key
        try:
            data = await self._upstreams.query(q)
            try:
                reply = scan_reply(data, 12 + len(q.question), self._policy)
            except (ValueError, IndexError, struct.error) as exc:
                raise UpstreamError(f"malformed reply: {exc}") from exc
        except UpstreamError:
            self._cache.failed(key, failure(self._policy))
            raise
        if reply.rcode == wire.SERVFAIL:
            self._cache.failed(key, reply)
        else:
            self._cache.put(key, reply)
        return reply

    def _stale(self, q: Query, reply: Reply) -> bytes:
        self._tally.inc(("stale",))
        return render_stale(q, reply, self._stale_ttl)
