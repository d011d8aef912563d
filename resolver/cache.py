"""The answer cache: upstream replies kept as wire bytes, bounded, least recently used out first.

A hit is answered synchronously, in the datagram callback, by `reply.render`: a copy with the
client's ID and question and TTLs counted down. Time comes from an injected clock so tests can
step it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .metrics import Metrics
from .query import Outcome, Query
from .reply import Reply, render

Clock = Callable[[], float]


class Cache:
    """Replies by question key, each with the time it was stored."""

    def __init__(self, max_entries: int, metrics: Metrics, clock: Clock = time.monotonic):
        self._entries: OrderedDict[tuple, tuple[Reply, float]] = OrderedDict()
        self._max = max_entries
        self._metrics = metrics
        self.clock = clock
        metrics.gauge("cache_entries", "Answers held in the cache.", (),
                      lambda: {(): len(self._entries)})

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> tuple[Reply, int] | None:
        """The live reply for key and its age in whole seconds, or None."""
        found = self._entries.get(key)
        if found is None:
            return None
        reply, stored = found
        age = int(self.clock() - stored)
        if age >= reply.ttl:
            del self._entries[key]
            self._metrics.cache.inc(("expired",))
            return None
        self._entries.move_to_end(key)
        return reply, age

    def put(self, key: tuple, reply: Reply) -> None:
        """Keep a reply that may be cached; evict the least recently used beyond the bound."""
        if not reply.ttl or self._max <= 0:
            return
        entries = self._entries
        entries[key] = (reply, self.clock())
        entries.move_to_end(key)
        self._metrics.cache.inc(("stored",))
        if len(entries) > self._max:
            entries.popitem(last=False)
            self._metrics.cache.inc(("evicted",))


class CacheLookup:
    """Pipeline stage: answer from the cache when a live reply is there."""

    outcome = Outcome.CACHED.value

    def __init__(self, cache: Cache, metrics: Metrics):
        self._cache = cache
        self._metrics = metrics

    def answer(self, q: Query) -> bytes | None:
        hit = self._cache.get(q.cache_key)
        if hit is None:
            self._metrics.cache.inc(("miss",))
            return None
        self._metrics.cache.inc(("hit",))
        return render(q, hit[0], hit[1])
