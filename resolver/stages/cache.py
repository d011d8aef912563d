"""The answer cache and the stage that answers from it.

Replies are kept as wire bytes (see message/reply.py), bounded in entries and in bytes, least
recently used out first. A hit is answered synchronously, in the datagram callback, by
`reply.render`: a copy with the client's ID and question and TTLs counted down.

Everything that makes a hit more than a copy happens near the end of an entry's life or not
at all, so it hides behind one comparison with `Entry.check_at`: the prefetch of a popular
answer about to expire (stages/prefetch.py), expiry itself (an expired answer is kept
`stale_window` seconds for serve-stale, stages/stale.py, but never served as a hit), and an
answer whose CNAME chain leads into a blocked domain (stages/cname.py). Time comes from the
injected clock so tests can step it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from resolver.message.constants import ALWAYS, SERVFAIL, Clock
from resolver.message.query import CacheKey, Outcome, Query
from resolver.message.reply import Reply, render
from resolver.ops.config import CacheConfig
from resolver.ops.metrics import Metrics
from resolver.stages.contract import FORWARD, PASS, Answered, Result

if TYPE_CHECKING:
    from resolver.stages.cname import Cloak
    from resolver.stages.prefetch import Prefetch

Inspect = Callable[[tuple[bytes, ...]], "Cloak | None"]  # CNAME targets -> the block, if any

# What an entry costs beyond its answer bytes: key, Entry, Reply, TTL table and dict node.
# bench/memory.py measured the process growing about 1,086 bytes per one-record answer on
# CPython 3.11 (tracemalloc sees ~680 of them), so max_bytes bounds real memory.
ENTRY_OVERHEAD = 1050
_HIT, _MISS, _EXPIRED = ("hit",), ("miss",), ("expired",)  # results
_STORED, _EVICTED = ("stored",), ("evicted",)


class Entry:
    """One cached reply and its timers, in the clock's seconds.

    expires: stored + reply.ttl; a hit needs now < expires.
    check_at: when a hit must look closer: the start of the prefetch window, `expires` when
        there is none, ALWAYS when the CNAME chain is blocked.
    hits: hits so far, to tell a popular answer worth a prefetch.
    prefetched: a refresh was started (one per stored reply at most).
    cloak: the block the answer's CNAME chain leads into, or None.
    failed_until: after a failed refresh of the expired answer, until when it is answered
        stale straight from the cache (RFC 8767 failure recheck).
    size: what it counts against cache.max_bytes.
    """

    __slots__ = ("reply", "stored", "expires", "check_at", "hits", "prefetched", "cloak",
                 "failed_until", "size")

    def __init__(self, reply: Reply, stored: float, cloak: Cloak | None, window: float):
        """window: the prefetch window's share of the TTL (0: none)."""
        self.reply, self.stored = reply, stored
        ttl = reply.ttl
        assert ttl is not None  # Cache.put keeps only replies with a lifetime
        self.expires = stored + ttl
        self.hits, self.prefetched, self.failed_until = 0, False, ALWAYS
        self.size = len(reply.body) + ENTRY_OVERHEAD
        self.judge(cloak, window)

    def judge(self, cloak: Cloak | None, window: float) -> None:
        """Record the verdict on the CNAME chain (again after a rule change) and when a hit
        must look closer because of it or of the prefetch window."""
        self.cloak = cloak
        if cloak is not None:
            self.check_at = ALWAYS
        elif window and self.reply.rcode != SERVFAIL:
            ttl = self.reply.ttl
            assert ttl is not None  # as in __init__
            self.check_at = self.expires - ttl * window
        else:
            self.check_at = self.expires


