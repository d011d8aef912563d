"""Table tests for resolver/cache.py with an injected clock: ages, expiry, LRU bounds on
entries and bytes, prefetch, serve-stale, failure caching, CNAME verdicts, and the lookup
stages' answers and tallies."""

from __future__ import annotations

from dataclasses import replace
from typing import Unpack

import pytest
from prometheus_client import CollectorRegistry

from resolver.message import constants, wire
from resolver.message.query import Query
from resolver.message.reply import Reply, TtlPolicy, failure, scan_reply
from resolver.ops.config import CacheConfig
from resolver.ops.metrics import Metrics
from resolver.rules.model import Rule, RuleList
from resolver.stages.cache import ENTRY_OVERHEAD, Cache, CacheLookup, Inspect
from resolver.stages.contract import FORWARD, PASS, Answered
from resolver.stages.prefetch import Prefetch
from resolver.stages.stale import ServeStale
from tests.clock import START, FakeClock
from tests.dnsmsg import Asked, Edns, Said, query, response, summary

CONFIG = CacheConfig(max_entries=10)
SOA = "example.org. 60 IN SOA ns.example.org. h.example.org. 1 2 3 4 60"
CLOAK = (Rule(RuleList("tracking")), b"\x07example\x03org\x00")


def reply_for(name: str = "www.example.org", ttl: int = 300, **kwargs: Unpack[Said]) -> Reply:
    """A scanned upstream reply: one A record with `ttl`, or what kwargs describe."""
    if not kwargs:
        kwargs = {"answer": (f"{name}. {ttl} IN A 192.0.2.1",)}
    data = response(name, **kwargs)
    return scan_reply(data, wire.skip_name(data, 12) + 4, TtlPolicy())


class Harness:
    """A cache, its clock and tallies, the lookup stages, and the prefetches they asked for."""

    def __init__(self, config: CacheConfig = CONFIG, inspect: Inspect = lambda targets: None,
                 registry: CollectorRegistry | None = None):
        self.clock, self.metrics = FakeClock(), Metrics(registry)
        self.cache = Cache(config, self.metrics, self.clock, inspect)
        self.prefetched: list[Query] = []
        self.lookup = CacheLookup(self.cache, self.metrics,
                                  Prefetch(config, self.metrics, self._refresh))
        self.stale = ServeStale(self.cache, config, self.metrics)

    def _refresh(self, q: Query) -> bool:
        self.prefetched.append(q)
        return True

    def put(self, name: str, reply: Reply | None = None, **client: Unpack[Asked]) -> Query:
        q = query(name, **client)
        self.cache.put(q.cache_key, reply or reply_for(name))
        return q

    def ask(self, name: str, **client: Unpack[Asked]) -> bytes | None:
        """The stage's answer, or None when it has none (passing on, or straight upstream)."""
        result = self.lookup.answer(query(name, **client))
        return result.data if isinstance(result, Answered) else None

    def hit(self, name: str) -> bytes:
        """The stage's answer, which there must be."""
        answer = self.ask(name)
        assert answer is not None, f"no answer for {name}"
        return answer

    @property
    def counts(self) -> dict[tuple[str, ...], int]:
        return self.metrics.cache.counts


def answer_ttl(answer: bytes | None) -> int:
    assert answer is not None, "no answer"
    return summary(answer).ttls()[0]


@pytest.mark.parametrize(
    ("elapsed", "ttl"),
    [
        (0, 300),
        (0.4, 300),
        (0.999, 300),
        (1, 299),
        (1.5, 299),
        (150, 150),
        (299.999, 1),
        (300, None),  # a reply lives exactly its TTL
        (300.5, None),
        (10**6, None),
    ],
)
def test_hit_counts_ttl_down_in_whole_seconds_until_expiry(elapsed: float, ttl: int | None) -> None:
    h = Harness(replace(CONFIG, prefetch=False))
    h.put("www.example.org")
    h.clock.advance(elapsed)
    answer = h.ask("www.example.org")
    if ttl is None:
        assert answer is None
        assert h.counts == {("stored",): 1, ("expired",): 1, ("miss",): 1}
    else:
        assert answer_ttl(answer) == ttl
        assert h.counts == {("stored",): 1, ("hit",): 1}


