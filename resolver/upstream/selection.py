"""Which upstream to ask first: health bookkeeping and the strategies that order upstreams.

Pure bookkeeping with the time passed in, no sockets, so every rule is a table test. The pool
asks `arrange` for an order once per query and reports each attempt back to the upstream's
`Health`.

- Health: an upstream that fails `after` times in a row is backed off, skipped for a period
  that doubles with each further failure up to a cap. When the period is over, one query
  probes it (the others keep skipping it for one timeout), so a dead upstream costs one slow
  query per period instead of a burst; a reply of any kind makes it healthy again.
- Strategies (the names `upstream.strategy` takes): failover keeps the configured order,
  random shuffles per query, fastest prefers the lowest smoothed RTT (an EWMA, like Unbound's
  and dnsdist's) but now and then tries another first so a recovered or once-slow upstream is
  measured again.
Backed-off upstreams are left out of the order; only when every upstream of the group is backed
off are they all tried anyway, rather than failing the query unasked. (Keeping them as a last
resort instead would make a name that the healthy upstreams answer with SERVFAIL wait out a dead
upstream's timeout before the SERVFAIL is relayed.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

EWMA_WEIGHT = 0.3  # weight of the newest RTT sample: a few replies move the estimate
EXPLORE = 0.05  # share of queries `fastest` sends first to an upstream other than the fastest
MAX_DOUBLINGS = 30  # keeps 2**n finite for an upstream that stays dead for months


@dataclass(frozen=True, slots=True)
class Backoff:
    """When an upstream counts as unhealthy, and for how long it is skipped."""

    after: int  # consecutive failures
    initial: float  # seconds skipped after the `after`-th failure; doubles with each more
    maximum: float


class Health:
    """One upstream's record: smoothed RTT, failures in a row, and until when it is skipped."""

    __slots__ = ("srtt", "failures", "until", "answered", "failed", "_backoff", "_probe",
                 "_backed_off_at")

    def __init__(self, backoff: Backoff, probe: float):
        self.srtt: float | None = None  # seconds; None until the first reply or failure
        self.failures = 0
        self.until = 0.0  # skipped while now < until
        # when it last replied, and when an attempt last failed: what /readyz judges by
        self.answered: float | None = None
        self.failed: float | None = None
        self._backoff = backoff
        self._probe = probe  # how long one probe has before another query may probe
        self._backed_off_at = float("-inf")  # when the backoff was last set or doubled

    @property
    def healthy(self) -> bool:
        return self.failures < self._backoff.after

    def ready(self, now: float) -> bool:
        """Whether to ask this upstream now. After a backoff the first caller gets it as a
        probe and the upstream stays skipped for everyone else until the probe resolves."""
        if now < self.until:
            return False
        if not self.healthy:
            self.until = now + self._probe
        return True

    def success(self, rtt: float, now: float) -> None:
        """Any reply: the upstream is alive (even SERVFAIL is an answer from a live server)."""
        self._sample(rtt)
        self.answered = now
        self.failures = 0
        self.until = 0.0

    def failure(self, now: float, penalty: float, sent: float | None = None) -> None:
        """A timeout or a broken exchange of an attempt sent at `sent`. penalty (the attempt's
        timeout) feeds the RTT, so `fastest` moves away from an upstream that stops answering
        before it is backed off. The attempts that were in flight when the backoff was set
        or doubled fail of the same outage: they do not double it again, or one silent spell
        under load would back an upstream off for max_backoff at once."""
        self._sample(penalty)
        self.failed = now
        if sent is not None and sent < self._backed_off_at:
            return
        self.failures += 1
        if not self.healthy:
            doublings = min(self.failures - self._backoff.after, MAX_DOUBLINGS)
            self.until = now + min(self._backoff.maximum, self._backoff.initial * 2 ** doublings)
            self._backed_off_at = now

    def _sample(self, rtt: float) -> None:
        srtt = self.srtt
        self.srtt = rtt if srtt is None else srtt + EWMA_WEIGHT * (rtt - srtt)


class HasHealth(Protocol):
    health: Health


T = TypeVar("T", bound=HasHealth)


class Order(Protocol):
    """A strategy: the members to try, in order (it may reorder the list it is given)."""

    def __call__(self, members: list[T], rng: random.Random, /) -> list[T]: ...


def _failover(members: list[T], rng: random.Random) -> list[T]:
    return members


def _random(members: list[T], rng: random.Random) -> list[T]:
    if len(members) > 1:
        rng.shuffle(members)
    return members


def _fastest(members: list[T], rng: random.Random) -> list[T]:
    """Lowest smoothed RTT first; an unmeasured upstream counts as 0 so it gets measured."""
    if len(members) < 2:
        return members
    members.sort(key=lambda member: member.health.srtt or 0.0)
    if rng.random() < EXPLORE:
        members.insert(0, members.pop(rng.randrange(1, len(members))))
    return members


STRATEGIES: dict[str, Order] = {"failover": _failover, "random": _random, "fastest": _fastest}


def arrange(strategy: str, members: Sequence[T], now: float, rng: random.Random) -> list[T]:
    """The upstreams to try for one query, in order: those not backed off, by the strategy;
    all of them when every one is backed off."""
    if len(members) == 1:  # the usual single upstream: nothing to order
        members[0].health.ready(now)  # still counts a probe after a backoff
        return list(members)
    ready = [member for member in members if member.health.ready(now)]
    return STRATEGIES[strategy](ready or list(members), rng)
