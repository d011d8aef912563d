"""Test helpers: build packets with dnslib, decode answers with dnspython, compare as messages.

The resolver builds answers by patching bytes. Its tests check those bytes with two
independent codecs instead of comparing bytes, so a harmless difference in layout (a
compression pointer here, record order there) does not fail a test but a wrong field does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict, Unpack

import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dnslib import EDNS0, QTYPE, RR, DNSRecord

from resolver.message import wire
from resolver.message.query import Query

CLIENT = ("127.0.0.1", 5353)


class Shape(TypedDict, total=False):
    """A query's flags and EDNS: query_packet's keywords besides the ID and class."""

    edns: bool
    udp: int
    do: bool
    rd: bool
    cd: bool
    ad: bool


class Asked(Shape, total=False):
    """How a client asks: query_packet's keywords, as the tables give them."""

    qid: int
    qclass: str


class Said(TypedDict, total=False):
    """What an upstream says: response's keywords, as the tables give them."""

    qid: int
    rcode: int
    answer: tuple[str, ...]
    authority: tuple[str, ...]
    additional: tuple[str, ...]
    opt: str | None
    ad: bool
    aa: bool


def query_packet(name: str, qtype: str = "A", *, qid: int = 0x1234, qclass: str = "IN",
                 edns: bool = False, udp: int = 1232, do: bool = False, rd: bool = True,
                 cd: bool = False, ad: bool = False) -> bytes:
    """A client query as dnslib packs it."""
    record = DNSRecord.question(name, qtype, qclass)
    record.header.id = qid
    record.header.rd = int(rd)
    record.header.cd = int(cd)
    record.header.ad = int(ad)
    if edns:
        record.add_ar(EDNS0(udp_len=udp, flags="do" if do else ""))
    return bytes(record.pack())


def parse(packet: bytes, transport: str = "udp") -> Query:
    """The Query the transport would make of packet."""
    return wire.parse_query(packet, CLIENT, transport)


def query(name: str, qtype: str = "A", transport: str = "udp", **kw: Unpack[Asked]) -> Query:
    """parse(query_packet(...)) in one call."""
    return parse(query_packet(name, qtype, **kw), transport)


def records(*zone_lines: str) -> list[RR]:
    """Resource records from master-file lines, e.g. 'www.example.org. 300 IN A 192.0.2.1'."""
    return [rr for line in zone_lines for rr in RR.fromZone(line)]


def response(name: str, qtype: str = "A", *, qid: int = 0x4242, rcode: int = 0,
             answer: tuple[str, ...] = (), authority: tuple[str, ...] = (),
             additional: tuple[str, ...] = (), opt: str | None = None, ad: bool = False,
             aa: bool = False) -> bytes:
    """An upstream reply packed by dnslib (with name compression).

    opt: None for no OPT record, "last" to append it after the additional records, "first" to
    put it before them (legal, and what sends reply.scan_reply down its slow path).
    """
    record = DNSRecord.question(name, qtype).reply(ra=1, aa=int(aa))
    record.header.id = qid
    record.header.rcode = rcode
    record.header.ad = int(ad)
    for rr in records(*answer):
        record.add_answer(rr)
    for rr in records(*authority):
        record.add_auth(rr)
    extra = records(*additional)
    if opt == "first":
        record.add_ar(EDNS0(udp_len=1232))
    for rr in extra:
        record.add_ar(rr)
    if opt == "last":
        record.add_ar(EDNS0(udp_len=1232))
    return bytes(record.pack())


Section = tuple[tuple[str, int, str, str, str], ...]
Edns = tuple[int, int, bool, tuple[tuple[int, bytes], ...]]  # version, payload, DO, options


@dataclass(frozen=True, slots=True)
class Summary:
    """What a DNS message says, as dnspython reads it; names outside the question lowercased
    (DNS names compare case-insensitively), records sorted (order within a section is free)."""

    id: int
    opcode: int
    rcode: int
    flags: frozenset[str]
    question: tuple[tuple[str, str, str], ...]
    answer: Section
    authority: Section
    additional: Section
    edns: Edns | None

    def without_ttls(self) -> Summary:
        """The same summary with every TTL zeroed, for comparisons where TTLs are checked apart."""
        return Summary(self.id, self.opcode, self.rcode, self.flags, self.question,
                       _zero_ttls(self.answer), _zero_ttls(self.authority),
                       _zero_ttls(self.additional), self.edns)

    def ttls(self) -> list[int]:
        return [rec[1] for section in (self.answer, self.authority, self.additional)
                for rec in section]


def summary(packet: bytes) -> Summary:
    """Decode packet with dnspython (which also proves it is well formed)."""
    msg = dns.message.from_wire(packet)
    edns: Edns | None = None
    if msg.edns >= 0:
        edns = (msg.edns, msg.payload, bool(msg.ednsflags & dns.flags.DO),
                tuple((int(o.otype), o.to_wire()) for o in msg.options))
    return Summary(
        id=msg.id,
        opcode=msg.opcode(),
        rcode=msg.rcode(),
        flags=frozenset(dns.flags.to_text(msg.flags).split()),
        question=tuple((rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype),
                        dns.rdataclass.to_text(rrset.rdclass)) for rrset in msg.question),
        answer=_section(msg.answer),
        authority=_section(msg.authority),
        additional=_section(msg.additional),
        edns=edns,
    )


def _zero_ttls(section: Section) -> Section:
    return tuple(sorted((name, 0, rclass, rtype, rdata)
                        for name, _, rclass, rtype, rdata in section))


def _section(rrsets: list[dns.rrset.RRset]) -> Section:
    return tuple(sorted(
        (rrset.name.to_text().lower(), rrset.ttl, dns.rdataclass.to_text(rrset.rdclass),
         dns.rdatatype.to_text(rrset.rdtype), rdata.to_text().lower())
        for rrset in rrsets for rdata in rrset))


def dnslib_rcode(packet: bytes) -> tuple[int, int]:
    """(ID, full rcode including the EDNS extended bits) as dnslib reads the packet."""
    record = DNSRecord.parse(packet)
    rcode = record.header.rcode
    for rr in record.ar:
        if rr.rtype == QTYPE.OPT:
            rcode |= (rr.ttl >> 24) << 4
    return record.header.id, rcode
