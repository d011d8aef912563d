"""Table tests for resolver/blocking.py: blocked answers patched from bytes equal the same
answers built the slow way with dnslib, read back by dnslib and by dnspython."""

from __future__ import annotations

import struct

import pytest
from dnslib import AAAA, CLASS, EDNS0, QTYPE, RR, SOA, A, DNSRecord, EDNSOption
from prometheus_client import CollectorRegistry

from resolver.message import constants
from resolver.message.names import to_wire
from resolver.ops.config import BlockingConfig
from resolver.ops.metrics import Metrics
from resolver.rules.matcher import RuleSet
from resolver.rules.model import Rule, RuleList
from resolver.stages.blocking import Blocker, ListAnswers
from resolver.stages.contract import PASS, Answered
from tests.dnsmsg import Shape, parse, query_packet, summary

CONFIG = BlockingConfig(rules=())
NO_EDE = BlockingConfig(rules=(), ede=False, ttl=120)
OTHER_SOA = BlockingConfig(rules=(), soa_mname="ns.example.net", soa_rname="dns.example.net")
SOA_TIMERS = (1, 3600, 600, 86400)

NXDOMAIN = RuleList("ads", "nxdomain")
NODATA = RuleList("trackers", "nodata", ttl=60)
REFUSED = RuleList("malware", "refused")
SINKHOLE = RuleList("sink", "sinkhole")
SINKHOLE_MANY = RuleList("sink2", "sinkhole", ("192.0.2.1", "192.0.2.2"),
                         ("2001:db8::1", "2001:db8::2", "2001:db8::3"), ttl=30)


def expected_answer(packet: bytes, lst: RuleList, config: BlockingConfig, matched: str,
                    rcode: int, addresses: tuple[str, ...] | None, version: str) -> bytes:
    """The blocked answer as dnslib builds it: a forwarder's reply (aa=0, ra=1), then either
    the sinkhole addresses or, for rcodes other than REFUSED, the list's SOA owned by the
    matched domain; EDNS with the EDE 'Blocked' option when the query had EDNS.

    addresses: sinkhole answer records, or None for an SOA-only (negative) answer.
    version: the rule set's, which the EDE text names.
    """
    request = DNSRecord.parse(packet)
    answer = request.reply(ra=1, aa=0)
    answer.header.ad = 0  # dnslib copies the query's bits; a block is never 'authentic'
    answer.header.rcode = rcode
    ttl = lst.ttl if lst.ttl is not None else config.ttl
    if addresses is not None:
        rdata = {QTYPE.A: A, QTYPE.AAAA: AAAA}[request.q.qtype]
        for address in addresses:
            answer.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata(address), ttl=ttl))
    elif rcode != constants.REFUSED:
        soa = SOA(config.soa_mname, config.soa_rname, (*SOA_TIMERS, ttl))
        answer.add_auth(RR(matched, QTYPE.SOA, CLASS.IN, ttl, soa))
    opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
    if opt is not None:
        text = f"blocked by list {lst.name} (rules {version})".encode()
        options = [EDNSOption(15, struct.pack("!H", 15) + text)] if config.ede else []
        answer.add_ar(EDNS0(udp_len=1232, flags="do" if opt.ttl & 0x8000 else "", opts=options))
    return bytes(answer.pack())


def one_list(lst: RuleList, domain: str) -> RuleSet:
    return RuleSet([lst], [(to_wire(domain), Rule(lst))])


def build(lst: RuleList, config: BlockingConfig, domain: str, packet: bytes,
          transport: str = "udp") -> bytes:
    """What the Blocker answers for packet with lst blocking domain."""
    rules = one_list(lst, domain)
    blocker = Blocker(rules, config, Metrics())
    result = blocker.answer(parse(packet, transport))
    assert isinstance(result, Answered) and result.outcome == "blocked"
    return result.data


QUERY_KINDS = [
    pytest.param({}, id="plain"),
    pytest.param({"edns": True}, id="edns"),
    pytest.param({"edns": True, "do": True}, id="edns-do"),
    pytest.param({"rd": False, "cd": True, "edns": True, "udp": 4096}, id="cd-nord"),
    pytest.param({"ad": True}, id="ad"),
]

