"""Table tests of upstream/attempts.py's Exchange, the attempt plan for one question.

The exchange opens no socket and reads no clock: each test drives it by handing it `now`
values from a FakeClock and the replies or failures a driver would, and records what it asked
of its I/O (every send, with when and for how long), of its plan (errors counted) and of each
upstream's health. So failover, deadlines, truncation and backoff are checked exactly, without
waiting for any of them: the whole module runs in milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from resolver.message.constants import NOERROR, REFUSED, SERVFAIL
from resolver.message.query import Query
from resolver.ops.metrics import new_row
from resolver.upstream.attempts import ROUNDS, Exchange, Upstream
from resolver.upstream.selection import Backoff, Health, arrange
from tests.clock import START, FakeClock
from tests.dnsmsg import query, response

QUESTION = query("www.example.org")
BACKOFF = Backoff(after=3, initial=10.0, maximum=60.0)


def reply(rcode: int = NOERROR, tc: bool = False) -> bytes:
    """An upstream reply to QUESTION: one A record unless rcode says otherwise."""
    answer = ("www.example.org. 300 IN A 192.0.2.1",) if rcode == NOERROR and not tc else ()
    data = bytearray(response("www.example.org", rcode=rcode, answer=answer))
    if tc:
        data[2] |= 0x02  # TC
    return bytes(data)


REPLIES = {"ok": reply(), "servfail": reply(SERVFAIL), "refused": reply(REFUSED),
           "tc": reply(tc=True)}


# -- the fakes at the edges: I/O that records, a plan that records --------------------------

@dataclass(frozen=True)
class Sent:
    """One attempt as the I/O saw it: which upstream, over what, when (seconds after START)
    and for how long (UDP: the exchange's `due` minus now)."""

    upstream: str
    via: str  # "udp" or "stream"
    at: float
    timeout: float

    def row(self) -> Row:
        """For comparison with a table row: times rounded to the microsecond."""
        return self.upstream, self.via, round(self.at, 6), round(self.timeout, 6)


@dataclass(frozen=True)
class Ticket:
    """What the fake UDP driver names an attempt by."""

    upstream: str
    number: int


class Pending:
    """A stream attempt in flight (a Cancellable)."""

    cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Wire:
    """Everything the exchange asked of the I/O of every upstream, in order."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.sent: list[Sent] = []
        self.tickets: list[Ticket] = []
        self.forgotten: list[Ticket] = []
        self.streams: list[Pending] = []

    def record(self, upstream: str, via: str, timeout: float) -> None:
        self.sent.append(Sent(upstream, via, self.clock() - START, timeout))

    def rows(self) -> list[Row]:
        return [sent.row() for sent in self.sent]


class FakeUdp:
    """attempts.UdpIo: records the send and returns a ticket; the test plays the driver."""

    def __init__(self, name: str, wire: Wire):
        self.name, self.wire = name, wire

    def send(self, exchange: Exchange) -> Ticket:
        self.wire.record(self.name, "udp", exchange.due - self.wire.clock())
        ticket = Ticket(self.name, len(self.wire.sent))
        self.wire.tickets.append(ticket)
        return ticket

    def forget(self, ticket: object) -> None:
        assert isinstance(ticket, Ticket)
        self.wire.forgotten.append(ticket)


class FakeStream:
    """attempts.StreamIo: records the send and its timeout; returns a Pending to inspect."""

    def __init__(self, name: str, wire: Wire):
        self.name, self.wire = name, wire

    def send(self, exchange: Exchange, timeout: float) -> Pending:
        self.wire.record(self.name, "stream", timeout)
        pending = Pending()
        self.wire.streams.append(pending)
        return pending


class FakePlan:
    """attempts.Plan: the upstreams in their configured order, or (strategy given) as
    selection.arrange orders them by their health; records every order asked and error."""

    def __init__(self, upstreams: list[Upstream], deadline: float, strategy: str | None = None):
        self.deadline = deadline
        self.upstreams = upstreams
        self.strategy = strategy
        self.ordered: list[float] = []  # the `now` of each order asked
        self.errors: list[tuple[str, str]] = []

    def order(self, q: Query, now: float) -> list[Upstream]:
        self.ordered.append(now - START)
        if self.strategy is None:
            return list(self.upstreams)
        return arrange(self.strategy, self.upstreams, now, random.Random(0))

    def count_error(self, upstream: Upstream, kind: str) -> None:
        self.errors.append((upstream.name, kind))


class Recorded(Exchange):
    """An exchange whose `done` records what it was given."""

    def __init__(self, q: Query, plan: FakePlan):
        super().__init__(q, plan)
        self.results: list[bytes | None] = []

    def done(self, data: bytes | None) -> None:
        self.results.append(data)


# An upstream as a table row writes it: name -> (attempt timeout, "udp" or "tls").
Spec = dict[str, tuple[float, str]]
Row = tuple[str, str, float, float]  # a Sent as a table writes it: Sent.row()
UDP2: Spec = {"a": (1.0, "udp"), "b": (1.0, "udp")}
TLS2: Spec = {"a": (1.0, "tls"), "b": (1.0, "tls")}


class Run:
    """One exchange over fake upstreams, driven as the UDP and stream drivers would drive it."""

    def __init__(self, spec: Spec, deadline: float = 10.0, strategy: str | None = None):
        self.clock = FakeClock()
        self.wire = Wire(self.clock)
        self.upstreams = [
            Upstream(name, timeout, Health(BACKOFF, timeout),
                     FakeUdp(name, self.wire) if via == "udp" else None,
                     FakeStream(name, self.wire), new_row())
            for name, (timeout, via) in spec.items()]
        self.plan = FakePlan(self.upstreams, deadline, strategy)
        self.exchange = self.new_exchange()

    def new_exchange(self) -> Recorded:
        return Recorded(QUESTION, self.plan)

    def health(self, name: str) -> Health:
        return next(u.health for u in self.upstreams if u.name == name)

    def start(self, at: float = 0.0) -> Recorded:
        self.clock.at(at)
        self.exchange.start(self.clock())
        return self.exchange

    def play(self, events: Iterable[str]) -> None:
        for event in events:
            self.event(event)

    def event(self, event: str) -> None:
        """`kind[@t]`: the attempt in flight ends with kind at START + t. Kinds: a reply
        (ok, servfail, refused, tc) or a failure (timeout, network, mismatch, tls). A reply
        without @ comes at once; a timeout without @ at the attempt's end (UDP: at `due`)."""
        kind, _, at = event.partition("@")
        exchange = self.exchange
        udp = exchange.ticket is not None  # else a stream attempt is in flight
        if at:
            self.clock.at(float(at))
        elif kind == "timeout":
            last = self.wire.sent[-1]
            self.clock.now = exchange.due if udp else START + last.at + last.timeout
        now = self.clock()
        data = REPLIES.get(kind)
        if udp:
            if data is None:
                exchange.udp_failed(kind, now)
            else:
                exchange.ticket = None  # what the driver does when it takes the reply
                exchange.udp_reply(data, now)
        elif data is None:
            exchange.stream_failed(kind, now)
        else:
            exchange.stream_reply(data, now)


def outcome(results: list[bytes | None]) -> list[str | None]:
    """done's calls, each by the REPLIES name of the bytes it was given (None: no reply)."""
    names = {data: name for name, data in REPLIES.items()}
    return [None if data is None else names[data] for data in results]


# -- failover, rounds, deadline, relaying -----------------------------------------------------

@pytest.mark.parametrize(("spec", "deadline", "events", "sends", "errors", "done"), [
    pytest.param(UDP2, 10, ["ok@0.05"], [("a", "udp", 0, 1)], [], "ok",
                 id="a good reply ends it at once"),
    pytest.param(UDP2, 10, ["timeout", "ok@1.2"],
                 [("a", "udp", 0, 1), ("b", "udp", 1, 1)], [("a", "timeout")], "ok",
                 id="a timeout moves on to the next upstream"),
    pytest.param(UDP2, 10, ["network@0.1", "mismatch@0.2", "ok@0.3"],
                 [("a", "udp", 0, 1), ("b", "udp", 0.1, 1), ("a", "udp", 0.2, 1)],
                 [("a", "network"), ("b", "mismatch")], "ok",
                 id="failures count their kind and move on"),
    pytest.param(UDP2, 10, ["timeout"] * 4,
                 [("a", "udp", 0, 1), ("b", "udp", 1, 1), ("a", "udp", 2, 1),
                  ("b", "udp", 3, 1)],
                 [("a", "timeout"), ("b", "timeout")] * 2, None,
                 id="each upstream ROUNDS times, in the plan's order, then done(None)"),
    pytest.param({"a": (1.0, "udp")}, 10, ["timeout"] * 2,
                 [("a", "udp", 0, 1), ("a", "udp", 1, 1)], [("a", "timeout")] * 2, None,
                 id="a lone upstream is tried ROUNDS times"),
    pytest.param({"a": (0.1, "udp"), "b": (2.0, "udp")}, 10, ["timeout", "ok@0.15"],
                 [("a", "udp", 0, 0.1), ("b", "udp", 0.1, 2)], [("a", "timeout")], "ok",
                 id="each upstream's own timeout"),
    pytest.param(UDP2, 2.5, ["timeout"] * 3,
                 [("a", "udp", 0, 1), ("b", "udp", 1, 1), ("a", "udp", 2, 0.5)],
                 [("a", "timeout"), ("b", "timeout"), ("a", "timeout")], None,
                 id="the deadline caps the last attempt and ends the rounds early"),
    pytest.param({"a": (2.0, "udp"), "b": (2.0, "udp")}, 1.5, ["timeout"],
                 [("a", "udp", 0, 1.5)], [("a", "timeout")], None,
                 id="a deadline below the timeout caps the first attempt"),
    pytest.param(UDP2, 10, ["servfail@0.1", "ok@0.2"],
                 [("a", "udp", 0, 1), ("b", "udp", 0.1, 1)], [("a", "rcode")], "ok",
                 id="SERVFAIL moves on"),
    pytest.param(UDP2, 10, ["refused", "ok"],
                 [("a", "udp", 0, 1), ("b", "udp", 0, 1)], [("a", "rcode")], "ok",
                 id="REFUSED moves on"),
    pytest.param(UDP2, 10, ["servfail", "refused", "servfail", "refused"],
                 [("a", "udp", 0, 1), ("b", "udp", 0, 1)] * 2, [("a", "rcode"), ("b", "rcode")] * 2,
                 "refused", id="the last SERVFAIL or REFUSED is relayed"),
    pytest.param(UDP2, 10, ["servfail@0.1", "timeout", "timeout", "timeout"],
                 [("a", "udp", 0, 1), ("b", "udp", 0.1, 1), ("a", "udp", 1.1, 1),
                  ("b", "udp", 2.1, 1)],
                 [("a", "rcode"), ("b", "timeout"), ("a", "timeout"), ("b", "timeout")],
                 "servfail", id="a SERVFAIL is relayed when only timeouts follow"),
    pytest.param(UDP2, 1.5, ["refused@0.5", "timeout"],
                 [("a", "udp", 0, 1), ("b", "udp", 0.5, 1)], [("a", "rcode"), ("b", "timeout")],
                 "refused", id="and when the deadline ends it"),
])
def test_failover(spec: Spec, deadline: float, events: list[str],
                  sends: list[Row], errors: list[tuple[str, str]], done: str | None) -> None:
    run = Run(spec, deadline)
    run.start()
    run.play(events)
    assert run.wire.rows() == sends
    assert run.plan.errors == errors
    assert outcome(run.exchange.results) == [done], "done is called exactly once"
    assert run.plan.ordered == [0], "the order is asked once, at the start"


def test_a_failover_round_is_the_upstream_count_times_rounds() -> None:
    run = Run({name: (1.0, "udp") for name in "abc"}, deadline=100)
    run.start()
    while not run.exchange.results:
        run.event("timeout")
    assert [sent.upstream for sent in run.wire.sent] == list("abc") * ROUNDS


@pytest.mark.parametrize(("timeout", "deadline", "start", "due"), [
    (0.1, 5.0, 0.0, 0.1),  # a server's own timeout
    (2.0, 5.0, 0.0, 2.0),
    (2.0, 5.0, 7.5, 9.5),  # from the start's now
    (2.0, 1.5, 0.0, 1.5),  # capped by the deadline
])
def test_the_udp_attempt_is_due_after_the_upstreams_timeout(timeout: float, deadline: float,
                                                            start: float, due: float) -> None:
    """`due` is what the UDP driver's sweep compares with its clock."""
    run = Run({"a": (timeout, "udp")}, deadline)
    run.start(start)
    assert run.exchange.due == pytest.approx(START + due)
    assert run.exchange.ticket == run.wire.tickets[0]


# -- health -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("event", "failures", "srtt"), [
    ("ok@0.03", 0, 0.03),  # a reply: healthy, RTT from when the attempt was sent
    ("servfail@0.02", 0, 0.02),  # SERVFAIL and REFUSED come from a live server:
    ("refused@0.04", 0, 0.04),  # not failures, and they reset the count
    ("timeout", 2, 1.0),  # a failure costs the attempt's timeout as its RTT sample
    ("network@0.2", 2, 1.0),
    ("mismatch@0.2", 2, 1.0),
])
def test_health_after_one_attempt(event: str, failures: int, srtt: float) -> None:
    run = Run(UDP2)
    health = run.health("a")
    health.failures = 1  # one failure in a row already
    run.start()
    run.event(event)
    assert health.failures == failures
    assert health.srtt == pytest.approx(srtt)


