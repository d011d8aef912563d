"""Blocked names answered by the running server over UDP and TCP, as a client sees them."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import BLOCK_TTL
from tests.e2e import ask, ede, make_query, question_bytes, raw_tcp_exchange, raw_udp_exchange
from tests.servers import FAULT_A

PROTOCOLS = ("udp", "tcp")
EDNS_MODES = {  # client's EDNS: (edns version or None, DO bit)
    "no-edns": (None, False),
    "edns": (0, False),
    "edns-do": (0, True),
}


@pytest.fixture
async def blocking_server(start_server, fault_upstream):
    """The resolver with RULES_YAML; anything not blocked gets FAULT_A from the upstream."""
    return await start_server(fault_upstream("answer"))


async def exchange(server, protocol: str, query: dns.message.Message
                   ) -> tuple[bytes, dns.message.Message]:
    """The raw answer and its dnspython parse; also checks it answers this query."""
    data = query.to_wire()
    if protocol == "udp":
        raw = await raw_udp_exchange(server, data)
        assert raw is not None, "no answer"
    else:
        raw = await raw_tcp_exchange(server, data)
    response = dns.message.from_wire(raw)
    assert query.is_response(response)
    return raw, response


def assert_forwarder_flags(response: dns.message.Message) -> None:
    assert response.flags & dns.flags.QR
    assert not response.flags & dns.flags.AA, "a forwarder is not authoritative"
    assert response.flags & dns.flags.RA
    assert response.flags & dns.flags.RD  # echoed from the query


def assert_edns(response: dns.message.Message, edns: int | None, do: bool, list_name: str) -> None:
    if edns is None:
        assert response.edns == -1, "no OPT record for a client without EDNS"
        assert response.options == ()
        return
    assert response.edns == 0
    assert bool(response.ednsflags & dns.flags.DO) == do, "DO bit echoed"
    [(code, text)] = ede(response)
    assert code == 15  # Blocked
    assert text is not None and list_name in text


def assert_soa(response: dns.message.Message, owner: str, minimum: int) -> None:
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text(owner)
    assert soa[0].minimum == minimum
    assert soa.ttl == minimum


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("edns_mode", EDNS_MODES)
@pytest.mark.parametrize(
    ("name", "rule_domain"),
    [
        ("example.org", "example.org"),
        ("www.example.org", "example.org"),
        ("a.b.c.deep.example.org", "example.org"),
        ("WwW.ExAmPlE.OrG", "example.org"),
        ("EXAMPLE.ORG.", "example.org"),
        ("blocked.test.", "blocked.test"),
        ("x.Blocked.Test", "blocked.test"),
    ],
)
async def test_blocked_name_is_nxdomain(blocking_server, protocol, edns_mode, name, rule_domain):
    edns, do = EDNS_MODES[edns_mode]
    query = make_query(name, "A", edns=edns, do=do)
    raw, response = await exchange(blocking_server, protocol, query)

    assert response.rcode() == dns.rcode.NXDOMAIN
    assert_forwarder_flags(response)
    assert question_bytes(raw) == question_bytes(query.to_wire()), "question echoed exactly"
    assert response.answer == []
    assert_soa(response, rule_domain, BLOCK_TTL)
    assert_edns(response, edns, do, "tracking")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", ["notexample.org", "example.org.evil.test", "example.orgx.test",
                                  "blocked.testing", "xblocked.test"])
async def test_look_alikes_are_forwarded(blocking_server, protocol, name):
    response = await ask(blocking_server, protocol, make_query(name, "A", edns=0))

    assert response.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in response.answer[0]] == [FAULT_A]
    assert ede(response) == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "answers", "answer_ttl", "soa"),
    [
        # sinkhole with the default addresses and the configured TTL
        ("sink.test", "A", "NOERROR", {"0.0.0.0"}, BLOCK_TTL, None),
        ("www.sink.test", "AAAA", "NOERROR", {"::"}, BLOCK_TTL, None),
        ("sink.test", "MX", "NOERROR", set(), None, ("sink.test", BLOCK_TTL)),
        # sinkhole with the list's own addresses and TTL
        ("custom.test", "A", "NOERROR", {"192.0.2.53", "192.0.2.54"}, 60, None),
        ("a.custom.test", "AAAA", "NOERROR", {"2001:db8::53"}, 60, None),
        ("custom.test", "TXT", "NOERROR", set(), None, ("custom.test", 60)),
        # nodata: an empty NOERROR with the SOA for negative caching
        ("nodata.test", "A", "NOERROR", set(), None, ("nodata.test", BLOCK_TTL)),
        ("deep.nodata.test", "AAAA", "NOERROR", set(), None, ("nodata.test", BLOCK_TTL)),
        # refused: no records at all
        ("refused.test", "A", "REFUSED", set(), None, None),
        ("x.refused.test", "TXT", "REFUSED", set(), None, None),
    ],
)
async def test_actions(blocking_server, protocol, name, rdtype, rcode, answers, answer_ttl, soa):
    query = make_query(name, rdtype, edns=0)
    raw, response = await exchange(blocking_server, protocol, query)

    assert response.rcode() == dns.rcode.from_text(rcode)
    assert_forwarder_flags(response)
    assert question_bytes(raw) == question_bytes(query.to_wire())
    if answers:
        [rrset] = response.answer
        assert rrset.name == query.question[0].name
        assert rrset.rdtype == dns.rdatatype.from_text(rdtype)
        assert {r.to_text() for r in rrset} == answers
        assert rrset.ttl == answer_ttl
    else:
        assert response.answer == []
    if soa is not None:
        assert_soa(response, *soa)
    else:
        assert response.authority == []
    [(code, _)] = ede(response)
    assert code == 15


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", ["allowed.example.org", "www.ALLOWED.example.org"])
async def test_allow_list_wins(blocking_server, protocol, name):
    response = await ask(blocking_server, protocol, make_query(name, "A", edns=0))

    assert response.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in response.answer[0]] == [FAULT_A]
    assert ede(response) == []


async def test_allow_wins_over_a_more_specific_block(start_server, fault_upstream):
    """An allow entry for a parent beats a block entry for a name below it."""
    rules = """\
lists:
  - name: ads
    domains: [ads.example.org]
  - name: ok
    action: allow
    domains: [example.org]
"""
    server = await start_server(fault_upstream("answer"), rules=rules)
    response = await ask(server, "udp", make_query("x.ads.example.org", "A"))

    assert response.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in response.answer[0]] == [FAULT_A]
