"""Table tests of server/pipeline.py: how the stage results flow (PASS on, Answered stops,
FORWARD skips to the forwarder, DROP), what is counted under which labels, per-client passes
kept out of the packet cache, the one SERVFAIL guard, load shedding, malformed packets, and
the Delivery of later answers, each answer's duration from receipt and what the observer is
shown. The stages and the forwarder are small fakes that record what reached them, the clock
a FakeClock; no socket, no loop.
"""

from __future__ import annotations

import logging
import struct
from bisect import bisect_left

import pytest

from resolver.message.constants import (
    BADVERS,
    FORMERR,
    NEVER,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    SERVFAIL,
)
from resolver.message.query import Query
from resolver.ops.metrics import DURATION_BUCKETS, UNTIMED, Metrics, Row
from resolver.server.packetcache import PacketCache
from resolver.server.pipeline import Delivery, Pipeline
from resolver.stages.contract import (
    DROP,
    FORWARD,
    LATER,
    PASS,
    PASS_PER_CLIENT,
    Answered,
    Drop,
    Later,
    Pass,
    Result,
)
from tests.clock import START, FakeClock
from tests.dnsmsg import CLIENT, dnslib_rcode, query, query_packet, summary

# resolver_queries_total: (protocol, outcome, qtype, rcode) -> count
Counts = dict[tuple[str, ...], int]


class Sink:
    """A transport: its name is the `protocol` label; `deliver` records later answers."""

    def __init__(self, name: str = "udp"):
        self.name = name
        self.delivered: list[tuple[bytes, tuple[str, int]]] = []

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None:
        self.delivered.append((answer, client))


class Stage:
    """A stage that gives `result` for every query (raises it, if it is an exception) and
    records the queries it saw; it takes `takes` seconds of the clock, if given one."""

    def __init__(self, result: Result | Exception, clock: FakeClock | None = None,
                 takes: float = 0.0):
        self.result = result
        self.seen: list[Query] = []
        self.clock, self.takes = clock, takes

    def answer(self, q: Query) -> Result:
        self.seen.append(q)
        if self.clock is not None:
            self.clock.advance(self.takes)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class Forwarder:
    """What the pipeline reads of the forwarder: `waiting`, and `submit`."""

    def __init__(self, waiting: int = 0, error: Exception | None = None):
        self.waiting = waiting
        self.error = error
        self.submitted: list[tuple[Query, Sink]] = []

    def submit(self, q: Query, sink: Sink) -> None:
        if self.error is not None:
            raise self.error
        self.submitted.append((q, sink))


Offered = tuple[Query | None, str, str, bytes | None, float, str]  # QueryObserver.offer's


class Observer:
    """A QueryObserver that records what it is offered."""

    def __init__(self) -> None:
        self.offered: list[Offered] = []

    def offer(self, q: Query | None, transport: str, outcome: str, answer: bytes | None,
              duration: float, upstream: str) -> None:
        self.offered.append((q, transport, outcome, answer, duration, upstream))


class Chain:
    """A Pipeline over Stages giving `results` in order (each taking `takes` seconds), with
    its counts and what its observer was offered."""

    def __init__(self, *results: Result | Exception, waiting: int = 0, max_inflight: int = 10,
                 forward_error: Exception | None = None, takes: float = 0.0):
        self.metrics = Metrics()
        self.clock = FakeClock()
        self.stages = [Stage(result, self.clock, takes) for result in results]
        self.forwarder = Forwarder(waiting, forward_error)
        self.observer = Observer()
        self.pipeline = Pipeline(self.stages, self.forwarder,  # type: ignore[arg-type]
                                 self.metrics, max_inflight, self.clock, self.observer)

    def handle(self, data: bytes = b"", transport: str = "udp") -> Answered | Later | Drop:
        return self.pipeline.handle(data or query_packet("www.example.org"), CLIENT,
                                    Sink(transport))

    @property
    def counts(self) -> dict[tuple[str, ...], int]:
        return self.metrics.queries.counts

    def durations(self) -> dict[tuple[str, ...], Row]:
        """The rows of the queries counted, by their key."""
        return {key: row for key, row in self.metrics.queries.rows.items() if any(row[:-1])}

    def reached(self) -> list[int]:
        """How many queries each stage saw."""
        return [len(stage.seen) for stage in self.stages]