@pytest.mark.parametrize(("spec", "events", "by", "durations"), [
    pytest.param(UDP2, ["ok@0.05"], "a", {"a": (1, 0.05), "b": (0, 0)},
                 id="a reply: its upstream, timed from its attempt"),
    pytest.param(UDP2, ["timeout", "ok@1.2"], "b", {"a": (0, 0), "b": (1, 0.2)},
                 id="a timeout is no duration"),
    pytest.param(UDP2, ["servfail@0.1", "ok@0.4"], "b", {"a": (1, 0.1), "b": (1, 0.3)},
                 id="a SERVFAIL that moves on is a reply too"),
    pytest.param(UDP2, ["servfail@0.1", "timeout", "timeout", "timeout"], "a",
                 {"a": (1, 0.1), "b": (0, 0)}, id="the relayed SERVFAIL's upstream"),
    pytest.param(UDP2, ["servfail@0.1", "refused@0.3", "timeout", "timeout"], "b",
                 {"a": (1, 0.1), "b": (1, 0.2)}, id="the last relayed rcode's upstream"),
    pytest.param(UDP2, ["tc@0.1", "ok@0.25"], "a", {"a": (1, 0.25), "b": (0, 0)},
                 id="a TCP retry after TC: from the UDP attempt"),
    pytest.param(TLS2, ["ok@0.02"], "a", {"a": (1, 0.02), "b": (0, 0)}, id="over TLS"),
    pytest.param(UDP2, ["timeout"] * 4, "", {"a": (0, 0), "b": (0, 0)},
                 id="no reply: no upstream"),
])
def test_which_upstream_answered_and_how_long_it_took(
        spec: Spec, events: list[str], by: str, durations: dict[str, tuple[int, float]]
        ) -> None:
    """`by` names the upstream whose reply done() got; each reply's time since its attempt
    was sent goes into that upstream's resolver_upstream_duration_seconds row."""
    run = Run(spec)
    run.start()
    run.play(events)
    assert run.exchange.by == by
    for upstream in run.upstreams:
        count, total = durations[upstream.name]
        assert sum(upstream.durations[:-1]) == count, upstream.name
        assert upstream.durations[-1] == pytest.approx(total), upstream.name


