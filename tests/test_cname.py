"""CNAME cloaking: chains judged against the rules, and answered with the blocked domain's SOA."""

from __future__ import annotations

import pytest
from dnslib import DNSRecord

from resolver.message import constants, wire
from resolver.message.names import to_wire
from resolver.message.reply import TtlPolicy, scan_reply
from resolver.ops.config import BlockingConfig, CacheConfig
from resolver.ops.metrics import Metrics
from resolver.rules.matcher import RuleSet
from resolver.rules.model import Rule, RuleList
from resolver.stages.blocking import Blocker
from resolver.stages.cache import Cache
from resolver.stages.cname import CnameBlocker, CnameCheck
from resolver.stages.contract import PASS, Answered
from tests.clock import FakeClock
from tests.dnsmsg import Shape, parse, query_packet, response, summary
from tests.test_blocking import ANSWERS, CONFIG, QUERY_KINDS, REFUSED, RULES, expected_answer

CLOAKED = "www.cloaked.test"  # allowed itself; its answer's chain leads into ads.example.org
CHAIN = (to_wire("cdn.example.net"), to_wire("x.ads.example.org"), to_wire("y.ads.example.org"))


@pytest.mark.parametrize(("lst", "config", "qtype", "qclass", "rcode", "addresses"), ANSWERS)
@pytest.mark.parametrize("kind", QUERY_KINDS)
def test_chain_answer_equals_dnslib_answer_with_the_blocked_domain_as_soa_owner(
        lst: RuleList, config: BlockingConfig, qtype: str, qclass: str, rcode: int,
        addresses: tuple[str, ...] | None, kind: Shape) -> None:
    metrics = Metrics()
    rules = RuleSet([lst], [(to_wire("ads.example.org"), Rule(lst, "ads"))])
    blocker = Blocker(rules, config, metrics)
    packet = query_packet(CLOAKED, qtype, qclass=qclass, qid=0x5A5A, **kind)
    q = parse(packet)
    assert blocker.answer(q) is PASS
    check = CnameCheck(blocker)
    cloak = check.verdict(CHAIN)
    assert cloak == (Rule(lst, "ads"), to_wire("ads.example.org"))
    answered = check.answer(q, cloak)
    assert answered.outcome == "blocked" and answered.replay is None
    got = answered.data
    want = expected_answer(packet, lst, config, "ads.example.org", rcode, addresses,
                           rules.version)
    assert summary(got) == summary(want)
    assert str(DNSRecord.parse(got)) == str(DNSRecord.parse(want))
    assert metrics.blocked.counts == {(lst.name, "ads", lst.action): 1}


@pytest.mark.parametrize(
    ("chain", "found"),
    [
        ((), None),
        ((to_wire("cdn.example.net"),), None),
        ((to_wire("cdn.example.net"), to_wire("www.example.org")), "example.org"),
        ((to_wire("a.bad.test"), to_wire("www.example.org")), "bad.test"),  # first block wins
        ((to_wire("ok.example.org"),), None),  # allowed
        ((to_wire("notexample.org"),), None),
        ((b"\x00",), None),  # the root
    ],
)
def test_verdict(chain: tuple[bytes, ...], found: str | None) -> None:
    cloak = CnameCheck(Blocker(RULES, CONFIG, Metrics())).verdict(chain)
    assert (cloak[1] if cloak else None) == (to_wire(found) if found else None)


def test_cname_blocker_answers_cached_cloaked_names_until_they_expire() -> None:
    metrics, clock = Metrics(), FakeClock()
    blocker = Blocker(RULES, CONFIG, metrics)
    check = CnameCheck(blocker)
    cache = Cache(CacheConfig(), metrics, clock, check.verdict)
    blocker.on_install(cache.recheck)
    stage = CnameBlocker(check, cache)
    chain = (f"{CLOAKED}. 300 IN CNAME www.example.org.", "www.example.org. 300 IN A 192.0.2.1")
    q = parse(query_packet(CLOAKED, edns=True))
    data = response(CLOAKED, answer=chain)
    cache.put(q.cache_key, scan_reply(data, wire.skip_name(data, 12) + 4, TtlPolicy()))
    result = stage.answer(q)
    assert isinstance(result, Answered) and result.replay is None
    got = summary(result.data)
    assert got.rcode == constants.NXDOMAIN
    assert got.authority[0][:4] == ("example.org.", 300, "IN", "SOA")
    assert metrics.blocked.counts == {("ads", "acme", "nxdomain"): 1}

    blocker.install(RuleSet([REFUSED], [(to_wire("other.test"), Rule(REFUSED))]))
    assert stage.answer(q) is PASS  # the new rules let the chain through
    blocker.install(RULES)
    assert stage.answer(q) is not PASS  # blocked again
    clock.advance(300)
    assert stage.answer(q) is PASS  # expired