def answered(outcome: str = "cached", rcode: int = NOERROR, replay: bool = False
             ) -> Answered:
    """A stage's answer: a header with the rcode, then the outcome's name as a body."""
    tally = Metrics().cache
    return Answered(struct.pack("!HHHHHH", 0x1234, 0x8180 | rcode, 1, 0, 0, 0)
                    + outcome.encode(), outcome, (NEVER, tally, ("hit",)) if replay else None)


CACHED = answered("cached")
BLOCKED = answered("blocked", NXDOMAIN, replay=True)
# the keys those answers count under, for a question of type A over UDP
A_CACHED = ("udp", "cached", "A", "NOERROR")
A_BLOCKED = ("udp", "blocked", "A", "NXDOMAIN")
A_DROPPED = ("udp", "dropped", "A", "none")
A_SERVFAIL = ("udp", "servfail", "A", "SERVFAIL")


# -- results in order -------------------------------------------------------------------------

@pytest.mark.parametrize(("results", "returned", "reached", "counts", "submitted"), [
    pytest.param([PASS, PASS], LATER, [1, 1], {}, 1,
                 id="nobody answers: forwarded, counted when delivered"),
    pytest.param([CACHED, PASS], CACHED, [1, 0], {A_CACHED: 1}, 0,
                 id="Answered stops the chain and is counted"),
    pytest.param([PASS, BLOCKED, CACHED], BLOCKED, [1, 1, 0], {A_BLOCKED: 1}, 0,
                 id="the first Answered wins, replay and all"),
    pytest.param([PASS, FORWARD, CACHED], LATER, [1, 1, 0], {}, 1,
                 id="FORWARD skips the rest"),
    pytest.param([DROP, CACHED], DROP, [1, 0], {A_DROPPED: 1}, 0,
                 id="DROP is counted dropped, with no rcode"),
    pytest.param([PASS_PER_CLIENT, PASS], LATER, [1, 1], {}, 1,
                 id="a per-client pass is still a pass"),
    pytest.param([], LATER, [], {}, 1, id="no stages"),
])
def test_results_flow_in_order(results: list[Result], returned: Answered | Later | Drop,
                               reached: list[int], counts: Counts, submitted: int) -> None:
    chain = Chain(*results)
    assert chain.handle() is returned
    assert chain.reached() == reached
    assert chain.counts == counts
    assert len(chain.forwarder.submitted) == submitted


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_counts_are_by_transport_and_outcome(transport: str) -> None:
    chain = Chain(BLOCKED)
    chain.handle(transport=transport)
    chain.handle(transport=transport)
    assert chain.counts == {(transport, "blocked", "A", "NXDOMAIN"): 2}


@pytest.mark.parametrize(("qtype", "result", "key"), [
    ("AAAA", CACHED, ("tcp", "cached", "AAAA", "NOERROR")),
    ("HTTPS", BLOCKED, ("tcp", "blocked", "HTTPS", "NXDOMAIN")),
    ("NAPTR", answered("servfail", SERVFAIL), ("tcp", "servfail", "other", "SERVFAIL")),
    ("TXT", answered("cached", NOTIMP), ("tcp", "cached", "TXT", "other")),
    ("MX", DROP, ("tcp", "dropped", "MX", "none")),
])
def test_counts_are_by_question_type_and_answer_rcode(qtype: str, result: Result,
                                                      key: tuple[str, ...]) -> None:
    chain = Chain(result)
    chain.handle(query_packet("www.example.org", qtype), transport="tcp")
    assert chain.counts == {key: 1}