def test_a_good_reply_measures_from_the_attempt_not_the_exchange() -> None:
    run = Run(UDP2)
    run.start()
    run.play(["timeout", "ok@1.07"])
    assert run.health("b").srtt == pytest.approx(0.07)
    assert run.health("a").srtt == pytest.approx(1.0)


# -- truncation and streams -------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "events", "sends", "errors", "done"), [
    pytest.param(UDP2, ["tc@0.3", "ok@0.5"],
                 [("a", "udp", 0, 1), ("a", "stream", 0.3, 0.7)], [], "ok",
                 id="TC: the same upstream over a stream, within what is left"),
    pytest.param(UDP2, ["tc@1.0", "ok@1.0005"],
                 [("a", "udp", 0, 1), ("a", "stream", 1, 0.001)], [], "ok",
                 id="TC at the end of the attempt: the 1 ms floor"),
    pytest.param(UDP2, ["tc@1.5", "ok@1.5"],
                 [("a", "udp", 0, 1), ("a", "stream", 1.5, 0.001)], [], "ok",
                 id="TC late, before the sweep: still the floor, never a negative timeout"),
    pytest.param(UDP2, ["tc@0.2", "network@0.4", "ok@0.5"],
                 [("a", "udp", 0, 1), ("a", "stream", 0.2, 0.8), ("b", "udp", 0.4, 1)],
                 [("a", "network")], "ok", id="the stream fails: the next upstream"),
    pytest.param(UDP2, ["tc@0.2", "timeout", "ok@1.1"],
                 [("a", "udp", 0, 1), ("a", "stream", 0.2, 0.8), ("b", "udp", 1, 1)],
                 [("a", "timeout")], "ok", id="the stream times out"),
    pytest.param(UDP2, ["tc@0.2", "servfail@0.3", "ok@0.4"],
                 [("a", "udp", 0, 1), ("a", "stream", 0.2, 0.8), ("b", "udp", 0.3, 1)],
                 [("a", "rcode")], "ok", id="a SERVFAIL over the stream moves on"),
    pytest.param(UDP2, ["tc@0.2", "tc@0.3"],
                 [("a", "udp", 0, 1), ("a", "stream", 0.2, 0.8)], [], "tc",
                 id="a stream reply is never retried for its TC bit"),
    pytest.param(TLS2, ["ok@0.1"], [("a", "stream", 0, 1)], [], "ok",
                 id="a TLS-only upstream: every attempt over the stream, full timeout"),
    pytest.param(TLS2, ["tls@0.1", "timeout", "network@1.2", "mismatch@1.3"],
                 [("a", "stream", 0, 1), ("b", "stream", 0.1, 1), ("a", "stream", 1.1, 1),
                  ("b", "stream", 1.2, 1)],
                 [("a", "tls"), ("b", "timeout"), ("a", "network"), ("b", "mismatch")], None,
                 id="stream failure kinds"),
    pytest.param({"a": (1.0, "tls"), "b": (1.0, "udp")}, ["timeout", "ok@1.1"],
                 [("a", "stream", 0, 1), ("b", "udp", 1, 1)], [("a", "timeout")], "ok",
                 id="TLS and UDP upstreams mixed"),
    pytest.param({"a": (1.0, "tls")}, ["refused", "servfail"],
                 [("a", "stream", 0, 1)] * 2, [("a", "rcode")] * 2, "servfail",
                 id="the last rcode over TLS is relayed"),
])
def test_streams(spec: Spec, events: list[str], sends: list[Row],
                 errors: list[tuple[str, str]], done: str | None) -> None:
    run = Run(spec)
    run.start()
    run.play(events)
    assert run.wire.rows() == sends
    assert run.plan.errors == errors
    assert outcome(run.exchange.results) == [done]


