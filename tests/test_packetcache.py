"""The packet cache: whole UDP answers replayed by query bytes.

The fast path must be invisible: a replayed answer is byte for byte what the full path gives
(apart from the ID), it counts the same, and it never outlives what made it (a rule change,
a TTL tick).
"""

from __future__ import annotations

import struct
from pathlib import Path

import dns.rcode
import pytest

from resolver.message.constants import NXDOMAIN, REFUSED
from resolver.message.query import Query
from resolver.ops.metrics import UNTIMED, Metrics
from resolver.server.packetcache import MAX_ANSWER, MAX_QUERY, PacketCache
from resolver.server.pipeline import TIME_EVERY
from resolver.stages.contract import DROP, LATER, Answered, Drop, Later
from tests.clock import START, FakeClock
from tests.conftest import RULES_YAML
from tests.dnsmsg import CLIENT
from tests.e2e import make_query, raw_tcp_exchange, raw_udp_answer, raw_udp_exchange
from tests.servers import ZONE

NEVER = float("inf")
A_BLOCKED = ("udp", "blocked", "A", "NXDOMAIN")


class Inner:
    """The pipeline behind the packet cache: answers each query with the next result given,
    and records what reached it."""

    def __init__(self, *results: Answered | Later | Drop):
        self.results = list(results)
        self.seen: list[bytes] = []
        self.started: list[float] = []  # when each query came, as the packet cache says

    def handle(self, data: bytes, client: tuple[str, int], sink: object, started: float
               ) -> Answered | Later | Drop:
        self.seen.append(data)
        self.started.append(started)
        return self.results.pop(0)


class Udp:
    name = "udp"

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None:
        raise AssertionError("nothing is delivered later here")


class Observer:
    def __init__(self) -> None:
        self.offered: list[tuple[object, ...]] = []

    def offer(self, *seen: object) -> None:
        self.offered.append(seen)


def layer(max_entries: int, *results: Answered | Later | Drop
          ) -> tuple[PacketCache, Inner]:
    inner = Inner(*results)
    return PacketCache(inner, max_entries, FakeClock(), Metrics().queries), inner


def ask(packets: PacketCache, data: bytes) -> bytes | None:
    return packets.handle(data, CLIENT, Udp())


def query_bytes(qid: int, name: str = "www.example.org", edns: int | None = None,
                do: bool = False) -> bytes:
    return make_query(name, "A", edns=edns, do=do, qid=qid).to_wire()


def reply(qid: int, body: bytes = b"", rcode: int = 0) -> bytes:
    """An answer as far as the packet cache reads one: an ID, the rcode, then anything."""
    return struct.pack("!HH", qid, 0x8180 | rcode) + body


# -- the cache alone ---------------------------------------------------------------------------

def test_a_remembered_answer_comes_back_with_the_new_id_and_counts():
    metrics = Metrics()
    replay = (NEVER, metrics.blocked, ("l", "", "a"))
    answer = reply(0x1234, b"answer", NXDOMAIN)
    inner = Inner(Answered(answer, "blocked", replay), LATER)
    packets = PacketCache(inner, 10, FakeClock(), metrics.queries)
    first, again = query_bytes(0x1234), query_bytes(0xABCD)
    other = query_bytes(0xABCD, "other.example.org")
    assert ask(packets, first) == answer  # from the pipeline
    assert ask(packets, again) == b"\xab\xcd" + answer[2:]  # replayed
    assert ask(packets, other) is None  # LATER: the answer comes later
    assert inner.seen == [first, other]
    assert metrics.queries.counts == {A_BLOCKED: 1}  # the pipeline counts its own
    assert metrics.blocked.counts == {("l", "", "a"): 1}