@pytest.mark.parametrize(("results", "returned", "key"), [
    pytest.param([CACHED], CACHED, A_CACHED, id="a cache hit"),
    pytest.param([PASS, BLOCKED], BLOCKED, A_BLOCKED, id="a block after a pass"),
    pytest.param([PASS, DROP], DROP, A_DROPPED, id="a drop"),
    pytest.param([RuntimeError("a bug")], None, A_SERVFAIL, id="a servfail after a bug"),
])
def test_a_local_answer_is_timed_counted_and_offered_to_the_observer(
        results: list[Result | Exception], returned: Answered | Drop | None,
        key: tuple[str, ...]) -> None:
    """Asked with no start time (TCP; UDP comes through the packet cache, which says), the
    pipeline reads the clock as the packet comes: an answer that took the stages 0.2 s
    counts in the bucket of the time its stages took (0.2 s each)."""
    chain = Chain(*results, takes=0.2)
    got = chain.handle()
    if returned is not None:
        assert got is returned
    expected = 0.2 * len(results)
    row = chain.durations()[key]
    assert row[bisect_left(DURATION_BUCKETS, expected)] == 1 and sum(row[:-1]) == 1
    assert row[-1] == pytest.approx(expected)
    [(q, transport, outcome, answer, took, upstream)] = chain.observer.offered
    assert q is chain.stages[0].seen[0], "the decoded query"
    assert (transport, outcome, upstream) == ("udp", key[1], "")
    assert took == pytest.approx(expected)
    assert answer == (got.data if isinstance(got, Answered) else None)


def test_an_untimed_answer_is_counted_apart_from_the_histogram() -> None:
    """started=UNTIMED (a UDP query the packet cache did not pick for timing): counted in
    queries_total, in no bucket, nothing added to the sum."""
    chain = Chain(CACHED, takes=0.2)
    chain.pipeline.handle(query_packet("www.example.org"), CLIENT, Sink("udp"), UNTIMED)
    row = chain.durations()[A_CACHED]
    assert row[-2] == 1 and sum(row[:-2]) == 0 and row[-1] == 0
    assert chain.counts == {A_CACHED: 1}


def test_a_query_gone_upstream_is_timed_from_when_its_packet_came() -> None:
    chain = Chain(PASS, takes=0.001)
    chain.clock.at(5.0)
    assert chain.handle() is LATER
    [(q, _)] = chain.forwarder.submitted
    assert q.received == START + 5.0, "before the stages that passed it on"


def test_an_untimed_query_gone_upstream_is_timed_from_its_hand_over() -> None:
    """A UDP query the packet cache did not pick for timing is still timed if it waits on
    an upstream: from when the stages handed it over."""
    chain = Chain(PASS, takes=0.001)
    chain.clock.at(5.0)
    sink = Sink("udp")
    assert chain.pipeline.handle(query_packet("www.example.org"), CLIENT, sink, UNTIMED) is LATER
    [(q, _)] = chain.forwarder.submitted
    assert q.received == START + 5.001
    assert chain.observer.offered == [] and chain.counts == {}