ANSWERS = [
    (NXDOMAIN, CONFIG, "A", "IN", constants.NXDOMAIN, None),
    (NXDOMAIN, CONFIG, "AAAA", "IN", constants.NXDOMAIN, None),
    (NXDOMAIN, CONFIG, "MX", "IN", constants.NXDOMAIN, None),
    (NXDOMAIN, NO_EDE, "HTTPS", "IN", constants.NXDOMAIN, None),
    (NXDOMAIN, OTHER_SOA, "A", "IN", constants.NXDOMAIN, None),
    (NODATA, CONFIG, "A", "IN", constants.NOERROR, None),
    (NODATA, CONFIG, "TXT", "IN", constants.NOERROR, None),
    (NODATA, NO_EDE, "AAAA", "IN", constants.NOERROR, None),
    (REFUSED, CONFIG, "A", "IN", constants.REFUSED, None),
    (REFUSED, NO_EDE, "SOA", "IN", constants.REFUSED, None),
    (SINKHOLE, CONFIG, "A", "IN", constants.NOERROR, ("0.0.0.0",)),
    (SINKHOLE, CONFIG, "AAAA", "IN", constants.NOERROR, ("::",)),
    (SINKHOLE, CONFIG, "MX", "IN", constants.NOERROR, None),  # other types: NODATA
    (SINKHOLE, CONFIG, "A", "CH", constants.NOERROR, None),  # no addresses outside class IN
    (SINKHOLE_MANY, CONFIG, "A", "IN", constants.NOERROR, ("192.0.2.1", "192.0.2.2")),
    (SINKHOLE_MANY, NO_EDE, "AAAA", "IN", constants.NOERROR,
     ("2001:db8::1", "2001:db8::2", "2001:db8::3")),
    (SINKHOLE_MANY, CONFIG, "TXT", "IN", constants.NOERROR, None),
]

NAMES = [  # (query name as the client wrote it, rule domain, matched suffix in the client's case)
    ("example.org", "example.org", "example.org"),
    ("WWW.Example.ORG", "example.org", "Example.ORG"),
    ("a.b.c.ads.example.org.", "ads.example.org", "ads.example.org"),
    ("Tracker.test", "tracker.test", "Tracker.test"),
]


@pytest.mark.parametrize(("lst", "config", "qtype", "qclass", "rcode", "addresses"), ANSWERS)
@pytest.mark.parametrize(("qname", "domain", "matched"), NAMES)
@pytest.mark.parametrize("kind", QUERY_KINDS)
def test_blocked_answer_equals_dnslib_answer(lst: RuleList, config: BlockingConfig, qtype: str,
                                             qclass: str, rcode: int,
                                             addresses: tuple[str, ...] | None, qname: str,
                                             domain: str, matched: str, kind: Shape) -> None:
    packet = query_packet(qname, qtype, qclass=qclass, qid=0x5A5A, **kind)
    got = build(lst, config, domain, packet)
    want = expected_answer(packet, lst, config, matched, rcode, addresses,
                           one_list(lst, domain).version)
    assert summary(got) == summary(want)  # dnspython: sections, rcode, flags, TTLs, EDNS
    assert str(DNSRecord.parse(got)) == str(DNSRecord.parse(want))  # dnslib, case included


@pytest.mark.parametrize(("lst", "config", "ttl"), [
    (NXDOMAIN, CONFIG, 300), (NODATA, CONFIG, 60), (NXDOMAIN, NO_EDE, 120),
    (SINKHOLE_MANY, CONFIG, 30)])
def test_blocked_answer_ttl_and_soa(lst: RuleList, config: BlockingConfig, ttl: int) -> None:
    got = summary(build(lst, config, "example.org",
                        query_packet("www.example.org", "TXT", edns=True)))
    assert got.authority == (("example.org.", ttl, "IN", "SOA",
                              f"{config.soa_mname}. {config.soa_rname}. 1 3600 600 86400 {ttl}"),)
    assert got.flags == {"QR", "RD", "RA"}
    assert got.edns is not None
    text = f"blocked by list {lst.name} (rules {one_list(lst, 'example.org').version})"
    assert got.edns[3] == (((15, b"\x00\x0f" + text.encode()),) if config.ede else ())


BIG_SINKHOLE = RuleList("big", "sinkhole", sinkhole_v6=tuple(f"2001:db8::{n:x}" for n in range(20)))
LONG_NAME = ".".join(["x" * 60, "y" * 60, "example.org"])


@pytest.mark.parametrize(
    ("transport", "kind", "truncated"),
    [
        ("udp", {}, True),  # 20 AAAA records and a long name: more than 512 bytes
        ("udp", {"edns": True, "udp": 512}, True),
        ("udp", {"edns": True}, False),
        ("tcp", {}, False),
    ],
)
def test_large_sinkhole_answer_fits_the_client(transport: str, kind: Shape,
                                               truncated: bool) -> None:
    packet = query_packet(LONG_NAME, "AAAA", **kind)
    answer = build(BIG_SINKHOLE, CONFIG, "example.org", packet, transport)
    got = summary(answer)
    if truncated:
        assert "TC" in got.flags and got.answer == ()
        assert len(answer) <= 512
    else:
        assert "TC" not in got.flags and len(got.answer) == 20
    assert got.question == ((LONG_NAME + ".", "AAAA", "IN"),)


