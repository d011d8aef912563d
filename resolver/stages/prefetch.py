"""Prefetch: a popular cached answer hit in the last part of its TTL is refreshed in the
background, so its next clients do not wait for upstream when it expires (as Unbound's
prefetch does).

The cache marks where that window starts on each entry (`Entry.check_at`, from
`cache.prefetch_window`), so an ordinary hit pays one comparison; a hit inside the window
comes here, and the first one that finds the entry popular enough starts one refresh.
"""

from __future__ import annotations

from collections.abc import Callable

from resolver.message.query import Query
from resolver.ops.config import CacheConfig
from resolver.ops.metrics import Metrics
from resolver.stages.cache import Entry

_PREFETCH = ("prefetch",)  # the cache_total result a refresh counts


class Prefetch:
    """Decides when a hit refreshes its answer; `refresh` starts it (Forwarder.refresh)."""

    def __init__(self, config: CacheConfig, metrics: Metrics, refresh: Callable[[Query], bool]):
        self._min_hits = config.prefetch_min_hits
        self._refresh = refresh
        self._tally = metrics.cache
        self._tally.expect([_PREFETCH])

    def consider(self, q: Query, entry: Entry) -> None:
        """A hit in entry's prefetch window: refresh it once, if it is popular enough."""
        if entry.hits >= self._min_hits and not entry.prefetched:
            entry.prefetched = True
            if self._refresh(q):
                self._tally.inc(_PREFETCH)