def test_a_broken_observer_costs_no_answer(caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    chain = Chain(CACHED)

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in the query log")

    monkeypatch.setattr(chain.observer, "offer", broken)
    assert chain.handle() is CACHED
    assert chain.counts == {A_CACHED: 1}
    assert "unexpected error in the query observer" in caplog.text


def test_the_forwarder_gets_the_decoded_query_and_its_sink() -> None:
    chain = Chain(PASS)
    sink = Sink("tcp")
    packet = query_packet("WWW.Example.org", "AAAA", qid=0x4321, edns=True)
    assert chain.pipeline.handle(packet, CLIENT, sink) is LATER
    [(q, given)] = chain.forwarder.submitted
    assert given is sink
    assert (q.data, q.client, q.transport, q.edns) == (packet, CLIENT, "tcp", True)
    assert chain.stages[0].seen == [q], "decoded once, the same Query for every stage"


# -- per-client answers and the packet cache --------------------------------------------------

@pytest.mark.parametrize(("results", "replayed"), [
    pytest.param([BLOCKED], True, id="an answer that holds for everyone is replayed"),
    pytest.param([PASS, BLOCKED], True, id="after a plain pass too"),
    pytest.param([PASS_PER_CLIENT, BLOCKED], False,
                 id="after a per-client pass: the answer loses its replay"),
    pytest.param([PASS_PER_CLIENT, PASS, BLOCKED], False, id="however far down"),
    pytest.param([CACHED], False, id="an answer without a replay is never kept"),
])
def test_per_client_answers_are_kept_out_of_the_packet_cache(results: list[Result],
                                                             replayed: bool) -> None:
    chain = Chain(*results)
    last = results[-1]
    assert isinstance(last, Answered)
    first = chain.handle()
    assert isinstance(first, Answered)
    assert first.data == last.data and first.outcome == last.outcome
    assert (first.replay is not None) == replayed
    packets = PacketCache(chain.pipeline, 10, FakeClock(), chain.metrics.queries)
    sent = [packets.handle(query_packet("www.example.org", qid=qid), CLIENT, Sink()) or b""
            for qid in (1, 2)]
    assert [answer[2:] for answer in sent] == [last.data[2:]] * 2
    assert len(packets) == int(replayed)
    if replayed:
        assert sent[1][:2] == b"\x00\x02", "replayed with the new query's ID"
    # the stage answered handle() above, the packet cache's first query, and its second
    # unless that was replayed
    assert chain.reached()[-1] == 2 + (not replayed)


# -- the guard, shedding, malformed input ----------------------------------------------------

@pytest.mark.parametrize(("results", "forward_error", "reached"), [
    pytest.param([RuntimeError("a bug in a stage"), CACHED], None, [1, 0], id="a stage"),
    pytest.param([PASS, KeyError("a bug in a later stage")], None, [1, 1], id="a later one"),
    pytest.param([PASS], OSError("the socket is closed"), [1], id="the forwarder's submit"),
])
def test_an_exception_becomes_a_counted_servfail(
        results: list[Result | Exception], forward_error: Exception | None, reached: list[int],
        caplog: pytest.LogCaptureFixture) -> None:
    chain = Chain(*results, forward_error=forward_error)
    with caplog.at_level(logging.ERROR):
        got = chain.handle(query_packet("www.example.org", qid=0x0BAD, edns=True))
    assert isinstance(got, Answered) and got.outcome == "servfail" and got.replay is None
    message = summary(got.data)
    assert (message.id, message.rcode, message.question) == (
        0x0BAD, SERVFAIL, (("www.example.org.", "A", "IN"),))
    assert chain.reached() == reached
    assert chain.counts == {A_SERVFAIL: 1}
    [record] = caplog.records
    assert record.getMessage() == "unexpected error while answering a query"
    assert record.exc_info is not None, "logged with its traceback"


@pytest.mark.parametrize(("waiting", "max_inflight", "returned", "counts"), [
    (0, 3, LATER, {}),
    (2, 3, LATER, {}),
    (3, 3, DROP, {A_DROPPED: 1}),  # shed: no memory grows for it
    (5, 3, DROP, {A_DROPPED: 1}),
])
def test_load_is_shed_at_max_inflight(waiting: int, max_inflight: int,
                                      returned: Later | Drop, counts: Counts) -> None:
    chain = Chain(PASS, waiting=waiting, max_inflight=max_inflight)
    assert chain.handle() is returned
    assert chain.counts == counts
    assert len(chain.forwarder.submitted) == (returned is LATER)


def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0x5151, flags, qd, an, ns, ar)


QUESTION = b"\x07example\x03org\x00\x00\x01\x00\x01"


