"""Serve-stale (RFC 8767): when the upstreams fail to refresh an expired answer, the expired
answer is served, with a short TTL and an Extended DNS Error saying so, rather than SERVFAIL.

Every decision about it lives here:
- which cached answers may be served stale (`fallback`): expired less than `stale_window`
  ago, an answer rather than a cached failure, its CNAME chain not blocked. The cache keeps
  expired entries that long for it;
- the client response timer (`client_timeout`): a client waiting on a refresh gets the stale
  answer once it has waited that long, while the refresh goes on (the forwarder arms it);
- the failure recheck: after a refresh failed, the stale answer is served straight from the
  cache (this stage) for `servfail_ttl` seconds before upstream is tried again (`failed`);
- the answer itself (`serve`), counted as cache result `stale` and outcome `stale`.
"""

from __future__ import annotations

from resolver.message.constants import SERVFAIL
from resolver.message.query import CacheKey, Outcome, Query
from resolver.message.reply import Reply, render_stale
from resolver.ops.config import CacheConfig
from resolver.ops.metrics import Metrics
from resolver.stages.cache import Cache, Entry
from resolver.stages.contract import PASS, Answered, Result

_STALE = ("stale",)  # the cache_total result a stale answer counts


class ServeStale:
    """The serve-stale policy over one cache, and the stage that answers in the recheck
    window. With serve_stale off the cache keeps no expired entry, so nothing is ever
    served stale and a failed refresh is cached as a failure."""

    def __init__(self, cache: Cache, config: CacheConfig, metrics: Metrics):
        self._cache = cache
        self._ttl = config.stale_ttl
        self._tally = metrics.cache
        self._tally.expect([_STALE])
        self.client_timeout = config.stale_client_timeout

    def answer(self, q: Query) -> Result:
        """Stage: while the refresh of an expired answer keeps failing, answer with it at once
        instead of making every client wait for upstreams that are down. Never replayed:
        it holds for a failure's duration."""
        entry = self.fallback(q.cache_key)
        if entry is None or self._cache.clock() >= entry.failed_until:
            return PASS
        return self.serve(q, entry)

    def fallback(self, key: CacheKey) -> Entry | None:
        """The expired entry for key if it may still be served stale."""
        entry = self._cache.entries.get(key)
        if entry is None or entry.cloak is not None or entry.reply.rcode == SERVFAIL:
            return None
        now = self._cache.clock()
        return entry if entry.expires <= now < entry.expires + self._cache.stale_window else None

    def serve(self, q: Query, entry: Entry) -> Answered:
        self._tally.inc(_STALE)
        return Answered(render_stale(q, entry.reply, self._ttl), Outcome.STALE)

    def failed(self, key: CacheKey, failure: Reply) -> None:
        """Upstreams failed for key. A fresh answer stays as it is (a failed prefetch); an
        answer that may be served stale is marked to be, straight from the cache, for the next
        failure.ttl seconds (the failure recheck); otherwise the failure itself is cached
        (RFC 9520), so the next clients do not wait on the same dead upstreams."""
        cache = self._cache
        entry = cache.entries.get(key)
        if entry is not None and entry.reply.rcode != SERVFAIL:
            now = cache.clock()
            if now < entry.expires:
                return
            if self.fallback(key) is entry:
                entry.failed_until = now + (failure.ttl or 0)
                return
        cache.put(key, failure)
