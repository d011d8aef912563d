"""Whole UDP answers kept by the bytes of the query after its ID (a packet cache).

Most DNS traffic is the same few questions asked the same way. For those, decoding the
question, walking the rules and rendering the answer are all repeats of work already done, so
an answer a synchronous stage produced is remembered under the query's bytes after its two-byte
ID (flags, question, EDNS record: everything that shaped the answer), and the next identical
query is answered with its own ID and the remembered rest, before any decoding. PowerDNS
Recursor's packet cache works this way, and caches policy answers too.

What keeps it correct:
- only a stage that knows how long its answer holds offers it (`Stage.memo`): a blocked answer
  until the rules change (the cache is cleared on every rule install), a cache hit until the
  next whole second, when its TTLs count down, and never past the cache's prefetch window;
- each remembered answer carries the counters it must bump, so a hit here counts exactly as
  the full path would have;
- UDP only (TCP answers are not truncated, so they could differ), and bounded: the oldest
  entry goes first when `cache.packet_entries` is reached, and a query or answer longer
  than the usual shapes (MAX_QUERY, MAX_ANSWER) is not kept, so an entry is at most a couple
  of kilobytes whatever a client sends (padding, junk after the records, a 64 KiB buffer).
"""

from __future__ import annotations

from collections import OrderedDict

from resolver.message.constants import NEVER, Clock
from resolver.ops.metrics import Tally
from resolver.message.query import Memo


MAX_QUERY = 512  # bytes: a longest name with EDNS and a cookie fits in well under this
MAX_ANSWER = 1232  # bytes: the EDNS size that avoids fragmentation (larger answers are rare)


class PacketCache:
    """Answers by query bytes (ID excluded), oldest out first."""

    def __init__(self, max_entries: int, clock: Clock, queries: Tally):
        self._entries: OrderedDict[bytes, tuple] = OrderedDict()
        self._max = max_entries
        self._clock = clock
        self._queries = queries.counts

    def __len__(self) -> int:
        return len(self._entries)

    def answer(self, data: bytes) -> bytes | None:
        """The remembered answer for this query with its ID, counted; None on a miss."""
        found = self._entries.get(data[2:])
        if found is None:
            return None
        tail, until, outcome, tally, key = found
        if until != NEVER and self._clock() >= until:  # blocked answers need no clock
            return None
        counts = self._queries
        counts[outcome] = counts.get(outcome, 0) + 1
        counts = tally.counts
        counts[key] = counts.get(key, 0) + 1
        return data[:2] + tail

    def remember(self, data: bytes, answer: bytes, outcome: str, memo: Memo) -> None:
        """Keep an answer a stage said holds until memo's time."""
        if self._max <= 0 or len(data) > MAX_QUERY or len(answer) > MAX_ANSWER:
            return
        until, tally, key = memo
        entries = self._entries
        entries[data[2:]] = (answer[2:], until, ("udp", outcome), tally, key)
        if len(entries) > self._max:
            entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (the rules changed)."""
        self._entries.clear()
