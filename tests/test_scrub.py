"""resolver/message/scrub.py: what of an upstream reply is kept, by table; replies built with
dnspython (an independent encoder, which compresses names as servers do) and read back by it."""

from __future__ import annotations

from collections.abc import Sequence

import dns.flags
import dns.message
import dns.rrset
import pytest

from resolver.message import wire
from resolver.message.names import to_wire
from resolver.message.scrub import at_or_below, scrub

Rrset = tuple[str, str, str]  # owner, type, data


def reply(qname: str, qtype: str, answer: Sequence[Rrset] = (), authority: Sequence[Rrset] = (),
          additional: Sequence[Rrset] = (), edns: bool = True) -> bytes:
    query = dns.message.make_query(qname, qtype, use_edns=0 if edns else False)
    message = dns.message.make_response(query)
    for section, rrsets in ((message.answer, answer), (message.authority, authority),
                            (message.additional, additional)):
        for owner, rtype, data in rrsets:
            section.append(dns.rrset.from_text(owner, 300, "IN", rtype, data))
    return message.to_wire()


def scrubbed(data: bytes) -> tuple[bytes, dns.message.Message]:
    out = scrub(data, wire.skip_name(data, 12) + 4)
    return out, dns.message.from_wire(out)


def texts(section: list[dns.rrset.RRset]) -> set[str]:
    return {f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}" for rrset in section}


SOA = "ns.example.test. host.example.test. 1 3600 900 604800 300"
WWW = ("www.example.test.", "A", "192.0.2.10")

CLEAN = [
    pytest.param(reply("www.example.test", "A", [WWW]), id="one A"),
    pytest.param(reply("www.example.test", "A", [WWW], edns=False), id="no EDNS"),
    pytest.param(reply("missing.example.test", "A", [],
                       [("example.test.", "SOA", SOA)]), id="NXDOMAIN with its SOA"),
    pytest.param(reply("alias.example.test", "A", [
        ("alias.example.test.", "CNAME", "www.example.test."), WWW]), id="a CNAME chain"),
    pytest.param(reply("a.example.test", "A", [
        ("a.example.test.", "CNAME", "b.example.org."),
        ("b.example.org.", "CNAME", "c.example.net."),
        ("c.example.net.", "A", "192.0.2.1")],
        [("example.net.", "NS", "ns.example.net.")],
        [("ns.example.net.", "A", "192.0.2.53")]), id="a chain across zones, the last's NS"),
    pytest.param(reply("alias.example.test", "A", [
        ("alias.example.test.", "CNAME", "www.example.test."), WWW],
        [("example.test.", "NS", "ns.example.test.")],
        [("ns.example.test.", "A", "192.0.2.1")]), id="in-zone glue beside a chain"),
    pytest.param(reply("x.sub.example.test", "A", [
        ("sub.example.test.", "DNAME", "example.org."),
        ("x.sub.example.test.", "CNAME", "x.example.org."),
        ("x.example.org.", "A", "192.0.2.2")]), id="a DNAME and its CNAME"),
    pytest.param(reply("nope.example.test", "A", [], [
        ("example.test.", "SOA", SOA),
        ("a.example.test.", "NSEC", "z.example.test. A RRSIG NSEC")]),
        id="NSEC under the answer's zone"),
    pytest.param(reply("missing.example.test", "A", [],
                       [("example.test.", "SOA", SOA)],
                       [("ns.example.test.", "A", "192.0.2.1")]),
                 id="a negative answer with an address in its zone"),
]


@pytest.mark.parametrize("data", CLEAN)
def test_a_reply_that_belongs_whole_is_passed_as_it_came(data: bytes) -> None:
    assert scrub(data, wire.skip_name(data, 12) + 4) is data


