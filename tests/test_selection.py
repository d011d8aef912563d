"""Upstream health and ordering, with the time passed in: no sockets, no sleeping."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from resolver.upstream.selection import EWMA_WEIGHT, EXPLORE, Backoff, Health, arrange

BACKOFF = Backoff(after=2, initial=1.0, maximum=5.0)
PROBE = 0.5  # the upstream's timeout


@dataclass
class Member:
    name: str
    health: Health = field(default_factory=lambda: Health(BACKOFF, PROBE))


def members(*names: str) -> list[Member]:
    return [Member(name) for name in names]


def names(order: list[Member]) -> list[str]:
    return [member.name for member in order]


# --- Health -------------------------------------------------------------------------------

@pytest.mark.parametrize("failures, healthy, until", [
    (0, True, 0.0),
    (1, True, 0.0),     # below `after`: still tried
    (2, False, 11.0),   # the `after`-th failure: backed off for `initial`
    (3, False, 12.0),   # each further failure doubles it
    (4, False, 14.0),
    (5, False, 15.0),   # capped at `maximum`
    (200, False, 15.0),  # no overflow after months of failures
])
def test_failures_back_off_exponentially_up_to_the_cap(failures, healthy, until):
    health = Health(BACKOFF, PROBE)
    for _ in range(failures):
        health.failure(10.0, penalty=0.5)
    assert (health.healthy, health.until) == (healthy, until)


def test_attempts_in_flight_when_the_backoff_began_do_not_double_it():
    """30 queries out at once to an upstream that went silent: one outage, not 28 doublings."""
    health = Health(BACKOFF, PROBE)
    for _ in range(30):
        health.failure(10.0, 0.5, sent=9.5)
    assert (health.failures, health.until) == (2, 11.0)  # backed off for `initial`
    assert health.ready(11.0), "the probe"
    health.failure(11.5, 0.5, sent=11.0)  # sent after the backoff began: it counts
    assert (health.failures, health.until) == (3, 13.5)


@pytest.mark.parametrize("now, ready", [(10.5, False), (10.99, False), (11.0, True)])
def test_a_backed_off_upstream_is_skipped_until_the_period_ends(now, ready):
    health = Health(BACKOFF, PROBE)
    health.failure(10.0, 0.5)
    health.failure(10.0, 0.5)
    assert health.ready(now) is ready


def test_after_the_backoff_one_query_probes_and_the_others_keep_skipping():
    health = Health(BACKOFF, PROBE)
    health.failure(10.0, 0.5)
    health.failure(10.0, 0.5)
    assert health.ready(11.0), "the probe"
    assert not health.ready(11.1), "skipped while the probe is out"
    assert health.ready(11.0 + PROBE), "the probe never resolved: another query probes"


@pytest.mark.parametrize("probe_succeeds, ready_after, healthy", [
    (True, True, True),     # any reply makes it healthy: tried at once
    (False, False, False),  # failed again: backed off twice as long (2 s)
])
def test_the_probe_decides(probe_succeeds, ready_after, healthy):
    health = Health(BACKOFF, PROBE)
    health.failure(10.0, 0.5)
    health.failure(10.0, 0.5)
    assert health.ready(11.0)
    if probe_succeeds:
        health.success(0.01, 0.0)
    else:
        health.failure(11.0, 0.5)
    assert health.ready(12.5) is ready_after
    assert health.healthy is healthy


def test_a_success_resets_the_failure_count():
    health = Health(BACKOFF, PROBE)
    health.failure(10.0, 0.5)
    health.success(0.01, 0.0)
    health.failure(10.0, 0.5)
    assert health.healthy and health.ready(10.0)


@pytest.mark.parametrize("samples, expected", [
    ([], None),
    ([("ok", 0.1)], 0.1),  # the first sample is the estimate
    ([("ok", 0.1), ("ok", 0.2)], 0.1 + EWMA_WEIGHT * 0.1),
    ([("ok", 0.1), ("fail", 2.0)], 0.1 + EWMA_WEIGHT * 1.9),  # a failure costs its timeout
])
def test_smoothed_rtt(samples, expected):
    health = Health(BACKOFF, PROBE)
    for kind, value in samples:
        health.success(value, 0.0) if kind == "ok" else health.failure(0.0, value)
    assert health.srtt == pytest.approx(expected)


# --- arrange -----------------------------------------------------------------------------

class FixedRandom(random.Random):
    """random() returns `draw`; everything else as a seeded Random."""

    def __init__(self, draw: float):
        super().__init__(1)
        self.draw = draw

    def random(self) -> float:
        return self.draw


def back_off(member: Member, now: float = 0.0) -> None:
    for _ in range(BACKOFF.after):
        member.health.failure(now, 0.5)


@pytest.mark.parametrize("strategy", ["failover", "random", "fastest"])
def test_backed_off_upstreams_are_left_out(strategy):
    group = members("a", "b", "c")
    back_off(group[0])
    assert sorted(names(arrange(strategy, group, 0.1, FixedRandom(0.99)))) == ["b", "c"]


@pytest.mark.parametrize("strategy", ["failover", "random", "fastest"])
def test_when_all_are_backed_off_all_are_still_tried(strategy):
    group = members("a", "b")
    for member in group:
        back_off(member)
    assert sorted(names(arrange(strategy, group, 0.1, FixedRandom(0.99)))) == ["a", "b"]


def test_failover_keeps_the_configured_order():
    group = members("a", "b", "c")
    group[0].health.success(0.9, 0.0)
    assert names(arrange("failover", group, 0.0, random.Random(1))) == ["a", "b", "c"]


def test_random_orders_differ_between_queries():
    group = members("a", "b", "c")
    rng = random.Random(7)
    firsts = {names(arrange("random", group, 0.0, rng))[0] for _ in range(50)}
    assert firsts == {"a", "b", "c"}
    assert names(group) == ["a", "b", "c"], "the configured list is not shuffled in place"


@pytest.mark.parametrize("srtts, draw, expected", [
    ([0.3, 0.1, 0.2], 0.99, ["b", "c", "a"]),  # fastest first
    ([0.3, None, 0.2], 0.99, ["b", "c", "a"]),  # unmeasured first, so it gets measured
    ([0.3, 0.1, 0.2], EXPLORE / 2, None),       # exploring: someone other than b first
])
def test_fastest(srtts, draw, expected):
    group = members("a", "b", "c")
    for member, srtt in zip(group, srtts, strict=True):
        if srtt is not None:
            member.health.success(srtt, 0.0)
    order = names(arrange("fastest", group, 0.0, FixedRandom(draw)))
    if expected is None:
        assert order[0] != "b" and sorted(order) == ["a", "b", "c"]
    else:
        assert order == expected
