"""Table tests of stages/forward.py's Forwarder, wired as server.app.build_pipeline wires it
(a real Cache, ServeStale, CnameCheck over a Blocker, TtlPolicy and Metrics), with fakes only
at its edges: the upstreams' UDP I/O records each flight sent and the test lands it with the
reply or failure it chooses; `schedule` records RFC 8767's client response timer and the test
fires it; `deliver` records every answer; the clock is a FakeClock. Nothing here opens a
socket or needs an event loop, so coalescing, serve-stale, prefetch, CNAME cloaking and the
error guards are each a few microseconds of plain calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry

from resolver.message import wire
from resolver.message.constants import ALWAYS, NOERROR, NXDOMAIN, REFUSED, SERVFAIL, Cancellable
from resolver.message.names import to_wire
from resolver.message.query import Query
from resolver.message.reply import TtlPolicy, scan_reply
from resolver.ops.config import BlockingConfig, CacheConfig
from resolver.ops.metrics import Metrics, new_row
from resolver.rules.matcher import RuleSet
from resolver.rules.model import Rule, RuleList
from resolver.stages.blocking import Blocker
from resolver.stages.cache import Cache
from resolver.stages.cname import CnameCheck
from resolver.stages.contract import PASS, Answered
from resolver.stages.contract import Sink as Transport
from resolver.stages.forward import Flight, Forwarder
from resolver.stages.stale import ServeStale
from resolver.upstream.attempts import Exchange, Upstream
from resolver.upstream.selection import Backoff, Health
from tests.clock import START, FakeClock
from tests.dnsmsg import Summary, query, response, summary

NAME = "www.example.org"
CONFIG = CacheConfig()  # stale_client_timeout 1.8, stale_ttl 30, servfail_ttl 5
TRACKING = RuleList("tracking")
RULES = RuleSet([TRACKING], [(to_wire("ads.example.org"), Rule(TRACKING, "ads"))])
EDE_STALE = ((15, b"\x00\x03"),)  # the Extended DNS Error option "Stale Answer"


def answer(address: str = "192.0.2.1", ttl: int = 300, name: str = NAME) -> bytes:
    """An upstream reply with one A record."""
    return response(name, answer=(f"{name}. {ttl} IN A {address}",))


def failed_reply(rcode: int, name: str = NAME) -> bytes:
    return response(name, rcode=rcode)


# -- the fakes at the edges ---------------------------------------------------------------------

class Sink:
    """A transport a client's answer goes to; the forwarder only names it to `deliver`."""

    def __init__(self, name: str = "udp"):
        self.name = name

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None:
        raise AssertionError("the forwarder answers through its deliver callback only")


@dataclass(frozen=True)
class Delivered:
    """One answer as `deliver` got it."""

    q: Query
    sink: Transport
    data: bytes
    outcome: str
    upstream: str  # the label of the upstream the answer came from, "" for none

    @property
    def message(self) -> Summary:
        return summary(self.data)


_T = TypeVar("_T")


class Timer:
    """One call of the injected `schedule`: a test fires it or sees it cancelled."""

    def __init__(self, delay: float, callback: Callable[[Any], object], flight: Flight):
        self.delay, self.callback, self.flight = delay, callback, flight
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled, "a cancelled timer never fires"
        self.callback(self.flight)


class FakeUdp:
    """attempts.UdpIo: keeps each exchange sent (a Flight) for the test to land; `broken`
    makes send raise, as a closed socket would."""

    def __init__(self) -> None:
        self.sent: list[Exchange] = []
        self.forgotten: list[int] = []
        self.broken: Exception | None = None

    def send(self, exchange: Exchange) -> object:
        if self.broken is not None:
            raise self.broken
        self.sent.append(exchange)
        return len(self.sent)

    def forget(self, ticket: object) -> None:
        assert isinstance(ticket, int)
        self.forgotten.append(ticket)


class NoStream:
    def send(self, exchange: Exchange, timeout: float) -> Cancellable:
        raise AssertionError("no reply here is truncated")


UPSTREAM = "192.0.2.53:53"  # the one upstream's label