# the question type is read off the bytes as far as they go (as the front counts them)
@pytest.mark.parametrize(("packet", "rcode", "label", "qtype"), [
    pytest.param(b"\x51\x51\x01", None, "none", "other", id="shorter than a header: dropped"),
    pytest.param(header(flags=0x8180) + QUESTION, None, "none", "A", id="a response: dropped"),
    pytest.param(header(qd=0), FORMERR, "FORMERR", "other", id="no question"),
    pytest.param(header(qd=2) + QUESTION * 2, FORMERR, "FORMERR", "A", id="two questions"),
    pytest.param(header() + QUESTION[:5], FORMERR, "FORMERR", "other", id="name cut short"),
    pytest.param(header() + b"\xc0\x0c\x00\x01\x00\x01", FORMERR, "FORMERR", "A",
                 id="compressed question"),
    pytest.param(header(flags=0x2800) + QUESTION, NOTIMP, "other", "A", id="an UPDATE"),
    # BADVERS is an extended rcode: the header's four bits say NOERROR
    pytest.param(query_packet("www.example.org", qid=0x5151, edns=True)[:-11]
                 + b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00", BADVERS, "NOERROR",
                 "A", id="EDNS version 1"),
])
def test_malformed_packets_get_formerr_or_nothing(packet: bytes, rcode: int | None,
                                                  label: str, qtype: str) -> None:
    chain = Chain(CACHED)
    got = chain.handle(packet)
    assert chain.reached() == [0], "no stage sees a malformed packet"
    if rcode is None:
        assert got is DROP
        assert chain.counts == {("udp", "dropped", qtype, "none"): 1}
    else:
        assert isinstance(got, Answered) and got.outcome == "formerr"
        assert dnslib_rcode(got.data) == (0x5151, rcode)
        assert chain.counts == {("udp", "formerr", qtype, label): 1}
    [(q, _, outcome, answer, _, _)] = chain.observer.offered
    assert (q, outcome) == (None, "dropped" if rcode is None else "formerr"), "undecoded"
    assert answer == (None if rcode is None else got.data)  # type: ignore[union-attr]
    assert chain.forwarder.submitted == []


# -- later answers ---------------------------------------------------------------------------

@pytest.mark.parametrize(("transport", "qtype", "outcome", "rcode", "upstream", "key"), [
    ("udp", "A", "forwarded", NOERROR, "192.0.2.53:53", ("udp", "forwarded", "A", "NOERROR")),
    ("tcp", "AAAA", "stale", NOERROR, "", ("tcp", "stale", "AAAA", "NOERROR")),
    ("udp", "SRV", "servfail", SERVFAIL, "", ("udp", "servfail", "SRV", "SERVFAIL")),
    ("tcp", "A", "blocked", NXDOMAIN, "192.0.2.53:53", ("tcp", "blocked", "A", "NXDOMAIN")),
])
def test_delivery_counts_times_offers_then_hands_the_answer_to_the_sink(
        transport: str, qtype: str, outcome: str, rcode: int, upstream: str,
        key: tuple[str, ...]) -> None:
    metrics, clock, observer = Metrics(), FakeClock(), Observer()
    sink = Sink(transport)
    q = query("www.example.org", qtype, transport=transport)
    q.received = clock() - 0.03  # 30 ms ago
    answer = answered(outcome, rcode).data
    Delivery(metrics, clock, observer).deliver(q, sink, answer, outcome, upstream)
    assert sink.delivered == [(answer, CLIENT)]
    assert metrics.queries.counts == {key: 1}
    row = metrics.queries.rows[key]
    assert row[10] == 1 and row[-1] == pytest.approx(0.03), "in the 50 ms bucket"
    [(seen, *shown, duration, by)] = observer.offered
    assert (seen, *shown, by) == (q, transport, outcome, answer, upstream)
    assert duration == pytest.approx(0.03)


@pytest.mark.parametrize("odd", [None, b"forward", LATER], ids=["None", "sentinel bytes", "LATER"])
def test_a_result_that_is_no_stage_result_is_a_bug_answered_servfail(
        odd: object, caplog: pytest.LogCaptureFixture) -> None:
    """A stage returning something the contract does not know must not silence the client."""
    chain = Chain(odd, CACHED)  # type: ignore[arg-type]  # the mistake under test
    result = chain.handle()
    assert isinstance(result, Answered) and result.outcome == "servfail"
    assert chain.counts == {A_SERVFAIL: 1}
    assert "no stage result" in caplog.text


def test_a_fresh_pass_object_is_honoured_like_the_singletons() -> None:
    chain = Chain(Pass(True), BLOCKED)
    result = chain.handle()
    assert isinstance(result, Answered) and result.replay is None
