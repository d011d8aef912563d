"""The packet cache: whole UDP answers replayed by query bytes.

The fast path must be invisible: a replayed answer is byte for byte what the full path gives
(apart from the ID), it counts the same, and it never outlives what made it (a rule change,
a TTL tick).
"""

from __future__ import annotations

from pathlib import Path

import dns.rcode
import pytest

from resolver.ops.metrics import Metrics
from resolver.stages.packetcache import MAX_ANSWER, MAX_QUERY, PacketCache
from tests.conftest import RULES_YAML
from tests.e2e import make_query, raw_tcp_exchange, raw_udp_exchange
from tests.servers import ZONE

NEVER = float("inf")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def query_bytes(qid: int, name: str = "www.example.org", edns: int | None = None,
                do: bool = False) -> bytes:
    return make_query(name, "A", edns=edns, do=do, qid=qid).to_wire()


# -- the cache alone ---------------------------------------------------------------------------

def test_a_remembered_answer_comes_back_with_the_new_id_and_counts():
    metrics, clock = Metrics(), Clock()
    packets = PacketCache(10, clock, metrics.queries)
    answer = b"\x12\x34" + b"answer"
    packets.remember(b"\x12\x34query", answer, "blocked", (NEVER, metrics.blocked, ("l", "", "a")))
    assert packets.answer(b"\xab\xcdquery") == b"\xab\xcd" + b"answer"
    assert packets.answer(b"\xab\xcdother") is None
    assert metrics.queries.counts == {("udp", "blocked"): 1}
    assert metrics.blocked.counts == {("l", "", "a"): 1}


@pytest.mark.parametrize(("now", "replayed"), [(104.9, True), (105.0, False), (200.0, False)])
def test_an_answer_holds_until_its_memo_time(now, replayed):
    metrics, clock = Metrics(), Clock()
    packets = PacketCache(10, clock, metrics.queries)
    packets.remember(b"\x00\x01q", b"\x00\x01a", "cached", (105.0, metrics.cache, ("hit",)))
    clock.now = now
    assert (packets.answer(b"\x00\x02q") is not None) == replayed


def test_the_oldest_goes_first_and_clear_forgets_all():
    metrics = Metrics()
    packets = PacketCache(2, Clock(), metrics.queries)
    memo = (NEVER, metrics.cache, ("hit",))
    for name in (b"a", b"b", b"c"):
        packets.remember(b"id" + name, b"id" + name.upper(), "cached", memo)
    assert [packets.answer(b"xx" + n) for n in (b"a", b"b", b"c")] == [None, b"xxB", b"xxC"]
    packets.clear()
    assert len(packets) == 0 and packets.answer(b"xxb") is None


def test_zero_entries_remembers_nothing():
    metrics = Metrics()
    packets = PacketCache(0, Clock(), metrics.queries)
    packets.remember(b"idq", b"ida", "cached", (NEVER, metrics.cache, ("hit",)))
    assert len(packets) == 0


@pytest.mark.parametrize(
    ("query_size", "answer_size", "kept"),
    [(MAX_QUERY, MAX_ANSWER, True), (MAX_QUERY + 1, 100, False), (100, MAX_ANSWER + 1, False)],
)
def test_only_the_usual_sizes_are_kept(query_size: int, answer_size: int, kept: bool):
    """Whatever a client pads its queries with or however large a buffer it offers, an
    entry stays a couple of kilobytes at most."""
    metrics = Metrics()
    packets = PacketCache(10, Clock(), metrics.queries)
    query, answer = b"id" + b"q" * (query_size - 2), b"id" + b"a" * (answer_size - 2)
    packets.remember(query, answer, "cached", (NEVER, metrics.cache, ("hit",)))
    assert len(packets) == int(kept)


# -- through the running server ----------------------------------------------------------------

SHAPES = [dict(), dict(edns=0), dict(edns=0, do=True)]
NAMES = ["www.example.org", "WwW.ExAmPlE.oRg", "sink.test", ZONE.www.upper()]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
async def test_a_replayed_answer_is_the_full_paths_answer(start_server, nsd_upstream, name,
                                                          shape):
    server = await start_server(nsd_upstream, clock=Clock())  # TTLs never tick mid-test
    await raw_udp_exchange(server, query_bytes(1, name, **shape))  # may go upstream
    full = await raw_udp_exchange(server, query_bytes(2, name, **shape))  # answered locally
    assert server.pipeline.packets.answer(query_bytes(3, name, **shape)) is not None
    replayed = await raw_udp_exchange(server, query_bytes(4, name, **shape))
    over_tcp = await raw_tcp_exchange(server, query_bytes(5, name, **shape))  # never replayed
    assert replayed[:2] == b"\x00\x04"
    assert full[2:] == replayed[2:] == over_tcp[2:]


async def test_replays_count_like_the_full_path(start_server, nsd_upstream):
    server = await start_server(nsd_upstream)
    for qid in range(5):
        await raw_udp_exchange(server, query_bytes(qid))
    assert server.metrics.queries.counts[("udp", "blocked")] == 5
    assert server.metrics.blocked.counts[("tracking", "example", "nxdomain")] == 5


async def test_a_rule_change_is_seen_at_once(start_server, nsd_upstream, tmp_path: Path):
    server = await start_server(nsd_upstream)
    blocked = await raw_udp_exchange(server, query_bytes(1, "www.blocked.test"))
    assert blocked[3] & 0xF == dns.rcode.NXDOMAIN
    Path(server.config.blocking.rules[0]).write_text(RULES_YAML.replace("- blocked.test", ""))
    assert await server.reload_rules()
    after = await raw_udp_exchange(server, query_bytes(2, "www.blocked.test"))
    assert after[3] & 0xF != dns.rcode.NXDOMAIN  # forwarded now (NSD: not its zone)


async def test_it_can_be_switched_off(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, cache={"packet_entries": 0})
    for qid in range(3):
        answer = await raw_udp_exchange(server, query_bytes(qid))
        assert answer[3] & 0xF == dns.rcode.NXDOMAIN
    assert len(server.pipeline.packets) == 0
