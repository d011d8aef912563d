"""Table tests for resolver/wire.py: decoding queries from bytes and the error answers."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import pytest
from dnslib import EDNS0, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.message import constants, wire
from tests.dnsmsg import (
    CLIENT,
    dnslib_rcode,
    parse,
    query,
    query_packet,
    records,
    response,
    summary,
)

WWW = b"\x03www\x07example\x03org\x00"


@pytest.mark.parametrize(
    ("packet", "name", "offsets", "qtype", "qclass", "edns", "udp_size", "do"),
    [
        (query_packet("www.example.org"), WWW, [0, 4, 12], 1, 1, False, 512, False),
        (query_packet("example.org", "AAAA"), WWW[4:], [0, 8], 28, 1, False, 512, False),
        (query_packet("a.test.", "MX"), b"\x01a\x04test\x00", [0, 2], 15, 1, False, 512, False),
        (query_packet(".", "NS"), b"\x00", [], 2, 1, False, 512, False),
        (query_packet("www.example.org", "TXT", qclass="CH"), WWW, [0, 4, 12], 16, 3,
         False, 512, False),
        (query_packet("www.example.org", edns=True), WWW, [0, 4, 12], 1, 1, True, 1232, False),
        (query_packet("www.example.org", edns=True, do=True, udp=4096), WWW, [0, 4, 12], 1, 1,
         True, 4096, True),
        (query_packet("www.example.org", edns=True, udp=512), WWW, [0, 4, 12], 1, 1,
         True, 512, False),
        (query_packet("www.example.org", edns=True, udp=100), WWW, [0, 4, 12], 1, 1,
         True, 512, False),  # RFC 6891 6.2.5: below 512 means 512
        (query_packet("www.example.org", edns=True, udp=0, do=True), WWW, [0, 4, 12], 1, 1,
         True, 512, True),
    ],
)
def test_parse_query_fields(packet: bytes, name: bytes, offsets: list[int], qtype: int,
                            qclass: int, edns: bool, udp_size: int, do: bool) -> None:
    q = parse(packet, "tcp")
    assert (q.name, q.offsets, q.qtype, q.qclass) == (name, offsets, qtype, qclass)
    assert (q.edns, q.udp_size, q.do) == (edns, udp_size, do)
    assert q.data is packet and q.client == CLIENT and q.transport == "tcp"
    assert q.question == packet[12:12 + len(name) + 4]
    assert q.flags == struct.unpack_from("!H", packet, 2)[0]
    for offset in offsets:  # each offset starts a suffix that is itself a name
        assert q.name[offset:].endswith(b"\x00") and 0 < q.name[offset] <= 63


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("WwW.ExAmple.ORG", WWW),
        ("WWW.EXAMPLE.ORG.", WWW),
        ("www.example.org", WWW),
    ],
)
def test_parse_query_keeps_case_in_question_only(text: str, name: bytes) -> None:
    packet = query_packet(text)
    q = parse(packet)
    assert q.name == name
    assert q.question[:-4] == b"".join(
        bytes((len(label),)) + label.encode() for label in text.rstrip(".").split(".")) + b"\x00"
    assert q.question == packet[12:12 + len(name) + 4]


def test_parse_query_edns_after_other_additional_records() -> None:
    """The OPT record need not come first; a non-OPT record before it is skipped."""
    record = DNSRecord.question("www.example.org")
    record.add_ar(*records("x.example.org. 60 IN A 192.0.2.1"))
    record.add_ar(EDNS0(udp_len=2048, flags="do"))
    q = parse(record.pack())
    assert (q.edns, q.udp_size, q.do) == (True, 2048, True)


@pytest.mark.parametrize("convert", [bytearray, memoryview])
def test_parse_query_takes_any_buffer_and_keeps_bytes(convert: type) -> None:
    """Transports may hand over a bytearray; keys and answers must still be bytes."""
    q = parse(convert(query_packet("Www.example.org", edns=True)))
    assert type(q.name) is bytes and type(q.question) is bytes and q.name == WWW
    assert hash(q.cache_key)


def test_cache_key_separates_do_and_cd() -> None:
    keys = {query("www.example.org").cache_key,
            query("WWW.example.org", qid=9).cache_key,  # same: case and ID do not matter
            query("www.example.org", edns=True).cache_key,  # same: EDNS without DO
            query("www.example.org", edns=True, do=True).cache_key,
            query("www.example.org", cd=True).cache_key,
            query("www.example.org", "AAAA").cache_key}
    assert len(keys) == 4


def _header(qid: int = 0xBEEF, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
            ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def _with_ar(*opts: EDNS0) -> bytes:
    record = DNSRecord.question("www.example.org")
    record.header.id = 0xBEEF
    for opt in opts:
        record.add_ar(opt)
    return bytes(record.pack())


def _two_questions() -> bytes:
    record = DNSRecord.question("www.example.org")
    record.header.id = 0xBEEF
    record.add_question(DNSQuestion("example.org"))
    return bytes(record.pack())


def _name(*lengths: int) -> bytes:
    return b"".join(bytes((n,)) + b"x" * n for n in lengths) + b"\x00"


QUESTION = WWW + b"\x00\x01\x00\x01"
NAME_255 = _name(63, 63, 63, 61)  # 64 * 3 + 62 + 1 = 255 octets: the longest legal name
NAME_256 = _name(63, 63, 63, 62)


@pytest.mark.parametrize(
    ("packet", "rcode"),
    [
        (b"", None),
        (b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00", None),  # 11 bytes: short header
        (_header(flags=0x8100) + QUESTION, None),  # QR: a response, never answered
        (_header(flags=0x8000 | 0x2800) + QUESTION, None),  # QR wins over opcode
        (_header(flags=0x1000) + QUESTION, constants.NOTIMP),  # opcode 2, STATUS
        (_header(flags=0x2100) + QUESTION, constants.NOTIMP),  # opcode 4, NOTIFY
        (_header(flags=0x2800) + QUESTION, constants.NOTIMP),  # opcode 5, UPDATE
        (_header(qd=0), constants.FORMERR),
        (_header(qd=0) + QUESTION, constants.FORMERR),
        (_two_questions(), constants.FORMERR),
        (_header(), constants.FORMERR),  # qdcount 1 but nothing follows
        (_header() + b"\x07example\x03org", constants.FORMERR),  # name runs past the end
        (_header() + b"\x07exam", constants.FORMERR),  # label runs past the end
        (_header() + b"\xc0\x0c\x00\x01\x00\x01", constants.FORMERR),  # compression pointer
        # a pointer after a label
        (_header() + b"\x03www\xc0\x0c\x00\x01\x00\x01", constants.FORMERR),
        # label type 01
        (_header() + b"\x41" + b"x" * 65 + b"\x00\x00\x01\x00\x01", constants.FORMERR),
        (_header() + NAME_256 + b"\x00\x01\x00\x01", constants.FORMERR),  # name > 255 octets
        (_header() + _name(63, 63, 63, 63, 63) + b"\x00\x01\x00\x01", constants.FORMERR),
        (_header() + WWW, constants.FORMERR),  # type and class missing
        (_header() + WWW + b"\x00\x01\x00", constants.FORMERR),  # class cut short
        (_with_ar(EDNS0(udp_len=1232), EDNS0(udp_len=1232)), constants.FORMERR),  # two OPT records
        (_with_ar(EDNS0(rname="example.org", udp_len=1232)), constants.FORMERR),  # OPT not at root
        (_header(ar=1) + QUESTION, constants.FORMERR),  # additional record missing
        (_header(ar=1) + QUESTION + b"\x00\x00\x29\x04", constants.FORMERR),  # OPT cut short
        (_header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x08\x00\x0f",
         constants.FORMERR),  # OPT rdata runs past the end
        (_header(an=1, ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
         constants.FORMERR),  # one record where two are announced
        (_with_ar(EDNS0(udp_len=1232, version=1)), constants.BADVERS),
        (_with_ar(EDNS0(udp_len=1232, version=255, flags="do")), constants.BADVERS),
    ],
)
def test_parse_query_form_errors(packet: bytes, rcode: int | None) -> None:
    with pytest.raises(wire.FormError) as raised:
        wire.parse_query(packet, CLIENT, "udp")
    response = raised.value.response
    if rcode is None:
        assert response is None
        return
    assert response is not None
    assert dnslib_rcode(response) == (0xBEEF, rcode)
    got = summary(response)
    assert (got.id, got.rcode) == (0xBEEF, rcode)
    assert got.opcode == (struct.unpack_from("!H", packet, 2)[0] >> 11) & 0xF
    assert {"QR", "RA"} <= got.flags and "AA" not in got.flags
    assert got.question == () and got.answer == got.authority == got.additional == ()
    if rcode == constants.BADVERS:
        assert got.edns is not None and got.edns[0] == 0  # we answer in the version we speak


@pytest.mark.parametrize("name", [NAME_255, _name(63), _name(1, 1, 1)])
def test_parse_query_accepts_long_names(name: bytes) -> None:
    q = parse(_header() + name + b"\x00\x10\x00\x01")
    assert q.name == name and q.qtype == 16


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_parse_query_raises_only_form_error_on_any_bytes(data: bytes) -> None:
    try:
        q = wire.parse_query(data, CLIENT, "udp")
    except wire.FormError as exc:
        if exc.response is not None:
            assert exc.response[:2] == data[:2]
    else:
        assert q.question == data[12:12 + len(q.name) + 4]


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 3), st.integers(0, 3), st.binary(max_size=300))
def test_parse_query_raises_only_form_error_after_a_question(flags: int, an: int, ar: int,
                                                             tail: bytes) -> None:
    """Random records after a valid question: the EDNS scan must fail cleanly too."""
    packet = (_header(flags=flags & ~(constants.QR | constants.OPCODE), an=an, ar=ar)
              + QUESTION + tail)
    try:
        wire.parse_query(packet, CLIENT, "udp")
    except wire.FormError as exc:
        assert exc.response is None or exc.response[:2] == packet[:2]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0x0100, {"QR", "RA", "RD"}),
        (0x0000, {"QR", "RA"}),
        (0x0110, {"QR", "RA", "RD", "CD"}),
        (0x0520, {"QR", "RA", "RD"}),  # AA and AD from the client are not echoed
    ],
)
@pytest.mark.parametrize(("edns", "do"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("rcode", [constants.SERVFAIL, constants.REFUSED, constants.NOERROR])
def test_error_answer(flags: int, expected: set[str], edns: bool, do: bool, rcode: int) -> None:
    packet = bytearray(query_packet("WWW.example.org", "AAAA", qid=77, edns=edns, do=do))
    struct.pack_into("!H", packet, 2, flags)
    got = summary(wire.error_answer(parse(bytes(packet)), rcode))
    assert (got.id, got.rcode, got.flags) == (77, rcode, frozenset(expected))
    assert got.question == (("WWW.example.org.", "AAAA", "IN"),)
    assert got.answer == got.authority == got.additional == ()
    assert got.edns == ((0, 1232, do, ()) if edns else None)


@pytest.mark.parametrize(
    ("transport", "edns", "udp", "size", "truncated"),
    [
        ("udp", False, 0, 512, False),
        ("udp", False, 0, 513, True),
        ("udp", True, 1232, 1232, False),
        ("udp", True, 1232, 1233, True),
        ("udp", True, 100, 513, True),  # clamped to 512
        ("tcp", False, 0, 65535, False),
        ("tcp", True, 1232, 65536, True),  # no frame can carry it: SERVFAIL
    ],
)
def test_fit(transport: str, edns: bool, udp: int, size: int, truncated: bool) -> None:
    q = query("www.example.org", transport=transport, edns=edns, udp=udp, do=True)
    answer = b"\x00" * size
    fitted = wire.fit(q, answer)
    if not truncated:
        assert fitted is answer
        return
    got = summary(fitted)
    if transport == "udp":
        assert "TC" in got.flags and got.rcode == constants.NOERROR
    else:
        assert "TC" not in got.flags and got.rcode == constants.SERVFAIL
    assert got.question == (("www.example.org.", "A", "IN"),) and got.answer == ()
    assert got.edns == ((0, 1232, True, ()) if edns else None)


@pytest.mark.parametrize(("cd", "do"), [(False, False), (True, False), (False, True)])
def test_upstream_query(cd: bool, do: bool) -> None:
    q = query("WwW.example.org", "MX", qid=5, cd=cd, do=do, edns=do, rd=False)
    msg = dns.message.from_wire(wire.upstream_query(q, 0xABCD, 1400))
    assert msg.id == 0xABCD and msg.rcode() == dns.rcode.NOERROR
    assert dns.flags.to_text(msg.flags).split() == ["RD", "AD"] + (["CD"] if cd else [])
    assert msg.question[0].name.to_text() == "WwW.example.org."  # 0x20 case kept upstream
    assert (msg.edns, msg.payload, bool(msg.ednsflags & dns.flags.DO)) == (0, 1400, do)



# read_name: (message bytes, start) -> (lowercase uncompressed name, end) or the error
HEAD = b"\x00" * 12
EXAMPLE_ORG_AT_12 = HEAD + b"\x07Example\x03ORG\x00"  # example.org at offset 12


@pytest.mark.parametrize(
    ("data", "pos", "expected"),
    [
        (EXAMPLE_ORG_AT_12, 12, (b"\x07example\x03org\x00", 25)),
        (EXAMPLE_ORG_AT_12 + b"\x03WWW\xc0\x0c", 25, (b"\x03www\x07example\x03org\x00", 31)),
        (EXAMPLE_ORG_AT_12 + b"\xc0\x0c", 25, (b"\x07example\x03org\x00", 27)),  # bare pointer
        (EXAMPLE_ORG_AT_12 + b"\x01a\xc0\x14", 25, (b"\x01a\x03org\x00", 29)),  # into a name
        (EXAMPLE_ORG_AT_12 + b"\x01b\xc0\x0c\x01a\xc0\x19", 29,  # a pointer to a pointer
         (b"\x01a\x01b\x07example\x03org\x00", 33)),
        (HEAD + b"\x00", 12, (b"\x00", 13)),  # the root
        (HEAD + b"\x3f" + b"x" * 63 + b"\x00", 12, (b"\x3f" + b"x" * 63 + b"\x00", 77)),
    ],
)
def test_read_name(data: bytes, pos: int, expected: tuple[bytes, int]) -> None:
    assert wire.read_name(data, pos) == expected


LONG = b"".join(b"\x3f" + b"x" * 63 for _ in range(3)) + b"\x3d" + b"x" * 61  # 254 octets


@pytest.mark.parametrize(
    ("data", "pos", "problem"),
    [
        (HEAD + b"\xc0\x0c", 12, "backwards"),  # points at itself
        (HEAD + b"\x01a\xc0\x0c", 12, "backwards"),  # back to its own start: a loop
        (HEAD + b"\x01a\xc0\x20", 12, "backwards"),  # forwards
        (EXAMPLE_ORG_AT_12 + b"\xc0", 25, "past the end"),
        (HEAD + b"\x07exam", 12, "past the end"),
        (HEAD + b"\x03www", 12, "past the end"),
        (HEAD + b"\x41" + b"x" * 65, 12, "unknown label type"),
        (HEAD + b"\x80\x00", 12, "unknown label type"),
        (HEAD + LONG + b"\x00", 12, None),  # 255 octets with the root: the most allowed
        (HEAD + LONG + b"\x01y\x00", 12, "longer than 255"),
    ],
)
def test_read_name_rejects_malformed_names(data: bytes, pos: int, problem: str | None) -> None:
    if problem is None:
        assert wire.read_name(data, pos) == (LONG + b"\x00", len(data))
        return
    with pytest.raises(ValueError, match=problem):
        wire.read_name(data, pos)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.integers(min_value=0, max_value=80))
def test_read_name_raises_only_value_error_on_any_bytes(data: bytes, pos: int) -> None:
    try:
        name, end = wire.read_name(data, pos)
    except ValueError:
        return
    assert name.endswith(b"\x00") and len(name) <= 255 and pos < end <= len(data)


@pytest.mark.parametrize(("reply", "answers"), [
    (response("www.example.org"), True),
    (response("WWW.Example.ORG"), True),  # the upstream may answer in any case
    (response("www.example.net"), False),  # another name
    (response("www.example.org", "AAAA"), False),  # another type
    (response("www.example.org")[:2] + b"\x01\x00" + response("www.example.org")[4:], False),
    (response("www.example.org")[:20], False),  # cut short
    (response("www.example.org")[:4] + b"\x00\x02" + response("www.example.org")[6:], False),
], ids=["same", "case", "name", "type", "not a response", "short", "two questions"])
def test_answers_says_whether_a_reply_is_to_our_question(reply: bytes, answers: bool) -> None:
    assert wire.answers(reply, query("www.example.org")) is answers