def test_a_stream_after_tc_keeps_the_udp_attempts_timing_for_health() -> None:
    """The stream retry is part of the UDP attempt: its RTT runs from the UDP send."""
    run = Run(UDP2)
    run.start()
    run.play(["tc@0.1", "ok@0.25"])
    assert run.health("a").srtt == pytest.approx(0.25)


# -- cancel -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "before", "forgotten", "cancelled", "late"), [
    pytest.param(UDP2, [], [Ticket("a", 1)], [], "timeout",
                 id="a UDP attempt: its ticket is forgotten"),
    pytest.param(UDP2, ["timeout"], [Ticket("a", 1), Ticket("b", 2)], [], "network",
                 id="each UDP attempt's ticket is forgotten once it ends"),
    pytest.param(UDP2, ["tc@0.1"], [], [True], "network",
                 id="a stream after TC: the stream is cancelled"),
    pytest.param(TLS2, [], [], [True], "timeout", id="a TLS attempt: cancelled"),
    pytest.param(TLS2, [], [], [True], "ok", id="a reply racing the cancel"),
])
def test_cancel_stops_every_attempt_and_done_never_comes(
        spec: Spec, before: list[str], forgotten: list[Ticket], cancelled: list[bool],
        late: str) -> None:
    """What the driver had already set in motion may still arrive after a cancel (a stream
    task's callback; a sweep failing a list of attempts, one of whose `done` cancels
    another): it starts no attempt and calls no `done`."""
    run = Run(spec)
    run.start()
    run.play(before)
    sent = len(run.wire.sent)
    run.exchange.cancel()
    assert run.wire.forgotten == forgotten
    assert [stream.cancelled for stream in run.wire.streams] == cancelled
    assert run.exchange.ticket is None
    if cancelled:
        run.event(late)
    else:
        run.exchange.udp_failed(late, run.clock())
    assert len(run.wire.sent) == sent, "no attempt after a cancel"
    assert run.exchange.results == []


