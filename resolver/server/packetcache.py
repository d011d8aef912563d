"""The packet cache: a layer around the pipeline that replays whole UDP answers by the bytes
of the query after its ID.

Most DNS traffic is the same few questions asked the same way. For those, decoding the
question, walking the rules and rendering the answer are all repeats of work already done, so
an answer the pipeline made is remembered under the query's bytes after its two-byte ID
(flags, question, EDNS record: everything that shaped the answer), and the next identical
query is answered with its own ID and the remembered rest, before any decoding. PowerDNS
Recursor's packet cache works this way, and caches policy answers too.

What keeps it correct:
- only an answer that says how long it holds (`contract.Replay`) is remembered: a blocked
  answer until the rules change (the cache is cleared on every rule install), a cache hit
  until the next whole second, when its TTLs count down, and never past the cache's prefetch
  window; an answer that holds for one client only carries none (see stages/contract.py);
- each remembered answer carries the counters it must bump (its queries_total and duration
  row included), so a hit here counts exactly as the full path would have;
- UDP only (TCP answers are not truncated, so they could differ), and bounded: the oldest
  entry goes first when `cache.packet_entries` is reached, and a query or answer longer
  than the usual shapes (MAX_QUERY, MAX_ANSWER) is not kept, so an entry is at most a couple
  of kilobytes whatever a client sends (padding, junk after the records, a 64 KiB buffer).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from resolver.message import wire
from resolver.message.constants import NEVER, Clock
from resolver.ops.metrics import UNTIMED, Queries, Row, Tally, observe
from resolver.server.pipeline import TIME_EVERY, offer
from resolver.stages.contract import Answered, Drop, Later, QueryObserver, Replay, Sink

MAX_QUERY = 512  # bytes: a longest name with EDNS and a cookie fits in well under this
MAX_ANSWER = 1232  # bytes: the EDNS size that avoids fragmentation (larger answers are rare)

_Kept = tuple[bytes, float, str, Row, Tally, tuple[str, ...]]  # answer after its ID, until
# when, the outcome, its queries_total row, and the counter and key the replay bumps


class Handler(Protocol):
    """What the packet cache wraps (server.pipeline.Pipeline)."""

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink, started: float
               ) -> Answered | Later | Drop: ...


class PacketCache:
    """Answers by query bytes (ID excluded), oldest out first, in front of a Handler."""

    def __init__(self, inner: Handler, max_entries: int, clock: Clock, queries: Queries,
                 observer: QueryObserver | None = None):
        self._inner = inner.handle
        self._entries: OrderedDict[bytes, _Kept] = OrderedDict()
        self._max = max_entries
        self._clock = clock
        self._queries = queries
        self._observer = observer
        self._every = 1 if observer is not None else TIME_EVERY  # pipeline.TIME_EVERY
        self._left = self._every  # queries until the next timed one

    def __len__(self) -> int:
        return len(self._entries)

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink) -> bytes | None:
        """The answer to send now, replayed or from the pipeline; None when there is none
        (dropped, or coming later through sink.deliver)."""
        self._left -= 1
        if self._left:
            started = UNTIMED
        else:
            self._left = self._every
            started = self._clock()
        found = self._entries.get(data[2:])
        if found is not None:
            tail, until, outcome, row, tally, key = found
            if until == NEVER or self._clock() < until:  # blocked answers need no clock
                counts = tally.counts
                counts[key] = counts.get(key, 0) + 1
                answer = data[:2] + tail
                if started < 0:  # Queries.record written out, its row kept with the answer
                    row[-2] += 1
                else:
                    self._timed(data, client, outcome, answer, row, started)
                return answer
        result = self._inner(data, client, sink, started)
        if not isinstance(result, Answered):
            return None
        answer, replay = result.data, result.replay
        if (replay is not None and self._max > 0 and len(data) <= MAX_QUERY
                and len(answer) <= MAX_ANSWER):
            self._remember(data, answer, result.outcome, replay)
        return answer

    def _remember(self, data: bytes, answer: bytes, outcome: str, replay: Replay) -> None:
        until, tally, key = replay
        end = wire.skip_name(data, 12)  # the pipeline decoded this question: it is whole
        row = self._queries.row("udp", outcome, (data[end] << 8) | data[end + 1], answer)
        entries = self._entries
        entries[data[2:]] = (answer[2:], until, outcome, row, tally, key)
        if len(entries) > self._max:
            entries.popitem(last=False)

    def _timed(self, data: bytes, client: tuple[str, int], outcome: str, answer: bytes,
               row: Row, started: float) -> None:
        """Count a timed replay, and show it to the observer, with its query decoded again
        (the pipeline decoded the same bytes once, so they decode; the cost is paid only
        with an observer)."""
        took = self._clock() - started
        observe(row, took)
        if self._observer is not None:
            q = wire.parse_query(data, client, "udp")
            offer(self._observer, q, "udp", outcome, answer, took, "")

    def clear(self) -> None:
        """Forget everything (the rules changed)."""
        self._entries.clear()