@pytest.mark.parametrize(
    ("serve_stale", "stale_window", "elapsed", "kept"),
    [
        (True, 100, 300, True),  # just expired: kept for serve-stale
        (True, 100, 399, True),
        (True, 100, 400, False),  # past the stale window: dropped
        (False, 100, 300, False),
        (True, 0, 300, False),
    ],
)
def test_expired_entries_are_kept_only_for_the_stale_window(serve_stale: bool, stale_window: int,
                                                            elapsed: float, kept: bool) -> None:
    h = Harness(replace(CONFIG, serve_stale=serve_stale, stale_window=stale_window))
    q = h.put("www.example.org")
    h.clock.advance(elapsed)
    assert h.ask("www.example.org") is None  # never a hit once expired
    assert len(h.cache) == int(kept)
    assert (h.stale.fallback(q.cache_key) is not None) == kept


@pytest.mark.parametrize(
    ("ops", "kept", "evicted"),
    [
        (["put a", "put b"], ["a", "b"], 0),
        (["put a", "put b", "put c"], ["b", "c"], 1),
        (["put a", "put b", "get a", "put c"], ["a", "c"], 1),  # a hit counts as a use
        (["put a", "put b", "get b", "put c"], ["b", "c"], 1),
        (["put a", "put b", "put a", "put c"], ["a", "c"], 1),  # so does storing again
        (["put a", "put b", "get x", "put c", "put d"], ["c", "d"], 2),
        (["put a", "put a", "put a"], ["a"], 0),
    ],
)
def test_lru_eviction_by_entries(ops: list[str], kept: list[str], evicted: int) -> None:
    h = Harness(replace(CONFIG, max_entries=2))
    for op in ops:
        verb, key = op.split()
        if verb == "put":
            h.put(f"{key}.example.org")
        else:
            h.ask(f"{key}.example.org")
    assert len(h.cache) == len(kept)
    for key in "abcd":
        assert (h.ask(f"{key}.example.org") is not None) == (key in kept)
    assert h.counts.get(("evicted",), 0) == evicted


def big_reply(name: str, records: int) -> Reply:
    """An answer of `records` TXT records of 100 bytes of text each."""
    text = "x" * 100
    return reply_for(name, answer=tuple(f'{name}. 300 IN TXT "{text}"' for _ in range(records)))


def size(records: int) -> int:
    """What an answer of big_reply(records) counts against max_bytes."""
    return len(big_reply("a.example.org", records).body) + ENTRY_OVERHEAD


@pytest.mark.parametrize(
    ("records", "budget", "kept"),
    [
        ([10, 10, 10], 3 * size(10), "abc"),
        ([10, 10, 10], 3 * size(10) - 1, "bc"),  # the least recently used goes first
        ([10, 10, 30], size(10) + size(30) - 1, "c"),  # a big answer pushes out what it needs
        ([30, 10, 10], size(30) + size(10), "bc"),
        ([10, 100], size(100) - 1, "a"),  # larger than the whole budget: not stored at all
    ],
)
def test_lru_eviction_by_bytes(records: list[int], budget: int, kept: str) -> None:
    h = Harness(replace(CONFIG, max_bytes=budget))
    for key, count in zip("abc", records, strict=False):
        h.put(f"{key}.example.org", big_reply(f"{key}.example.org", count))
    assert "".join(key for key in "abc" if h.ask(f"{key}.example.org") is not None) == kept
    assert h.cache.bytes == sum(entry.size for entry in h.cache.entries.values()) <= budget


def test_storing_again_replaces_the_bytes_it_counted() -> None:
    h = Harness()
    h.put("a.example.org", big_reply("a.example.org", 20))
    h.put("a.example.org", big_reply("a.example.org", 1))
    assert h.cache.bytes == len(big_reply("a.example.org", 1).body) + ENTRY_OVERHEAD