LONG_SOA = BlockingConfig(rules=(), soa_mname=".".join(["n" * 63] * 3), soa_rname="dns.example.net")
LONGEST = ".".join(["x" * 63, "y" * 63, "z" * 63, "w" * 49, "example.org"])  # 253 characters


@pytest.mark.parametrize(
    ("config", "kind", "truncated"),
    [
        (LONG_SOA, {}, True),  # a 253-character name and a 192-character SOA mname
        (LONG_SOA, {"edns": True}, False),
        (CONFIG, {}, False),  # the shipped SOA names leave room for any name
    ],
)
def test_long_soa_answer_fits_the_client(config: BlockingConfig, kind: Shape,
                                         truncated: bool) -> None:
    answer = build(NXDOMAIN, config, "example.org", query_packet(LONGEST, **kind))
    got = summary(answer)
    assert ("TC" in got.flags) == truncated and len(answer) <= (512 if not kind else 1232)
    assert got.authority == () if truncated else len(got.authority) == 1


def test_an_owned_answer_fits_a_small_udp_buffer() -> None:
    """The SOA owner of a CNAME-cloaking answer is the blocked domain written in full, so a
    long question and a long blocked domain can outgrow 512 bytes."""
    blocked = ".".join(["b" * 63, "c" * 63, "d" * 63, "example.org"])
    rule = Rule(NXDOMAIN, "ads")
    blocker = Blocker(RuleSet([NXDOMAIN], [(to_wire(blocked), rule)]), CONFIG, Metrics())
    got = summary(blocker.answer_owned(parse(query_packet(LONGEST)), rule, to_wire(blocked)))
    assert "TC" in got.flags and got.authority == ()
    got = summary(blocker.answer_owned(parse(query_packet(LONGEST), "tcp"), rule,
                                       to_wire(blocked)))
    assert "TC" not in got.flags and got.authority[0][0] == blocked + "."


ALLOW = RuleList("allowed", "allow")
ENTRY = Rule(NXDOMAIN, "acme", "Acme")
RULES = RuleSet([NXDOMAIN, REFUSED, ALLOW], [
    (to_wire("example.org"), ENTRY),
    (to_wire("bad.test"), Rule(REFUSED)),
    (to_wire("ok.example.org"), Rule(ALLOW)),
])


@pytest.mark.parametrize(
    ("qname", "blocked", "tally"),
    [
        ("example.org", True, ("ads", "acme", "nxdomain")),
        ("deep.www.example.org", True, ("ads", "acme", "nxdomain")),
        ("x.bad.test", True, ("malware", "", "refused")),
        ("ok.example.org", False, None),  # allow wins
        ("www.ok.example.org", False, None),
        ("notexample.org", False, None),  # label boundaries only
        ("example.org.test", False, None),
        ("org", False, None),
        (".", False, None),
    ],
)
def test_blocker_answers_only_blocked_names(qname: str, blocked: bool,
                                            tally: tuple[str, ...] | None) -> None:
    metrics = Metrics()
    blocker = Blocker(RULES, CONFIG, metrics)
    result = blocker.answer(parse(query_packet(qname)))
    assert (result is not PASS) == blocked
    assert metrics.blocked.counts == ({tally: 1} if tally else {})


def test_blocker_install_swaps_rules_and_gauge_follows() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    blocker = Blocker(RULES, CONFIG, metrics)
    def domains(name: str) -> float | None:
        return registry.get_sample_value("resolver_rules_domains",
                                         {"list": name, "mode": "enforce"})

    assert (domains("ads"), domains("malware"), domains("allowed")) == (1, 1, 1)
    q = parse(query_packet("www.example.org"))
    assert blocker.answer(q) is not PASS
    blocker.install(RuleSet([REFUSED], [(to_wire("other.test"), Rule(REFUSED))]))
    assert blocker.answer(q) is PASS
    refused = blocker.answer(parse(query_packet("other.test")))
    assert isinstance(refused, Answered) and summary(refused.data).rcode == constants.REFUSED
    assert (domains("ads"), domains("malware"), domains("allowed")) == (None, 1, None)


def test_list_answers_build_is_independent_of_earlier_queries() -> None:
    """Pieces are packed once per list; one answer must not leak into the next."""
    answers = ListAnswers(NXDOMAIN, CONFIG)
    first = answers.build(parse(query_packet("a.example.org", qid=1)), 2)
    second = answers.build(parse(query_packet("bb.example.org", qid=2, edns=True)), 3)
    again = answers.build(parse(query_packet("a.example.org", qid=1)), 2)
    assert first == again
    assert summary(second).authority[0][0] == "example.org."


def test_install_tells_listeners() -> None:
    blocker = Blocker(RULES, CONFIG, Metrics())
    calls = []
    blocker.on_install(lambda: calls.append(blocker.rules))
    other = RuleSet([REFUSED], [(to_wire("other.test"), Rule(REFUSED))])
    blocker.install(other)
    assert calls == [other]
