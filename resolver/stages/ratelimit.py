"""Rate limiting: a token bucket per client prefix, with RRL-style slip, in bounded memory.

Clients are grouped by prefix (/24 and /56 by default), as Unbound's ip-ratelimit and BIND's
RRL group them: one home network or one attacker's subnet is one bucket. A bucket holds up
to `burst` tokens and refills at `qps` per second; a query takes a token, and a query that
finds none is limited. Of the limited UDP queries every `slip`th is answered with an empty
TC=1 answer (a real client behind a spoofed address then retries over TCP, which a spoofer
cannot do, and which is not limited here: TCP has its connection caps), the rest get nothing.

A bucket is refilled only when it runs dry, by the time since its last refill (capped at
`burst`), so the common query, one with tokens left, reads no clock: a few dict and list
operations (bench/micro.py). Over any span T a prefix is admitted at most 2 * burst + qps * T
queries (a continuous refill would make that burst + qps * T); the rate in the long run is
the same.

Memory is bounded whatever the number of source addresses: at most `max_tracked` buckets are
kept, in the order they were last refilled (or made), and the one refilled longest ago is
forgotten (an OrderedDict: O(1) to touch, O(1) to evict). A bucket is touched when it runs
dry, not on every query: touching it per query cost a fifth of the limiter's time on the
common path (bench/micro.py), and the order only matters once the table is full. A forgotten
prefix starts again with a full bucket, so a flood from more prefixes than the table holds
costs each of them at most one burst per eviction; a sender at its limit refills, so it
stays at the recent end and keeps its state.

Limited prefixes are logged, aggregated: one line LOG_EVERY seconds after the first limited
query of a period, with the total and the prefixes limited most.

Pure logic: time comes from the injected clock, the log timer from the injected schedule.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Mapping

from resolver.message.constants import Clock
from resolver.ops.config import RateLimitConfig
from resolver.stages.access import Networks, client_network
from resolver.stages.contract import CallLater

log = logging.getLogger(__name__)

# What admit() says of a query: answer it, slip (TC=1), drop it, or (dry run) answer it
# though it is over the limit.
ALLOW, SLIP, DROP, WOULD = 0, 1, 2, 3
LOG_EVERY = 60.0  # seconds between two lines about limited prefixes
LOG_TOP = 5  # prefixes named in a line


def prefix_key(host: str, ipv4_prefix: int, ipv6_prefix: int) -> str | None:
    """The bucket's name for a client address: its network at the configured prefix length,
    as text ("192.0.2.0/24"); None for text that is no address."""
    network = client_network(host, ipv4_prefix, ipv6_prefix)
    return None if network is None else str(network)


class Limiter:
    """The buckets of every tracked prefix; `admit(key)` on each UDP query of a limited
    client (`key(host)` names its bucket once; the caller keeps it per address)."""

    def __init__(self, config: RateLimitConfig, clock: Clock, schedule: CallLater):
        self.dry_run = config.dry_run
        self._rate = config.qps
        self._burst = float(config.burst)
        self._slip = config.slip
        self._max = config.max_tracked
        self._v4, self._v6 = config.ipv4_prefix, config.ipv6_prefix
        self._exempt = Networks(config.exempt)
        self._clock = clock
        self._schedule = schedule
        # prefix -> [tokens, time of the last refill, queries limited]; least recent first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # read by server/udp.py, which takes a token from a bucket that has one itself
        # (admit's first step, written out there to save two calls a query)
        self.buckets: Mapping[str, list[float]] = self._buckets
        self._limited: dict[str, int] = {}  # queries limited since the last log line
        self._unnamed = 0  # limited queries of prefixes beyond the report's bound
        self._since: float | None = None  # when the period the next line covers began

    def __len__(self) -> int:
        return len(self._buckets)

    def key(self, host: str) -> str | None:
        """The bucket a client address queries from; None for an exempt client (or text that
        is no address), which is never limited."""
        if host in self._exempt:
            return None
        return prefix_key(host, self._v4, self._v6)

    def admit(self, key: str) -> int:
        """ALLOW, SLIP or DROP one query from the prefix `key`; in a dry run, WOULD instead
        of either of the last two (logged as limited all the same)."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            return self._track(key)
        tokens = bucket[0]
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return ALLOW
        return self._refill(key, bucket)

    def _track(self, key: str) -> int:
        """A prefix heard from for the first time (or again after it was forgotten): a full
        bucket, of which this query takes a token; the least recent prefix goes if the table
        is full."""
        buckets = self._buckets
        buckets[key] = [self._burst - 1.0, self._clock(), 0.0]
        if len(buckets) > self._max:
            buckets.popitem(last=False)
        return ALLOW

    def _refill(self, key: str, bucket: list[float]) -> int:
        """The bucket ran dry: add what the time since its last refill earned, up to burst."""
        now = self._clock()
        self._buckets.move_to_end(key)
        tokens = bucket[0] + (now - bucket[1]) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return ALLOW
        bucket[0] = tokens
        return self._limit(key, bucket, now)

    def _limit(self, key: str, bucket: list[float], now: float) -> int:
        """A query over the limit: remembered for the log, then slipped or dropped."""
        bucket[2] += 1
        limited = self._limited
        if key in limited:
            limited[key] += 1
        elif len(limited) < self._max:
            limited[key] = 1
        else:
            self._unnamed += 1
        if self._since is None:
            self._since = now
            self._schedule(LOG_EVERY, self._report, now)
        if self.dry_run:
            return WOULD
        slip = self._slip
        return SLIP if slip and not bucket[2] % slip else DROP

    def _report(self, since: float) -> None:
        """One line for the period: how many queries were limited, and where from most."""
        limited, unnamed = self._limited, self._unnamed
        self._limited, self._unnamed, self._since = {}, 0, None
        total = sum(limited.values()) + unnamed
        top = heapq.nlargest(LOG_TOP, limited.items(), key=lambda item: item[1])
        log.warning("rate limit%s: %d queries from %d%s prefixes over the limit in %.0f s; "
                    "most from %s", " (dry run, none limited)" if self.dry_run else "", total,
                    len(limited), "+" if unnamed else "", self._clock() - since,
                    ", ".join(f"{prefix} ({count})" for prefix, count in top))