@pytest.mark.parametrize(
    ("config", "kwargs", "lifetime"),
    [
        (CONFIG, {"answer": ("www.example.org. 300 IN A 192.0.2.1",)}, 300),
        (replace(CONFIG, max_entries=0), {"answer": ("www.example.org. 300 IN A 192.0.2.1",)},
         None),  # cache disabled
        (CONFIG, {"answer": ("www.example.org. 0 IN A 192.0.2.1",)}, None),  # ttl 0
        (CONFIG, {"rcode": constants.SERVFAIL}, 5),  # servfail_ttl
        (CONFIG, {"rcode": constants.REFUSED}, None),
        # NODATA without an SOA
        (CONFIG, {"authority": ("example.org. 3600 IN NS ns.example.org.",)}, None),
        (CONFIG, {"rcode": constants.NXDOMAIN, "authority": (SOA,)}, 60),
        (CONFIG, {"authority": (SOA,)}, 60),  # NODATA
    ],
)
def test_put_stores_only_cacheable_replies(config: CacheConfig, kwargs: Said,
                                           lifetime: int | None) -> None:
    h = Harness(config)
    h.put("www.example.org", reply_for(**kwargs))
    assert len(h.cache) == int(lifetime is not None)
    assert h.counts == ({("stored",): 1} if lifetime else {})
    if lifetime:
        h.clock.advance(lifetime - 1)
        assert h.ask("www.example.org") is not None
        h.clock.advance(1)
        assert h.ask("www.example.org") is None


def test_an_uncacheable_answer_replaces_the_kept_one() -> None:
    """The upstream's latest word was NODATA (no SOA, so not cached): the older answer is
    not kept to be served stale when the upstream later fails."""
    h = Harness()
    q = h.put("www.example.org", reply_for(ttl=100))
    h.clock.advance(101)
    h.cache.put(q.cache_key, reply_for(authority=("example.org. 3600 IN NS ns.example.org.",)))
    assert len(h.cache) == 0 and h.cache.bytes == 0
    assert h.stale.fallback(q.cache_key) is None


def test_storing_again_restarts_the_age() -> None:
    h = Harness()
    h.put("www.example.org", reply_for(ttl=100))
    h.clock.advance(90)
    h.put("www.example.org", reply_for(ttl=100))
    h.clock.advance(50)
    assert answer_ttl(h.ask("www.example.org")) == 50


@pytest.mark.parametrize(
    ("client", "hit"),
    [
        ({}, True),
        ({"qid": 0xABCD}, True),
        ({"edns": True}, True),  # EDNS without DO shares the answer
        ({"edns": True, "udp": 4096}, True),
        ({"rd": False}, True),
        ({"edns": True, "do": True}, False),  # DO and CD answers are kept apart
        ({"cd": True}, False),
    ],
)
def test_lookup_serves_other_clients_of_the_same_question(client: Asked, hit: bool) -> None:
    h = Harness()
    h.put("www.example.org")
    h.clock.advance(42.7)
    answer = h.ask("WWW.Example.org", **client)
    assert (answer is not None) == hit
    assert h.counts == {("stored",): 1, ("hit" if hit else "miss",): 1}
    if hit:
        assert answer is not None
        got = summary(answer)
        assert got.id == client.get("qid", 0x1234)
        assert got.question == (("WWW.Example.org.", "A", "IN"),)
        assert got.answer == (("www.example.org.", 258, "IN", "A", "192.0.2.1"),)
        assert got.edns == ((0, 1232, False, ()) if client.get("edns") else None)


def test_only_a_question_the_cache_knows_nothing_of_goes_straight_upstream() -> None:
    """FORWARD skips the stages that look at cache entries (CNAME verdicts, stale answers):
    with no entry at all they cannot answer. An expired entry still passes on to them."""
    h = Harness(replace(CONFIG, prefetch=False))
    assert h.lookup.answer(query("a.example.org")) is FORWARD
    h.put("a.example.org", reply_for("a.example.org", ttl=60))
    h.clock.advance(60)
    assert h.lookup.answer(query("a.example.org")) is PASS


def test_lookup_tallies_through_a_lifetime() -> None:
    h = Harness(replace(CONFIG, max_entries=1, prefetch=False))
    assert h.ask("a.example.org") is None  # miss
    h.put("a.example.org", reply_for("a.example.org", ttl=60))  # stored
    assert h.ask("a.example.org") is not None  # hit
    h.clock.advance(59)
    assert answer_ttl(h.ask("a.example.org")) == 1  # hit, one second left
    h.clock.advance(1)
    assert h.ask("a.example.org") is None  # expired and miss (kept for serve-stale)
    h.put("a.example.org", reply_for("a.example.org", ttl=60))  # stored
    h.put("b.example.org", reply_for("b.example.org", ttl=60))  # stored, a evicted
    assert h.ask("a.example.org") is None  # miss
    assert h.ask("b.example.org") is not None  # hit
    assert h.counts == {("miss",): 3, ("stored",): 3, ("hit",): 3,
                        ("expired",): 1, ("evicted",): 1}


