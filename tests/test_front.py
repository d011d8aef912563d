"""resolver/server/front.py: access control and rate limits in front of the packet cache,
with a recording inner handler; the fake clock."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import pytest

from resolver.ops.config import RateLimitConfig
from resolver.ops.metrics import Metrics
from resolver.server import front as front_module
from resolver.server.front import Front
from resolver.stages.access import Networks
from resolver.stages.contract import Sink
from resolver.stages.ratelimit import Limiter
from tests.clock import FakeClock
from tests.e2e import make_query
from tests.test_staging import Timers

QUERY = make_query("www.example.org", "A", qid=0x0101).to_wire()
ALLOWED, OUTSIDER = ("10.0.0.1", 5353), ("192.0.2.1", 5353)


class Inner:
    """The packet cache's place: answers every query it is handed with b"inner"."""

    def __init__(self) -> None:
        self.handed: list[tuple[str, int]] = []

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink) -> bytes | None:
        self.handed.append(client)
        return b"inner"


class Udp:
    name = "udp"

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None:
        raise AssertionError("nothing is delivered later here")


def front(refuse_action: str = "refuse", ratelimit: RateLimitConfig | None = None,
          allow: tuple[str, ...] = ("10.0.0.0/8",)) -> tuple[Front, Inner, Metrics]:
    inner, metrics = Inner(), Metrics()
    limiter = None if ratelimit is None else Limiter(ratelimit, FakeClock(), Timers())
    return Front(inner, Networks(allow), refuse_action, limiter, metrics), inner, metrics


def would_limit(metrics: Metrics) -> int:
    [sample] = [s for s in metrics.snapshot() if s.name == "would_ratelimit_total"]
    return int(sample.values[()])


def test_an_allowed_client_reaches_the_packet_cache() -> None:
    gate, inner, metrics = front()
    assert [gate.handle(QUERY, ALLOWED, Udp()) for _ in range(3)] == [b"inner"] * 3
    assert inner.handed == [ALLOWED] * 3
    assert metrics.queries.counts == {}  # counted further in, by what answers


def test_an_outsider_is_refused_before_the_packet_cache() -> None:
    gate, inner, metrics = front()
    answer = gate.handle(QUERY, OUTSIDER, Udp())
    assert answer is not None
    response = dns.message.from_wire(answer)
    assert response.rcode() == dns.rcode.REFUSED and response.id == 0x0101
    assert inner.handed == []
    assert metrics.queries.counts == {("udp", "refused", "A", "REFUSED"): 1}


def test_an_outsider_gets_nothing_with_drop() -> None:
    gate, inner, metrics = front("drop")
    assert gate.handle(QUERY, OUTSIDER, Udp()) is None
    assert inner.handed == []
    assert metrics.queries.counts == {("udp", "dropped", "A", "none"): 1}


@pytest.mark.parametrize(("action", "host", "verdict"), [
    ("refuse", "10.9.9.9", "allow"),
    ("refuse", "192.0.2.1", "refuse"),
    ("drop", "192.0.2.1", "close"),
    ("drop", "10.9.9.9", "allow"),
])
def test_tcp_connections(action: str, host: str, verdict: str) -> None:
    assert front(action)[0].connection(host) == verdict


def test_the_verdicts_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front_module, "MAX_VERDICTS", 100)
    gate, inner, _ = front(allow=("10.0.0.0/8",))
    for index in range(1000):
        gate.handle(QUERY, (f"10.0.{index >> 8}.{index & 255}", 53), Udp())
        assert len(gate._verdicts) <= 100
    assert len(inner.handed) == 1000  # each still judged right after the table emptied


def test_a_limited_client_slips_and_drops() -> None:
    gate, _inner, metrics = front(ratelimit=RateLimitConfig(qps=1, burst=2, slip=2))
    answers = [gate.handle(QUERY, ALLOWED, Udp()) for _ in range(6)]
    assert answers[:2] == [b"inner"] * 2
    assert answers[2] is None and answers[4] is None
    for slipped in (answers[3], answers[5]):
        assert slipped is not None and len(slipped) <= len(QUERY)
        response = dns.message.from_wire(slipped)
        assert response.flags & dns.flags.TC and response.answer == []
    assert metrics.queries.counts == {("udp", "ratelimited", "A", "none"): 2,  # dropped
                                      ("udp", "ratelimited", "A", "NOERROR"): 2}  # slipped
    # another /24 has a bucket of its own, and an outsider is refused, not limited
    assert gate.handle(QUERY, ("10.0.1.1", 53), Udp()) == b"inner"
    gate.handle(QUERY, OUTSIDER, Udp())
    assert metrics.queries.counts[("udp", "refused", "A", "REFUSED")] == 1


def test_a_dry_run_answers_and_counts() -> None:
    gate, _inner, metrics = front(ratelimit=RateLimitConfig(qps=1, burst=1, dry_run=True))
    assert [gate.handle(QUERY, ALLOWED, Udp()) for _ in range(3)] == [b"inner"] * 3
    assert metrics.queries.counts == {}
    assert would_limit(metrics) == 2


def test_an_exempt_client_is_not_limited() -> None:
    gate, _inner, _ = front(ratelimit=RateLimitConfig(qps=1, burst=1, exempt=("10.0.0.1/32",)))
    assert [gate.handle(QUERY, ALLOWED, Udp()) for _ in range(5)] == [b"inner"] * 5
