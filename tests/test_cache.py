"""Table tests for resolver/cache.py with an injected clock: ages, expiry, LRU bounds, and
the cache lookup stage's answers and tallies."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from resolver import wire
from resolver.cache import Cache, CacheLookup
from resolver.metrics import Metrics
from resolver.reply import Reply, TtlPolicy, scan_reply
from tests.dnsmsg import query, response, summary

START = 1000.0


class FakeClock:
    """Monotonic time that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = [START]

    def __call__(self) -> float:
        return self.now[0]

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds


def reply_for(name: str = "www.example.org", ttl: int = 300, **kwargs) -> Reply:
    """A scanned upstream reply: one A record with `ttl`, or what kwargs describe."""
    if not kwargs:
        kwargs = {"answer": (f"{name}. {ttl} IN A 192.0.2.1",)}
    data = response(name, **kwargs)
    return scan_reply(data, wire.skip_name(data, 12) + 4, TtlPolicy())


def make_cache(max_entries: int = 10) -> tuple[Cache, FakeClock, Metrics]:
    clock, metrics = FakeClock(), Metrics()
    return Cache(max_entries, metrics, clock), clock, metrics


@pytest.mark.parametrize(
    ("elapsed", "age"),
    [
        (0, 0),
        (0.4, 0),
        (0.999, 0),
        (1, 1),
        (1.5, 1),
        (150, 150),
        (299.999, 299),
        (300, None),  # a reply lives exactly its TTL
        (300.5, None),
        (10**6, None),
    ],
)
def test_get_returns_whole_second_age_until_expiry(elapsed: float, age: int | None) -> None:
    cache, clock, metrics = make_cache()
    reply = reply_for(ttl=300)
    cache.put("k", reply)
    clock.advance(elapsed)
    got = cache.get("k")
    if age is None:
        assert got is None and len(cache) == 0
        assert metrics.cache.counts == {("stored",): 1, ("expired",): 1}
    else:
        assert got == (reply, age) and type(got[1]) is int and len(cache) == 1
        assert metrics.cache.counts == {("stored",): 1}


@pytest.mark.parametrize(
    ("ops", "kept", "evicted"),
    [
        (["put a", "put b"], ["a", "b"], 0),
        (["put a", "put b", "put c"], ["b", "c"], 1),
        (["put a", "put b", "get a", "put c"], ["a", "c"], 1),  # a get counts as a use
        (["put a", "put b", "get b", "put c"], ["b", "c"], 1),
        (["put a", "put b", "put a", "put c"], ["a", "c"], 1),  # so does storing again
        (["put a", "put b", "get x", "put c", "put d"], ["c", "d"], 2),
        (["put a", "put a", "put a"], ["a"], 0),
    ],
)
def test_lru_eviction(ops: list[str], kept: list[str], evicted: int) -> None:
    cache, _, metrics = make_cache(max_entries=2)
    replies = {key: reply_for(f"{key}.example.org") for key in "abcdx"}
    for op in ops:
        verb, key = op.split()
        if verb == "put":
            cache.put(key, replies[key])
        else:
            cache.get(key)
    assert len(cache) == len(kept)
    for key in "abcd":
        assert (cache.get(key) is not None) == (key in kept)
    assert metrics.cache.counts.get(("evicted",), 0) == evicted


@pytest.mark.parametrize(
    ("max_entries", "kwargs", "stored"),
    [
        (10, {"answer": ("www.example.org. 300 IN A 192.0.2.1",)}, True),
        (0, {"answer": ("www.example.org. 300 IN A 192.0.2.1",)}, False),  # cache disabled
        (10, {"answer": ("www.example.org. 0 IN A 192.0.2.1",)}, False),  # ttl 0
        (10, {"rcode": wire.SERVFAIL}, False),  # ttl None
        (10, {"authority": ("example.org. 3600 IN NS ns.example.org.",)}, False),  # NODATA, no SOA
        (10, {"rcode": wire.NXDOMAIN, "authority": (
            "example.org. 60 IN SOA ns.example.org. h.example.org. 1 2 3 4 60",)}, True),
    ],
)
def test_put_stores_only_cacheable_replies(max_entries: int, kwargs: dict, stored: bool) -> None:
    cache, _, metrics = make_cache(max_entries)
    cache.put("k", reply_for(**kwargs))
    assert len(cache) == int(stored)
    assert (cache.get("k") is not None) == stored
    assert metrics.cache.counts == ({("stored",): 1} if stored else {})


def test_storing_again_restarts_the_age() -> None:
    cache, clock, _ = make_cache()
    cache.put("k", reply_for(ttl=100))
    clock.advance(90)
    fresh = reply_for(ttl=100)
    cache.put("k", fresh)
    clock.advance(50)
    assert cache.get("k") == (fresh, 50)


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
def test_lookup_serves_other_clients_of_the_same_question(client: dict, hit: bool) -> None:
    clock, metrics = FakeClock(), Metrics()
    cache = Cache(10, metrics, clock)
    lookup = CacheLookup(cache, metrics)
    first = query("www.example.org")
    cache.put(first.cache_key, reply_for(ttl=300))
    clock.advance(42.7)
    q = query("WWW.Example.org", **client)
    answer = lookup.answer(q)
    assert (answer is not None) == hit
    assert metrics.cache.counts == {("stored",): 1, ("hit" if hit else "miss",): 1}
    if hit:
        got = summary(answer)
        assert got.id == client.get("qid", 0x1234)
        assert got.question == (("WWW.Example.org.", "A", "IN"),)
        assert got.answer == (("www.example.org.", 258, "IN", "A", "192.0.2.1"),)
        assert got.edns == ((0, 1232, False, ()) if q.edns else None)


def test_lookup_tallies_through_a_lifetime() -> None:
    clock, metrics = FakeClock(), Metrics()
    cache = Cache(1, metrics, clock)
    lookup = CacheLookup(cache, metrics)
    a, b = query("a.example.org"), query("b.example.org")
    assert lookup.answer(a) is None  # miss
    cache.put(a.cache_key, reply_for("a.example.org", ttl=60))  # stored
    assert lookup.answer(a) is not None  # hit
    clock.advance(59)
    assert summary(lookup.answer(a)).answer[0][1] == 1  # hit, one second left
    clock.advance(1)
    assert lookup.answer(a) is None  # expired and miss
    cache.put(a.cache_key, reply_for("a.example.org", ttl=60))  # stored
    cache.put(b.cache_key, reply_for("b.example.org", ttl=60))  # stored, a evicted
    assert lookup.answer(a) is None  # miss
    assert lookup.answer(b) is not None  # hit
    assert metrics.cache.counts == {("miss",): 3, ("stored",): 3, ("hit",): 3,
                                    ("expired",): 1, ("evicted",): 1}


def test_cache_entries_gauge() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    cache = Cache(2, metrics, FakeClock())
    assert registry.get_sample_value("resolver_cache_entries") == 0
    for key in "abc":
        cache.put(key, reply_for())
    assert registry.get_sample_value("resolver_cache_entries") == 2
    assert registry.get_sample_value("resolver_cache_total", {"result": "evicted"}) == 1