class FakePlan:
    """attempts.Plan over one upstream with the fake UDP I/O."""

    deadline = 10.0

    def __init__(self, udp: FakeUdp):
        self.upstream = Upstream(UPSTREAM, 1.0, Health(Backoff(3, 1.0, 10.0), 1.0),
                                 udp, NoStream(), new_row())
        self.errors: list[str] = []

    def order(self, q: Query, now: float) -> list[Upstream]:
        return [self.upstream]

    def count_error(self, upstream: Upstream, kind: str) -> None:
        self.errors.append(kind)


class Harness:
    """A Forwarder wired as build_pipeline wires it, over the fakes above."""

    def __init__(self, config: CacheConfig = CONFIG, max_inflight: int = 100,
                 rules: RuleSet = RULES):
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.udp = FakeUdp()
        self.plan = FakePlan(self.udp)
        self.blocker = Blocker(rules, BlockingConfig(rules=()), self.metrics)
        cname = CnameCheck(self.blocker)
        self.cache = Cache(config, self.metrics, self.clock, inspect=cname.verdict)
        self.blocker.on_install(self.cache.recheck)
        self.stale = ServeStale(self.cache, config, self.metrics)
        self.policy = TtlPolicy(config.min_ttl, config.max_ttl, config.negative_ttl,
                                config.servfail_ttl)
        self.delivered: list[Delivered] = []
        self.undeliverable: set[int] = set()  # query IDs whose delivery raises
        self.timers: list[Timer] = []
        self.forwarder = Forwarder(self.plan, self.cache, self.policy, self.stale, cname,
                                   self._deliver, self._schedule, self.clock, self.metrics,
                                   max_inflight)

    def _deliver(self, q: Query, sink: Transport, answer: bytes, outcome: str, upstream: str
                 ) -> None:
        if int.from_bytes(q.data[:2], "big") in self.undeliverable:
            raise RuntimeError("a bug in a transport")
        self.delivered.append(Delivered(q, sink, answer, outcome, upstream))

    def _schedule(self, delay: float, callback: Callable[[_T], object], flight: _T) -> Timer:
        assert isinstance(flight, Flight), "the forwarder arms timers for flights only"
        timer = Timer(delay, callback, flight)
        self.timers.append(timer)
        return timer

    # -- driving it

    def submit(self, name: str = NAME, qtype: str = "A", sink: Sink | None = None,
               **client: Any) -> Query:
        q = query(name, qtype, **client)
        self.forwarder.submit(q, sink or Sink())
        return q

    def in_flight(self, index: int = -1) -> Exchange:
        exchange = self.udp.sent[index]
        assert exchange.ticket is not None, "already landed"
        return exchange

    def land(self, data: bytes | None, index: int = -1) -> None:
        """The upstream answers every attempt of the flight sent `index`-th with data (a
        SERVFAIL or REFUSED moves the exchange on to another attempt), or (None) every attempt
        fails on the network, until the exchange ends."""
        exchange = self.in_flight(index)
        while exchange.ticket is not None:
            if data is None:
                exchange.udp_failed("network", self.clock())
            else:
                exchange.ticket = None  # the UDP driver takes the reply
                exchange.udp_reply(data, self.clock())

    def cache_answer(self, name: str = NAME, ttl: int = 60, address: str = "192.0.2.1",
                     **client: Any) -> Query:
        """An answer in the cache as if fetched now."""
        q = query(name, **client)
        data = answer(address, ttl, name)
        self.cache.put(q.cache_key, scan_reply(data, wire.skip_name(data, 12) + 4, self.policy))
        return q

    @property
    def inflight_gauge(self) -> float | None:
        return self.registry.get_sample_value("resolver_inflight")

    def counts(self) -> tuple[int, int, float | None]:
        """(flights, waiting, the inflight gauge)."""
        return self.forwarder.flights, self.forwarder.waiting, self.inflight_gauge


def addresses(message: Summary) -> list[str]:
    return [rdata for _, _, _, rtype, rdata in message.answer if rtype == "A"]