def test_cache_gauges() -> None:
    registry = CollectorRegistry()
    h = Harness(replace(CONFIG, max_entries=2), registry=registry)
    assert registry.get_sample_value("resolver_cache_entries") == 0
    assert registry.get_sample_value("resolver_cache_bytes") == 0
    for key in "abc":
        h.put(f"{key}.example.org")
    assert registry.get_sample_value("resolver_cache_entries") == 2
    assert registry.get_sample_value("resolver_cache_bytes") == h.cache.bytes > 2 * ENTRY_OVERHEAD
    assert registry.get_sample_value("resolver_cache_total", {"result": "evicted"}) == 1


# -- prefetch ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("config", "hits", "prefetch_at"),
    [
        # TTL 100, default window 10%: hits from second 90 on may prefetch, from the 3rd hit on
        (CONFIG, [0, 10, 90], 90),
        (CONFIG, [0, 10, 89.9, 95], 95),
        (CONFIG, [0, 89.9], None),  # window not reached
        (CONFIG, [91, 92, 93, 94], 93),  # third hit, and only once
        (CONFIG, [0, 95], None),  # too few hits: not popular
        (replace(CONFIG, prefetch_min_hits=1), [95], 95),
        (replace(CONFIG, prefetch_window=0.5), [0, 10, 50], 50),
        (replace(CONFIG, prefetch=False), [0, 10, 95, 99], None),
        (CONFIG, [0, 10, 99.9, 100], 99.9),  # the last hit is past expiry: a miss
    ],
)
def test_prefetch_once_for_a_popular_answer_close_to_expiry(config: CacheConfig, hits: list[float],
                                                            prefetch_at: float | None) -> None:
    h = Harness(config)
    h.put("www.example.org", reply_for(ttl=100))
    for elapsed in hits:
        h.clock.at(elapsed)
        answer = h.ask("www.example.org")
        assert (answer is not None) == (elapsed < 100), "prefetch never delays the hit"
        if elapsed == prefetch_at:
            assert [q.question for q in h.prefetched] == [query("www.example.org").question]
            h.prefetched.clear()
    assert h.prefetched == []


def test_a_refreshed_answer_can_be_prefetched_again() -> None:
    h = Harness(replace(CONFIG, prefetch_min_hits=1))
    h.put("www.example.org", reply_for(ttl=100))
    h.clock.at(95)
    h.ask("www.example.org")
    h.put("www.example.org", reply_for(ttl=100))  # what the prefetch brings back
    h.clock.at(95 + 95)
    h.ask("www.example.org")
    assert len(h.prefetched) == 2


def test_failures_are_not_prefetched() -> None:
    h = Harness(replace(CONFIG, prefetch_min_hits=1, servfail_ttl=10))
    h.put("www.example.org", failure(TtlPolicy(servfail_ttl=10)))
    h.clock.at(9.5)
    assert summary(h.hit("www.example.org")).rcode == constants.SERVFAIL
    assert h.prefetched == []


# -- failures and serve-stale ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("stored", "elapsed", "servfail_ttl", "after"),
    [
        (None, 0, 5, "failure"),  # nothing cached: the failure is, for servfail_ttl
        (None, 0, 0, "nothing"),
        ("answer", 50, 5, "answer"),  # still fresh (a failed prefetch): left alone
        ("answer", 300, 5, "stale"),  # expired: served stale from the cache for a while
        ("answer", 300, 0, "answer"),  # ... unless servfail_ttl is 0
        ("answer", 300 + 86400, 5, "failure"),  # past the stale window
        ("failure", 10, 5, "failure"),  # an expired failure is replaced by the new one
    ],
)
def test_failed_keeps_answers_and_caches_failures(stored: str | None, elapsed: float,
                                                 servfail_ttl: int, after: str) -> None:
    h = Harness(replace(CONFIG, servfail_ttl=servfail_ttl))
    policy = TtlPolicy(servfail_ttl=servfail_ttl)
    q = query("www.example.org")
    if stored == "answer":
        h.put("www.example.org")
    elif stored == "failure":
        h.put("www.example.org", failure(TtlPolicy(servfail_ttl=5)))
    h.clock.at(elapsed)
    h.stale.failed(q.cache_key, failure(policy))
    entry = h.cache.entries.get(q.cache_key)
    if after == "nothing":
        assert entry is None
    elif after == "failure":
        assert entry is not None
        assert entry.reply.rcode == constants.SERVFAIL and entry.expires == START + elapsed + 5
        assert summary(h.hit("www.example.org")).rcode == constants.SERVFAIL
    else:
        assert entry is not None
        assert entry.reply.rcode == constants.NOERROR
        assert (h.stale.answer(q) is not PASS) == (after == "stale")