@pytest.mark.parametrize(("qtype", "rcode", "key"), [
    ("AAAA", NXDOMAIN, ("udp", "blocked", "AAAA", "NXDOMAIN")),
    ("TYPE65280", 0, ("udp", "blocked", "other", "NOERROR")),
    ("SVCB", REFUSED, ("udp", "blocked", "SVCB", "REFUSED")),
])
def test_a_replay_counts_its_question_type_and_rcode(qtype: str, rcode: int,
                                                     key: tuple[str, ...]):
    metrics = Metrics()
    inner = Inner(Answered(reply(1, b"", rcode), "blocked", (NEVER, metrics.blocked, ("l",))))
    packets = PacketCache(inner, 10, FakeClock(), metrics.queries)
    for qid in (1, 2, 3):
        ask(packets, make_query("www.example.org", qtype, qid=qid).to_wire())
    assert metrics.queries.counts == {key: 2}


def test_with_an_observer_every_replay_is_timed_and_offered():
    metrics, observer = Metrics(), Observer()
    answer = reply(1, b"answer", NXDOMAIN)
    inner = Inner(Answered(answer, "blocked", (NEVER, metrics.blocked, ("l",))))
    packets = PacketCache(inner, 10, FakeClock(), metrics.queries, observer)
    ask(packets, query_bytes(1))
    again = query_bytes(2)
    assert ask(packets, again) == b"\x00\x02" + answer[2:]
    row = metrics.queries.rows[A_BLOCKED]
    assert row[0] == 1 and sum(row[:-1]) == 1 and row[-1] == 0, "timed: the clock stood still"
    [(q, transport, outcome, sent, duration, upstream)] = observer.offered
    assert isinstance(q, Query) and (q.data, q.client) == (again, CLIENT)
    assert (transport, outcome, sent, duration, upstream) == (
        "udp", "blocked", b"\x00\x02" + answer[2:], 0.0, "")
    assert inner.started == [START], "the query it passed on was timed too"


def test_without_an_observer_one_query_in_time_every_is_timed():
    """The packet cache counts queries off: every TIME_EVERY-th, replayed or passed on, is
    timed; the rest are counted untimed (pipeline.TIME_EVERY)."""
    metrics, clock = Metrics(), FakeClock(start=50.0)
    answer = reply(1, b"answer", NXDOMAIN)
    inner = Inner(Answered(answer, "blocked", (NEVER, metrics.blocked, ("l",))))
    packets = PacketCache(inner, 10, clock, metrics.queries)
    for qid in range(1, 2 * TIME_EVERY + 1):
        ask(packets, query_bytes(qid))
    assert inner.started == [UNTIMED]  # the first query, passed on: not the 16th
    row = metrics.queries.rows[A_BLOCKED]  # the replays (the pipeline counted the first)
    assert (row[0], row[-2]) == (2, 2 * TIME_EVERY - 3), "the 16th and the 32nd timed"


@pytest.mark.parametrize(("now", "replayed"), [(104.9, True), (105.0, False), (200.0, False)])
def test_an_answer_holds_until_its_replay_time(now, replayed):
    metrics, clock = Metrics(), FakeClock(start=100.0)
    inner = Inner(Answered(reply(1, b"a"), "cached", (105.0, metrics.cache, ("hit",))),
                  Answered(reply(2, b"b"), "cached"))
    packets = PacketCache(inner, 10, clock, metrics.queries)
    ask(packets, query_bytes(1))
    clock.now = now
    assert ask(packets, query_bytes(2)) == reply(2, b"a" if replayed else b"b")


@pytest.mark.parametrize("result", [Answered(reply(1, b"A"), "cached"), LATER, DROP],
                         ids=["no-replay", "forward", "drop"])
def test_only_answers_that_say_how_long_they_hold_are_kept(result):
    packets, inner = layer(10, result, Answered(reply(2, b"B"), "cached"))
    ask(packets, query_bytes(1))
    assert len(packets) == 0
    assert ask(packets, query_bytes(2)) == reply(2, b"B") and len(inner.seen) == 2