# -- coalescing -------------------------------------------------------------------------------

def test_identical_questions_share_one_flight_and_one_reply() -> None:
    h = Harness()
    first, second = Sink("udp"), Sink("tcp")
    h.submit(sink=first, qid=1)
    h.submit("WWW.Example.ORG", sink=second, qid=2, edns=True)
    assert len(h.udp.sent) == 1, "one upstream query for both"
    assert h.counts() == (1, 2, 2)
    h.land(answer("192.0.2.7"))
    assert [(d.sink, d.outcome, d.upstream) for d in h.delivered] == [
        (first, "forwarded", UPSTREAM), (second, "forwarded", UPSTREAM)]
    one, two = (d.message for d in h.delivered)
    assert (one.id, one.question[0][0], addresses(one), one.edns) == (
        1, "www.example.org.", ["192.0.2.7"], None)
    assert (two.id, two.question[0][0], addresses(two), two.edns) == (
        2, "WWW.Example.ORG.", ["192.0.2.7"], (0, 1232, False, ()))
    assert h.counts() == (0, 0, 0)
    assert h.cache.fresh(query(NAME).cache_key) is not None


@pytest.mark.parametrize(("name", "qtype", "client", "flights"), [
    (NAME, "A", {"qid": 9}, 1),
    (NAME.upper(), "A", {}, 1),  # names compare case-insensitively
    (NAME, "A", {"edns": True}, 1),  # EDNS without DO shares the answer
    (NAME, "A", {"rd": False}, 1),
    (NAME, "A", {"edns": True, "do": True}, 2),  # DO and CD answers are kept apart
    (NAME, "A", {"cd": True}, 2),
    (NAME, "AAAA", {}, 2),
    ("other.example.org", "A", {}, 2),
])
def test_what_makes_a_separate_flight(name: str, qtype: str, client: dict[str, Any],
                                      flights: int) -> None:
    h = Harness()
    h.submit()
    h.submit(name, qtype, **client)
    assert (len(h.udp.sent), h.forwarder.flights, h.forwarder.waiting) == (flights, flights, 2)
    asked = [(NAME, "A"), (name, qtype)]
    for index in range(flights):  # each flight's own reply, to its own waiters
        h.land(response(*asked[index]), index)
    assert [d.outcome for d in h.delivered] == ["forwarded"] * 2
    assert [(d.q.name, d.q.qtype) for d in h.delivered] == [
        (query(n, t).name, query(n, t).qtype) for n, t in asked]
    assert h.counts() == (0, 0, 0)


# -- serve-stale ----------------------------------------------------------------------------

def expired(h: Harness, **client: Any) -> Query:
    """An answer cached 61 s ago with TTL 60: expired, inside the stale window."""
    q = h.cache_answer(ttl=60, **client)
    h.clock.advance(61)
    return q


def test_the_client_response_timer_serves_stale_and_the_flight_refreshes_the_cache() -> None:
    h = Harness()
    key = expired(h, edns=True).cache_key
    waiter = Sink()
    h.submit(sink=waiter, qid=1, edns=True)
    assert [timer.delay for timer in h.timers] == [h.stale.client_timeout] == [1.8]
    assert h.delivered == []
    h.clock.advance(1.8)
    h.timers[0].fire()
    [stale] = h.delivered
    assert (stale.sink, stale.outcome, stale.message.id, stale.upstream) == (
        waiter, "stale", 1, "")
    assert stale.message.answer == (("www.example.org.", 30, "IN", "A", "192.0.2.1"),)
    assert stale.message.edns == (0, 1232, False, EDE_STALE)
    assert h.counts() == (1, 0, 0), "the flight goes on, nobody waits on it"

    h.submit(qid=2)  # arrives after the timer fired: stale at once, no second flight
    assert [(d.outcome, d.message.id) for d in h.delivered[1:]] == [("stale", 2)]
    assert len(h.udp.sent) == 1 and h.counts() == (1, 0, 0)

    h.land(answer("192.0.2.2"))
    assert len(h.delivered) == 2, "the landing answers nobody twice"
    assert h.counts() == (0, 0, 0)
    entry = h.cache.fresh(key)
    assert entry is not None and entry.stored == h.clock()
    assert h.metrics.cache.counts[("stale",)] == 2