def test_cancel_after_done_calls_nothing() -> None:
    run = Run(UDP2)
    run.start()
    run.event("ok")
    run.exchange.cancel()
    assert outcome(run.exchange.results) == ["ok"]
    assert run.wire.forgotten == []


# -- backoff, with selection.arrange choosing the order ---------------------------------------

SILENT_THEN_GOOD: Spec = {"a": (1.0, "udp"), "b": (1.0, "udp")}
DEAD = ["timeout", "ok"]  # a times out, b answers


def exchanges(run: Run, plays: list[tuple[float, list[str]]]) -> list[list[str]]:
    """Run one exchange per (start, events) on the same upstreams; the upstreams each asked."""
    asked = []
    for start, events in plays:
        run.exchange = run.new_exchange()
        first = len(run.wire.sent)
        run.start(start)
        run.play(events)
        assert len(run.exchange.results) == 1
        asked.append([sent.upstream for sent in run.wire.sent[first:]])
    return asked


@pytest.mark.parametrize(("later", "asked"), [
    (3.0, ["b"]),  # a failed BACKOFF.after times in a row: skipped ...
    (12.99, ["b"]),
    (13.0, ["a", "b"]),  # ... for BACKOFF.initial seconds, then probed again
    (100.0, ["a", "b"]),
])
def test_an_upstream_failing_unhealthy_after_times_is_skipped_then_probed(
        later: float, asked: list[str]) -> None:
    run = Run(SILENT_THEN_GOOD, strategy="failover")
    before = exchanges(run, [(0.0, DEAD), (1.0, ["timeout", "ok@2"]), (2.0, ["timeout", "ok"])])
    assert before == [["a", "b"]] * 3
    assert not run.health("a").healthy and run.health("a").until == START + 3 + 10
    events = DEAD if asked[0] == "a" else ["ok"]
    assert exchanges(run, [(later, events)]) == [asked]


