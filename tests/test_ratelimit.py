"""resolver/stages/ratelimit.py: token buckets per prefix, slip, dry run, the bound on the
table, and the aggregated log line; the fake clock, and a recording timer."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest

from resolver.ops.config import RateLimitConfig
from resolver.stages.ratelimit import ALLOW, DROP, LOG_EVERY, SLIP, WOULD, Limiter, prefix_key
from tests.clock import FakeClock
from tests.test_staging import Timers

CONFIG = RateLimitConfig(qps=10, burst=5, slip=2)


def limiter(clock: FakeClock, timers: Timers | None = None, **changes: Any) -> Limiter:
    return Limiter(replace(CONFIG, **changes), clock, timers or Timers())


@pytest.mark.parametrize(("host", "v4", "v6", "key"), [
    ("192.0.2.77", 24, 56, "192.0.2.0/24"),
    ("192.0.2.77", 32, 56, "192.0.2.77/32"),
    ("192.0.2.77", 16, 56, "192.0.0.0/16"),
    ("2001:db8:aa:bbcc::1", 24, 56, "2001:db8:aa:bb00::/56"),
    ("2001:db8:aa:bbcc::1", 24, 64, "2001:db8:aa:bbcc::/64"),
    ("::ffff:192.0.2.9", 24, 56, "192.0.2.0/24"),
    ("fe80::1%eth0", 24, 64, "fe80::/64"),
    ("no address", 24, 56, None),
])
def test_prefix_keys(host: str, v4: int, v6: int, key: str | None) -> None:
    assert prefix_key(host, v4, v6) == key


# (seconds since the previous query, what the query gets), from a full bucket of 5 at 10 qps
# with slip 2: every second limited query slips.
@pytest.mark.parametrize(("steps", "expected"), [
    pytest.param([0] * 5, [ALLOW] * 5, id="the burst"),
    pytest.param([0] * 9, [ALLOW] * 5 + [DROP, SLIP, DROP, SLIP], id="past the burst"),
    pytest.param([0] * 6 + [0.1], [ALLOW] * 5 + [DROP, ALLOW], id="a token a tenth second"),
    pytest.param([0] * 6 + [0.05], [ALLOW] * 5 + [DROP, SLIP], id="half a token is none"),
    pytest.param([0] * 6 + [10] + [0] * 5, [ALLOW] * 5 + [DROP] + [ALLOW] * 5 + [SLIP],
                 id="refilled to the burst, no more"),
    pytest.param([0.1] * 20, [ALLOW] * 20, id="at the rate, forever"),
])
def test_a_bucket(steps: list[float], expected: list[int]) -> None:
    clock = FakeClock()
    limits = limiter(clock)
    got = []
    for step in steps:
        clock.now += step
        got.append(limits.admit("192.0.2.0/24"))
    assert got == expected


def test_just_over_the_rate_the_burst_runs_out_slowly() -> None:
    clock = FakeClock()
    limits = limiter(clock, qps=6)  # 0.75 tokens every 0.125 s: a quarter short each query
    got = []
    for _ in range(22):
        clock.now += 0.125
        got.append(limits.admit("k"))
    assert got == [ALLOW] * 17 + [DROP] + [ALLOW] * 3 + [SLIP]


@pytest.mark.parametrize(("slip", "expected"), [
    (0, [DROP] * 6),
    (1, [SLIP] * 6),
    (3, [DROP, DROP, SLIP, DROP, DROP, SLIP]),
])
def test_slip(slip: int, expected: list[int]) -> None:
    limits = limiter(FakeClock(), slip=slip, burst=1)
    assert limits.admit("k") == ALLOW
    assert [limits.admit("k") for _ in expected] == expected


def test_prefixes_have_buckets_of_their_own() -> None:
    limits = limiter(FakeClock(), burst=1)
    assert [limits.admit(key) for key in ("a", "b", "a", "b", "c")] == [
        ALLOW, ALLOW, DROP, DROP, ALLOW]


def test_a_dry_run_limits_nothing_and_says_what_it_would() -> None:
    limits = limiter(FakeClock(), burst=1, dry_run=True)
    assert [limits.admit("k") for _ in range(4)] == [ALLOW, WOULD, WOULD, WOULD]


def test_exempt_and_unusable_addresses_have_no_bucket() -> None:
    limits = limiter(FakeClock(), exempt=("192.0.2.0/28",))
    assert limits.key("192.0.2.15") is None
    assert limits.key("192.0.2.16") == "192.0.2.0/24"
    assert limits.key("junk") is None


def test_a_flood_from_many_prefixes_keeps_the_table_at_its_bound() -> None:
    clock = FakeClock()
    limits = limiter(clock, max_tracked=1000, burst=2)
    for index in range(100_000):  # a spoofed flood: every query from a new /24 of 10/8
        limits.admit(f"10.{index >> 8 & 255}.{index & 255}.0/24")
        assert len(limits) <= 1000
    assert len(limits) == 1000


def test_the_least_recent_prefix_goes_first_and_a_steady_one_stays_limited() -> None:
    clock = FakeClock()
    limits = limiter(clock, max_tracked=3, burst=1, slip=0)
    assert limits.admit("steady") == ALLOW
    for index in range(50):  # the steady sender asks between every two new prefixes
        limits.admit(f"new-{index}")
        assert limits.admit("steady") == DROP, "an eviction refilled the steady bucket"


def test_a_bucket_is_touched_when_it_refills_not_on_every_query() -> None:
    """The table's order is of refills: a prefix still spending its burst keeps its place,
    so it is the one forgotten first, and comes back with a full bucket."""
    clock = FakeClock()
    limits = limiter(clock, max_tracked=2, burst=3, slip=0)
    limits.admit("first")
    limits.admit("second")
    assert limits.admit("first") == ALLOW  # tokens left: not touched
    limits.admit("third")  # the table is full: "first", made longest ago, goes
    assert [limits.admit("first") for _ in range(3)] == [ALLOW] * 3, "a full bucket again"


def test_limited_prefixes_are_logged_once_per_period(caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    clock, timers = FakeClock(), Timers()
    limits = limiter(clock, timers, burst=1)
    for key, times in (("192.0.2.0/24", 30), ("198.51.100.0/24", 10), ("quiet", 1)):
        for _ in range(times):
            limits.admit(key)
    assert [timer.delay for timer in timers.armed] == [LOG_EVERY]  # one line per period
    clock.now += LOG_EVERY
    with caplog.at_level(logging.WARNING, "resolver.stages.ratelimit"):
        timers.armed[0].fire()
    assert caplog.messages == [
        "rate limit: 38 queries from 2 prefixes over the limit in 60 s; "
        "most from 192.0.2.0/24 (29), 198.51.100.0/24 (9)"]
    limits.admit("192.0.2.0/24")
    limits.admit("192.0.2.0/24")  # the next period begins with the next limited query
    assert len(timers.armed) == 2