def test_a_reply_before_the_timer_cancels_it() -> None:
    h = Harness()
    expired(h)
    h.submit()
    h.land(answer("192.0.2.2"))
    assert [timer.cancelled for timer in h.timers] == [True]
    assert [(d.outcome, addresses(d.message)) for d in h.delivered] == [
        ("forwarded", ["192.0.2.2"])]


def test_no_timer_without_an_answer_to_serve_stale() -> None:
    h = Harness(replace(CONFIG, serve_stale=False))
    expired(h)
    h.submit()
    h.land(None)
    assert h.timers == []
    assert [d.outcome for d in h.delivered] == ["servfail"]


@pytest.mark.parametrize(("upstream", "cached", "outcome", "rcode", "after", "by"), [
    # With an expired answer to fall back on: stale, whatever the failure; from no upstream
    ("none", True, "stale", NOERROR, "recheck", ""),  # served stale from the cache for 5 s
    ("servfail", True, "stale", NOERROR, "recheck", ""),
    ("refused", True, "stale", NOERROR, "kept", ""),  # REFUSED has no TTL: no recheck window
    # Without one: SERVFAIL, cached for servfail_ttl (RFC 9520); REFUSED relayed, not cached;
    # a relayed rcode comes from the upstream that sent it
    ("none", False, "servfail", SERVFAIL, "servfail", ""),
    ("servfail", False, "servfail", SERVFAIL, "servfail", UPSTREAM),
    ("refused", False, "forwarded", REFUSED, "nothing", UPSTREAM),
])
def test_failures_to_refresh(upstream: str, cached: bool, outcome: str, rcode: int,
                             after: str, by: str) -> None:
    h = Harness()
    q = expired(h, edns=True) if cached else query(NAME, edns=True)
    h.submit(edns=True)
    h.land({"none": None, "servfail": failed_reply(SERVFAIL),
            "refused": failed_reply(REFUSED)}[upstream])
    [got] = h.delivered
    assert (got.outcome, got.message.rcode, got.upstream) == (outcome, rcode, by)
    assert got.message.edns is not None
    assert got.message.edns[3] == (EDE_STALE if outcome == "stale" else ())
    assert h.counts() == (0, 0, 0)
    entry = h.cache.entries.get(q.cache_key)
    now = h.clock()
    if after == "nothing":
        assert entry is None
    elif after == "servfail":
        assert entry is not None
        assert (entry.reply.rcode, entry.expires) == (SERVFAIL, now + CONFIG.servfail_ttl)
        assert not h.timers
    else:
        assert entry is not None and entry.reply.rcode == NOERROR, "the expired answer is kept"
        recheck = h.stale.answer(q)
        assert (recheck is not PASS) == (after == "recheck")
        if after == "recheck":
            assert entry.failed_until == now + CONFIG.servfail_ttl
            assert isinstance(recheck, Answered) and recheck.outcome == "stale"


def test_a_fresh_answer_is_stored() -> None:
    h = Harness()
    h.submit()
    h.land(answer(ttl=120))
    entry = h.cache.fresh(query(NAME).cache_key)
    assert entry is not None and entry.expires == h.clock() + 120 and entry.cloak is None
    assert h.metrics.cache.counts[("stored",)] == 1


# -- prefetch -------------------------------------------------------------------------------

@pytest.mark.parametrize(("busy", "max_inflight", "started"), [
    ([], 10, True),
    ([NAME], 10, False),  # a client's fetch of the same question is in flight
    (["a.example.org"], 10, True),
    (["a.example.org"], 2, True),
    (["a.example.org", "b.example.org"], 2, False),  # at max_inflight
])
def test_refresh_starts_one_waiterless_flight(busy: list[str], max_inflight: int,
                                              started: bool) -> None:
    h = Harness(max_inflight=max_inflight)
    for name in busy:
        h.submit(name)
    assert h.forwarder.refresh(query(NAME)) is started
    assert len(h.udp.sent) == len(busy) + started
    assert (h.forwarder.flights, h.forwarder.waiting) == (len(busy) + started, len(busy))
    if started:
        assert h.forwarder.refresh(query(NAME)) is False, "once while in flight"
        assert len(h.udp.sent) == len(busy) + 1