class Cache:
    """Replies by question key, least recently used first.

    inspect: judges an answer's CNAME targets against the live rules (cname.CnameCheck
    .verdict); `recheck` runs it again over the cache when the rules change.
    stale_window: seconds an expired entry is kept for serve-stale (0: none).
    """

    def __init__(self, config: CacheConfig, metrics: Metrics, clock: Clock = time.monotonic,
                 inspect: Inspect = lambda targets: None):
        self.entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self.bytes = 0
        self.clock = clock
        self._max_entries, self._max_bytes = config.max_entries, config.max_bytes
        self._window = config.prefetch_window if config.prefetch else 0.0
        self.stale_window = config.stale_window if config.serve_stale else 0
        self._inspect = inspect
        self._tally = metrics.cache
        self._counts = metrics.cache.counts  # counted inline on the hot path: no call
        metrics.cache.expect((_HIT, _MISS, _EXPIRED, _STORED, _EVICTED))
        metrics.gauge("cache_entries", "Answers held in the cache.", (),
                      lambda: {(): len(self.entries)})
        metrics.gauge("cache_bytes", "Bytes counted against cache.max_bytes.", (),
                      lambda: {(): self.bytes})

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, key: CacheKey, reply: Reply) -> None:
        """Keep a reply that may be cached; evict the least recently used beyond the bounds.
        One that may not be (TTL 0, NODATA without an SOA) still replaces what was kept for
        key: the older answer must not be served stale after the upstream said otherwise."""
        if not reply.ttl or self._max_entries <= 0:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old.size
            return
        entry = Entry(reply, self.clock(), self._inspect(reply.cnames) if reply.cnames else None,
                      self._window)
        size = entry.size
        if size > self._max_bytes:
            return
        entries = self.entries
        old = entries.pop(key, None)
        if old is not None:
            size -= old.size
        entries[key] = entry
        self.bytes += size
        counts = self._counts
        counts[_STORED] = counts.get(_STORED, 0) + 1
        if len(entries) > self._max_entries or self.bytes > self._max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entries until the cache is within its bounds."""
        entries = self.entries
        while len(entries) > self._max_entries or self.bytes > self._max_bytes:
            self.bytes -= entries.popitem(last=False)[1].size
            self._tally.inc(_EVICTED)

    def fresh(self, key: CacheKey) -> Entry | None:
        """The entry for key if it has not expired (no LRU update: for the slower stages)."""
        entry = self.entries.get(key)
        return entry if entry is not None and self.clock() < entry.expires else None

    def expired(self, key: CacheKey, entry: Entry, now: float) -> None:
        """A lookup found entry expired: drop it unless it is kept for serve-stale."""
        self._tally.inc(_EXPIRED)
        if now >= entry.expires + self.stale_window:
            del self.entries[key]
            self.bytes -= entry.size

    def recheck(self) -> None:
        """Check every cached CNAME chain again: the rules changed (a reload)."""
        for entry in self.entries.values():
            if entry.reply.cnames:
                entry.judge(self._inspect(entry.reply.cnames), self._window)


class CacheLookup:
    """Stage: answer from the cache when a live reply is there."""

    def __init__(self, cache: Cache, metrics: Metrics, prefetch: Prefetch):
        self._cache = cache
        self._entries = cache.entries
        self._clock = cache.clock
        self._tally = metrics.cache
        self._counts = metrics.cache.counts  # counted inline on the hot path: no call
        self._prefetch = prefetch

    def answer(self, q: Query) -> Result:
        key = q.cache_key
        entry = self._entries.get(key)
        if entry is None:  # nothing, not even a stale or CNAME-blocked entry: go upstream
            counts = self._counts
            counts[_MISS] = counts.get(_MISS, 0) + 1
            return FORWARD
        now = self._clock()
        if now >= entry.check_at:
            return self._closer_look(q, key, entry, now)
        entry.hits += 1
        self._entries.move_to_end(key)
        counts = self._counts
        counts[_HIT] = counts.get(_HIT, 0) + 1
        age = int(now - entry.stored)
        # The same bytes hold until the TTLs tick down, and never into the prefetch window.
        return Answered(render(q, entry.reply, age), Outcome.CACHED,
                        (min(entry.stored + age + 1, entry.check_at), self._tally, _HIT))

    def _closer_look(self, q: Query, key: CacheKey, entry: Entry, now: float) -> Result:
        """Expired (a miss), CNAME chain blocked (left to cname.CnameBlocker), or a hit in
        the prefetch window (which may refresh a popular answer). Never replayed."""
        if now >= entry.expires:
            self._cache.expired(key, entry, now)
            self._tally.inc(_MISS)
            return PASS
        if entry.cloak is not None:
            return PASS
        entry.hits += 1
        self._prefetch.consider(q, entry)
        self._entries.move_to_end(key)
        self._tally.inc(_HIT)
        return Answered(render(q, entry.reply, int(now - entry.stored)), Outcome.CACHED)