def test_a_probe_keeps_the_others_away_and_its_failure_doubles_the_backoff() -> None:
    run = Run(SILENT_THEN_GOOD, strategy="failover")
    exchanges(run, [(0.0, DEAD), (1.0, DEAD), (2.0, DEAD)])  # backed off until 13
    probe = run.new_exchange()
    run.exchange = probe
    run.start(13.0)  # the probe goes to a ...
    assert [sent.upstream for sent in run.wire.sent[-1:]] == ["a"]
    assert exchanges(run, [(13.5, ["ok"])]) == [["b"]]  # ... and nobody else meanwhile
    run.exchange = probe
    run.play(DEAD)  # the probe fails at 14: backed off twice as long, until 34
    assert run.health("a").until == START + 14 + 20
    assert exchanges(run, [(33.9, ["ok"]), (34.0, ["ok"])]) == [["b"], ["a"]]
    assert run.health("a").healthy, "a reply makes it healthy again"


def test_servfail_never_backs_an_upstream_off() -> None:
    run = Run(SILENT_THEN_GOOD, strategy="failover")
    asked = exchanges(run, [(float(n), ["servfail", "ok"]) for n in range(2 * BACKOFF.after)])
    assert asked == [["a", "b"]] * (2 * BACKOFF.after)
    assert run.health("a").failures == 0