@pytest.mark.parametrize(("reply", "replaced"), [
    pytest.param(answer("192.0.2.2", ttl=100), True, id="answer"),
    pytest.param(None, False, id="no reply"),  # a failed prefetch leaves the fresh answer alone
    pytest.param(failed_reply(SERVFAIL), False, id="servfail"),
    pytest.param(failed_reply(REFUSED), False, id="refused"),
])
def test_a_prefetch_lands_in_the_cache_and_answers_nobody(reply: bytes | None,
                                                          replaced: bool) -> None:
    h = Harness()
    q = h.cache_answer(ttl=100)
    before = h.cache.entries[q.cache_key]
    h.clock.at(95)
    assert h.forwarder.refresh(q)
    h.land(reply)
    assert h.delivered == [] and h.counts() == (0, 0, 0)
    entry = h.cache.fresh(q.cache_key)
    assert entry is not None and (entry is not before) == replaced
    assert entry.stored == (START + 95 if replaced else START)
    assert entry.failed_until == ALWAYS, "a fresh answer is never marked for the stale recheck"


def test_a_client_joins_a_prefetch_and_gets_stale_if_it_expired_meanwhile() -> None:
    h = Harness()
    q = h.cache_answer(ttl=100)
    h.clock.at(95)
    h.forwarder.refresh(q)
    assert h.timers == [], "the answer is still fresh: nothing to be stale"
    h.clock.at(101)  # the prefetch is slow; the answer has expired
    h.submit(qid=7)
    assert len(h.udp.sent) == 1 and h.counts() == (1, 1, 1)
    assert [timer.delay for timer in h.timers] == [CONFIG.stale_client_timeout]
    h.timers[0].fire()
    assert [(d.outcome, d.message.id) for d in h.delivered] == [("stale", 7)]


# -- CNAME cloaking ---------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "outcome"), [
    ("x.ads.example.org", "blocked"),
    ("ads.example.org", "blocked"),
    ("cdn.example.net", "forwarded"),
    ("notads.example.org", "forwarded"),  # label boundaries
])
def test_a_reply_whose_chain_enters_a_blocked_domain_is_answered_blocked(
        target: str, outcome: str) -> None:
    h = Harness()
    h.submit("www.cloaked.test", edns=True)
    h.land(response("www.cloaked.test", answer=(
        f"www.cloaked.test. 300 IN CNAME {target}.", f"{target}. 300 IN A 192.0.2.9")))
    [got] = h.delivered
    assert got.outcome == outcome
    if outcome == "blocked":
        message = got.message
        assert (message.rcode, message.answer) == (NXDOMAIN, ())
        owner, _, _, rtype, _ = message.authority[0]
        assert (owner, rtype) == ("ads.example.org.", "SOA")
        assert h.metrics.blocked.counts == {("tracking", "ads", "nxdomain"): 1}
        entry = h.cache.fresh(query("www.cloaked.test").cache_key)
        assert entry is not None and entry.cloak is not None, "kept for CnameBlocker"
    else:
        assert addresses(got.message) == ["192.0.2.9"]
        assert h.metrics.blocked.counts == {}


# -- the guards -----------------------------------------------------------------------------