def test_the_oldest_goes_first_and_clear_forgets_all():
    metrics = Metrics()
    replay = (NEVER, metrics.cache, ("hit",))
    names = ("a.example", "b.example", "c.example")
    inner = Inner(*(Answered(reply(1, name.encode()), "cached", replay) for name in names))
    packets = PacketCache(inner, 2, FakeClock(), metrics.queries)
    for name in names:
        ask(packets, query_bytes(1, name))
    assert len(packets) == 2
    inner.results = [LATER]
    assert [ask(packets, query_bytes(9, name)) for name in names] == [
        None, reply(9, b"b.example"), reply(9, b"c.example")]
    packets.clear()
    assert len(packets) == 0


def test_zero_entries_remembers_nothing():
    metrics = Metrics()
    packets, _ = layer(0, Answered(reply(1), "cached", (NEVER, metrics.cache, ("hit",))))
    ask(packets, query_bytes(1))
    assert len(packets) == 0


@pytest.mark.parametrize(
    ("query_size", "answer_size", "kept"),
    [(MAX_QUERY, MAX_ANSWER, True), (MAX_QUERY + 1, 100, False), (100, MAX_ANSWER + 1, False)],
)
def test_only_the_usual_sizes_are_kept(query_size: int, answer_size: int, kept: bool):
    """Whatever a client pads its queries with or however large a buffer it offers, an
    entry stays a couple of kilobytes at most."""
    metrics = Metrics()
    answer = reply(1, b"a" * (answer_size - 4))
    packets, _ = layer(10, Answered(answer, "cached", (NEVER, metrics.cache, ("hit",))))
    data = query_bytes(1)
    ask(packets, data + b"\0" * (query_size - len(data)))  # junk after the question
    assert len(packets) == int(kept)


# -- through the running server ----------------------------------------------------------------

SHAPES = [dict(), dict(edns=0), dict(edns=0, do=True)]
NAMES = ["www.example.org", "WwW.ExAmPlE.oRg", "sink.test", ZONE.www.upper()]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
async def test_a_replayed_answer_is_the_full_paths_answer(start_server, nsd_upstream, name,
                                                          shape):
    server = await start_server(nsd_upstream, clock=FakeClock())  # TTLs never tick mid-test
    await raw_udp_exchange(server, query_bytes(1, name, **shape))  # may go upstream
    full = await raw_udp_answer(server, query_bytes(2, name, **shape))  # answered locally
    assert len(server.chain.packets) == 1  # remembered
    replayed = await raw_udp_answer(server, query_bytes(4, name, **shape))
    over_tcp = await raw_tcp_exchange(server, query_bytes(5, name, **shape))  # never replayed
    assert replayed[:2] == b"\x00\x04"
    assert full[2:] == replayed[2:] == over_tcp[2:]


async def test_replays_count_like_the_full_path(start_server, nsd_upstream):
    server = await start_server(nsd_upstream)
    for qid in range(5):
        await raw_udp_exchange(server, query_bytes(qid))
    assert server.metrics.queries.counts[A_BLOCKED] == 5
    assert server.metrics.blocked.counts[("tracking", "example", "nxdomain")] == 5


async def test_a_rule_change_is_seen_at_once(start_server, nsd_upstream, tmp_path: Path):
    server = await start_server(nsd_upstream)
    blocked = await raw_udp_answer(server, query_bytes(1, "www.blocked.test"))
    assert blocked[3] & 0xF == dns.rcode.NXDOMAIN
    Path(server.config.blocking.rules[0]).write_text(RULES_YAML.replace("- blocked.test", ""))
    assert await server.reload_rules()
    after = await raw_udp_answer(server, query_bytes(2, "www.blocked.test"))
    assert after[3] & 0xF != dns.rcode.NXDOMAIN  # forwarded now (NSD: not its zone)


async def test_it_can_be_switched_off(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, cache={"packet_entries": 0})
    for qid in range(3):
        answer = await raw_udp_answer(server, query_bytes(qid))
        assert answer[3] & 0xF == dns.rcode.NXDOMAIN
    assert len(server.chain.packets) == 0