@pytest.mark.parametrize(
    ("client", "edns"),
    [({}, None), ({"edns": True}, (0, 1232, False, ((15, b"\x00\x03"),))),
     ({"edns": True, "do": True}, (0, 1232, True, ((15, b"\x00\x03"),)))],
)
def test_stale_lookup_answers_while_the_refresh_keeps_failing(client: Asked,
                                                              edns: Edns | None) -> None:
    h = Harness(replace(CONFIG, stale_ttl=30, servfail_ttl=5))
    cname = ("www.example.org. 3600 IN CNAME edge.example.net.",
             "edge.example.net. 300 IN A 192.0.2.7")
    q = h.put("www.example.org", reply_for(answer=cname), **client)
    h.clock.at(400)
    assert h.stale.answer(q) is PASS  # expired, but no failure yet: ask upstream first
    h.stale.failed(q.cache_key, failure(TtlPolicy()))
    h.clock.at(404.9)
    stale = h.stale.answer(q)
    assert isinstance(stale, Answered) and stale.replay is None
    got = summary(stale.data)
    assert got.rcode == constants.NOERROR and got.id == 0x1234
    assert got.answer == (("edge.example.net.", 30, "IN", "A", "192.0.2.7"),
                          ("www.example.org.", 30, "IN", "CNAME", "edge.example.net."))
    assert got.edns == edns  # Extended DNS Error 3, Stale Answer (RFC 8914)
    h.clock.at(405)  # the failure recheck is over: upstream gets asked again
    assert h.stale.answer(q) is PASS
    assert h.counts[("stale",)] == 1


@pytest.mark.parametrize(
    ("kind", "servable"),
    [("answer", True), ("negative", True), ("failure", False), ("cloaked", False)],
)
def test_what_may_be_served_stale(kind: str, servable: bool) -> None:
    h = Harness(inspect=lambda targets: CLOAK)
    reply = {
        "answer": reply_for(),
        "negative": reply_for(rcode=constants.NXDOMAIN, authority=(SOA,)),
        "failure": failure(TtlPolicy()),
        "cloaked": reply_for(answer=("www.example.org. 300 IN CNAME t.example.org.",
                                     "t.example.org. 300 IN A 192.0.2.1")),
    }[kind]
    q = h.put("www.example.org", reply)
    assert reply.ttl is not None
    h.clock.at(reply.ttl)
    assert (h.stale.fallback(q.cache_key) is not None) == servable


# -- CNAME verdicts -----------------------------------------------------------------------------

CHAIN = ("www.example.test. 300 IN CNAME cdn.example.net.",
         "cdn.example.net. 300 IN CNAME t.tracker.example.",
         "t.tracker.example. 300 IN A 192.0.2.9")


def test_cname_verdict_is_kept_and_rechecked_when_the_rules_change() -> None:
    blocked: set[bytes] = set()
    seen: list[tuple[bytes, ...]] = []

    def inspect(targets: tuple[bytes, ...]):
        seen.append(targets)
        return CLOAK if blocked & set(targets) else None

    h = Harness(inspect=inspect)
    h.put("www.example.test", reply_for("www.example.test", answer=CHAIN))
    h.put("plain.example.test")
    assert seen == [(b"\x03cdn\x07example\x03net\x00", b"\x01t\x07tracker\x07example\x00")]
    assert h.ask("www.example.test") is not None  # allowed chain: a plain hit

    blocked.add(b"\x01t\x07tracker\x07example\x00")  # a reload blocks the target
    h.cache.recheck()
    assert len(seen) == 2, "only entries with a CNAME chain are checked again"
    assert h.ask("www.example.test") is None  # left to cname.CnameBlocker
    entry = h.cache.fresh(query("www.example.test").cache_key)
    assert entry is not None and entry.cloak == CLOAK
    assert h.ask("plain.example.test") is not None

    blocked.clear()
    h.cache.recheck()
    assert h.ask("www.example.test") is not None