# (reply, what stays: answer, authority, additional as "owner TYPE" texts)
HOSTILE = [
    pytest.param(reply("www.example.test", "A", [WWW, ("victim.example.", "A", "6.6.6.6")]),
                 {"www.example.test. A"}, set(), set(), id="an answer for another name"),
    pytest.param(reply("alias.example.test", "A", [
        ("alias.example.test.", "CNAME", "www.example.test."), WWW,
        ("other.example.test.", "A", "6.6.6.6")]),
        {"alias.example.test. CNAME", "www.example.test. A"}, set(), set(),
        id="beside a chain"),
    pytest.param(reply("alias.example.test", "A", [
        ("alias.example.test.", "CNAME", "www.example.test."), WWW],
        [("com.", "NS", "ns.evil.example.")], [("ns.evil.example.", "A", "6.6.6.6")]),
        {"alias.example.test. CNAME", "www.example.test. A"}, set(), set(),
        id="NS for a TLD, with glue"),
    pytest.param(reply("alias.example.test", "A", [
        ("alias.example.test.", "CNAME", "www.example.test."), WWW],
        [("example.test.", "NS", "ns.evil.example.")],
        [("ns.evil.example.", "A", "6.6.6.6"), ("ns.example.test.", "A", "192.0.2.1")]),
        {"alias.example.test. CNAME", "www.example.test. A"}, {"example.test. NS"},
        {"ns.example.test. A"}, id="out-of-zone glue"),
    pytest.param(reply("missing.example.test", "A", [],
                       [("example.test.", "SOA", SOA), ("bank.example.", "NS", "ns.evil.")]),
                 set(), {"example.test. SOA"}, set(), id="a negative answer's stowaway"),
    pytest.param(reply("missing.example.test", "A", [], [("example.org.", "SOA", SOA)]),
                 set(), set(), set(), id="an SOA that is not the zone's"),
    pytest.param(reply("a.example.test", "A", [
        ("a.example.test.", "CNAME", "b.example.test."),
        ("b.example.test.", "CNAME", "a.example.test."),
        ("c.example.test.", "A", "6.6.6.6")]),
        {"a.example.test. CNAME", "b.example.test. CNAME"}, set(), set(), id="a CNAME loop"),
]


@pytest.mark.parametrize(("data", "answer", "authority", "additional"), HOSTILE)
def test_records_that_do_not_belong_go(data: bytes, answer: set[str], authority: set[str],
                                       additional: set[str]) -> None:
    out, message = scrubbed(data)
    assert out is not data
    assert texts(message.answer) == answer
    assert texts(message.authority) == authority
    assert texts(message.additional) == additional
    assert message.edns == 0  # the OPT record stays
    assert message.flags & dns.flags.QR
    assert message.question == dns.message.from_wire(data).question


# A plain positive answer (every record owned by the name asked, no CNAME): the answer alone
MINIMAL = [
    pytest.param(reply("www.example.test", "A", [WWW], [("example.test.", "NS",
                                                            "ns.example.test.")],
                       [("ns.example.test.", "A", "192.0.2.1")]), id="in-zone glue"),
    pytest.param(reply("example.test", "MX", [("example.test.", "MX", "10 mail.example.test.")],
                       [], [("mail.example.test.", "A", "192.0.2.25")]),
                 id="an address below the name asked"),
    pytest.param(reply("www.example.test", "A", [WWW], [("com.", "NS", "ns.evil.example.")],
                       [("ns.evil.example.", "A", "6.6.6.6")]), id="NS for a TLD, with glue"),
    pytest.param(reply("www.example.test", "A", [WWW], [("example.org.", "SOA", SOA)]),
                 id="an SOA that is not the zone's"),
]


@pytest.mark.parametrize("data", MINIMAL)
def test_a_plain_positive_answer_is_kept_minimal(data: bytes) -> None:
    """Its authority and additional sections go, whether or not they belong (a minimal
    response), found without reading a name; the OPT record too (answers carry their own)."""
    _, message = scrubbed(data)
    original = dns.message.from_wire(data)
    assert message.answer == original.answer and message.question == original.question
    assert (message.authority, message.additional, message.edns) == ([], [], -1)
    assert message.id == original.id and message.flags == original.flags


def test_names_pointing_into_a_dropped_record_are_written_out() -> None:
    # dnspython compresses the later names against the dropped record's owner
    data = reply("www.example.test", "A", [
        ("other.example.org.", "A", "6.6.6.6"),
        ("www.example.test.", "CNAME", "x.other.example.org."),
        ("x.other.example.org.", "A", "192.0.2.1")])
    assert data.count(b"\x05other") == 1  # written once, pointed at twice
    _, message = scrubbed(data)
    assert texts(message.answer) == {"www.example.test. CNAME", "x.other.example.org. A"}
    assert str(message.answer[0][0].target) == "x.other.example.org."


@pytest.mark.parametrize(("name", "zone", "below"), [
    ("www.example.test", "example.test", True),
    ("example.test", "example.test", True),
    ("example.test", "", True),  # the root
    ("wwwexample.test", "example.test", False),  # on label boundaries only
    ("example.test", "www.example.test", False),
    ("test", "example.test", False),
])
def test_at_or_below(name: str, zone: str, below: bool) -> None:
    assert at_or_below(to_wire(name), to_wire(zone)) is below