def test_a_waiter_whose_answer_raises_gets_servfail_and_the_others_their_answers(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    real = h.forwarder.answer

    def answer_or_raise(q: Query, reply, stale) -> Answered:
        if q.data[:2] == b"\x00\x02":
            raise RuntimeError("a bug in one answer")
        return real(q, reply, stale)

    monkeypatch.setattr(h.forwarder, "answer", answer_or_raise)
    for qid in (1, 2, 3):
        h.submit(qid=qid)
    with caplog.at_level(logging.ERROR):
        h.land(answer())
    assert [(d.message.id, d.outcome, d.message.rcode) for d in h.delivered] == [
        (1, "forwarded", NOERROR), (2, "servfail", SERVFAIL), (3, "forwarded", NOERROR)]
    assert h.counts() == (0, 0, 0)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "unexpected error while answering a query"
    assert "a bug in one answer" in caplog.text  # with the traceback


def test_a_bug_in_caching_still_answers_every_waiter(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()

    def broken(key: tuple[object, ...], reply: object) -> None:
        raise RuntimeError("a bug in the cache")

    monkeypatch.setattr(h.cache, "put", broken)
    h.submit(qid=1)
    h.submit(qid=2)
    h.land(answer())
    # the reply that came is still every waiter's answer; only the cache entry is lost
    assert [(d.message.id, d.outcome) for d in h.delivered] == [(1, "forwarded"),
                                                                (2, "forwarded")]
    assert "unexpected error while caching an upstream reply" in caplog.text
    assert h.counts() == (0, 0, 0)


def test_a_delivery_that_raises_costs_no_other_waiter(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    for qid in (1, 2, 3):
        h.submit(qid=qid)
    h.undeliverable.add(2)
    h.land(answer())
    assert [d.message.id for d in h.delivered] == [1, 3]
    assert "unexpected error while delivering an answer" in caplog.text
    assert h.counts() == (0, 0, 0)


@pytest.mark.parametrize("stale", [False, True])
def test_a_driver_that_cannot_send_fails_its_attempts_and_the_client_is_answered(
        stale: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A send that raises (a socket closed at shutdown) is a failed attempt: the exchange
    goes on to its end, and the waiter gets the stale answer or SERVFAIL, never silence."""
    h = Harness()
    if stale:
        expired(h)
    h.udp.broken = OSError("the socket is closed")
    h.submit()
    assert [d.outcome for d in h.delivered] == ["stale" if stale else "servfail"]
    assert h.counts() == (0, 0, 0)
    assert "could not send a query to upstream" in caplog.text
    h.udp.broken = None
    h.submit()  # a later client starts afresh
    h.land(answer())
    assert [d.outcome for d in h.delivered][-1] == "forwarded"


def test_when_the_plan_raises_submit_raises_and_nothing_stays_in_flight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()

    def broken(q: Query, now: float) -> list[Upstream]:
        raise RuntimeError("a bug in the plan")

    monkeypatch.setattr(h.plan, "order", broken)
    with pytest.raises(RuntimeError):
        h.submit()
    assert h.counts() == (0, 0, 0)
    assert h.delivered == [], "the pipeline's guard answers it, not the forwarder"


def test_a_prefetch_that_cannot_start_leaves_nothing_in_flight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(replace(CONFIG, serve_stale=False))
    q = h.cache_answer(ttl=100)
    h.clock.at(95)

    def broken(q: Query, now: float) -> list[Upstream]:
        raise RuntimeError("a bug in the plan")

    monkeypatch.setattr(h.plan, "order", broken)
    assert h.forwarder.refresh(q) is False  # logged; the hit that asked is unharmed
    assert h.counts() == (0, 0, 0)
    monkeypatch.undo()
    h.clock.at(101)  # expired: the next client goes upstream
    h.submit(qid=7)
    h.land(answer("192.0.2.2"))
    assert [(d.outcome, d.message.id) for d in h.delivered] == [("forwarded", 7)]


def test_drain_cancels_everything() -> None:
    h = Harness()
    expired(h)
    h.submit()
    h.submit()
    h.submit("a.example.org")
    h.forwarder.refresh(query("b.example.org"))
    assert h.counts() == (3, 3, 3)
    flights = list(h.udp.sent)
    h.forwarder.drain()
    assert h.counts() == (0, 0, 0)
    assert sorted(h.udp.forgotten) == [1, 2, 3], "every UDP attempt forgotten"
    assert [timer.cancelled for timer in h.timers] == [True]
    for flight in flights:  # a reply already on its way changes nothing
        flight.udp_reply(answer(), h.clock())
    assert h.delivered == []
