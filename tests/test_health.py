"""resolver/ops/health.py: liveness and readiness as tables of what the event loops said,
on the fake clock; and the upstream health's record of when it last answered and failed."""

from __future__ import annotations

import pytest

from resolver.ops.health import READY_WINDOW, Status, liveness, readiness
from resolver.upstream.selection import Backoff, Health
from tests.clock import FakeClock

NEVER = None


def status(clock: FakeClock, answered_ago: float | None, failed_ago: float | None,
           rules: str | None = "v1") -> Status:
    """A loop's report, its times `ago` seconds before the clock's now."""
    now = clock()
    return Status(rules, now, None if answered_ago is None else now - answered_ago,
                  None if failed_ago is None else now - failed_ago)


@pytest.mark.parametrize(("answers", "ok", "text"), [
    ([("main", True)], True, "ok\n"),
    ([("worker-0", True), ("worker-1", True)], True, "ok\n"),
    ([("main", False)], False, "the event loop of main did not answer within 1 s\n"),
    ([("worker-0", True), ("worker-1", False)], False,
     "the event loop of worker-1 did not answer within 1 s\n"),
    ([("worker-0", False), ("worker-1", False)], False,
     "the event loop of worker-0, worker-1 did not answer within 1 s\n"),
    ([], False, "no event loop is running\n"),
])
def test_live_when_every_loop_answered(answers, ok, text):
    clock = FakeClock()
    probed = [(name, status(clock, NEVER, NEVER) if answered else None)
              for name, answered in answers]
    verdict = liveness(probed)
    assert (verdict.ok, verdict.text) == (ok, text)


@pytest.mark.parametrize(("answered_ago", "failed_ago", "ready"), [
    (NEVER, NEVER, True),  # nothing needed an upstream yet
    (1.0, NEVER, True),
    (NEVER, 1.0, False),  # needed, and no upstream ever answered
    (5.0, 1.0, True),  # failed since, but one answered within the window
    (READY_WINDOW, 1.0, True),  # the window's edge still counts
    (READY_WINDOW + 0.1, 1.0, False),
    (100.0, READY_WINDOW, False),
    (100.0, READY_WINDOW + 0.1, True),  # the failure is old: nothing was needed since
    (NEVER, READY_WINDOW + 0.1, True),
    (1.0, 0.0, True),
])
def test_ready_when_an_upstream_answered_recently_or_none_was_needed(answered_ago, failed_ago,
                                                                      ready):
    clock = FakeClock()
    verdict = readiness([("main", status(clock, answered_ago, failed_ago))])
    assert verdict.ok is ready
    if ready:
        assert verdict.text == "ok\n"
    else:
        assert verdict.text.startswith("no upstream answered")
        assert f"failed {failed_ago:.1f} s ago" in verdict.text


def test_the_reason_says_how_long_since_an_upstream_answered():
    clock = FakeClock()
    assert readiness([("main", status(clock, 45.0, 2.0))]).text == (
        "no upstream answered for 45 s, and an upstream attempt failed 2.0 s ago\n")
    assert readiness([("main", status(clock, NEVER, 2.0))]).text == (
        "no upstream answered ever, and an upstream attempt failed 2.0 s ago\n")


def test_workers_share_their_upstreams_and_each_has_its_own_clock():
    """The freshest answer of any worker counts; each worker's times are read on its own
    clock, so only their ages are compared."""
    one, two = FakeClock(start=50.0), FakeClock(start=9000.0)
    failing = status(one, NEVER, 1.0)
    answering = status(two, 3.0, NEVER)
    assert readiness([("worker-0", failing), ("worker-1", answering)]).ok
    assert not readiness([("worker-0", failing), ("worker-1", status(two, 40.0, NEVER))]).ok


@pytest.mark.parametrize(("rules", "alive", "text"), [
    ((None, "v1"), (True, True), "worker-0: no rules loaded\n"),
    (("v1", "v1"), (True, False), "the event loop of worker-1 did not answer within 1 s\n"),
])
def test_not_ready_without_rules_or_when_not_live(rules, alive, text):
    clock = FakeClock()
    probed = [(f"worker-{i}", status(clock, 1.0, NEVER, version) if up else None)
              for i, (version, up) in enumerate(zip(rules, alive, strict=True))]
    verdict = readiness(probed)
    assert (verdict.ok, verdict.text) == (False, text)


def test_health_records_when_its_upstream_last_answered_and_failed():
    clock = FakeClock()
    health = Health(Backoff(after=1, initial=1.0, maximum=4.0), probe=0.5)
    assert (health.answered, health.failed) == (None, None)
    health.failure(clock(), 0.5)
    clock.advance(2.0)
    health.failure(clock(), 0.5, sent=clock() - 3.0)  # in flight when backed off: still heard
    assert health.failed == clock()
    clock.advance(1.0)
    health.success(0.01, clock())
    assert (health.answered, health.failed) == (clock(), clock() - 1.0)
