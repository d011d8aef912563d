"""Malformed and unusual packets: answered with the right error or dropped, never a crash."""

from __future__ import annotations

import asyncio
import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import METRICS_ON
from tests.e2e import (
    ask,
    frame,
    make_query,
    metric,
    raw_udp,
    raw_udp_exchange,
    read_framed,
    scrape,
    where,
)
from tests.servers import ZONE

DROP_WAIT = 0.3  # how long to listen for an answer that must not come
QUESTION = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"  # www.example.test A IN


def packet(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0, body: bytes = QUESTION) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar) + body


def parse_reply(data: bytes | None) -> dns.message.Message:
    """A reply parsed by dnspython: every reply we send must be a well-formed message."""
    assert data is not None, "no reply"
    return dns.message.from_wire(data, ignore_trailing=False)


async def still_answers(server) -> None:
    response = await ask(server, "udp", make_query(ZONE.www, "A"))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x12", id="one-byte"),
        pytest.param(packet()[:11], id="eleven-bytes"),
        pytest.param(packet(flags=0x8180), id="a-response"),
        pytest.param(packet(flags=0x8180, qd=2), id="a-broken-response"),
    ],
)
async def test_dropped_without_an_answer(server, data):
    assert await raw_udp_exchange(server, data, timeout=DROP_WAIT) is None
    await still_answers(server)


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        pytest.param(packet(qd=2, body=QUESTION * 2), dns.rcode.FORMERR, id="two-questions"),
        pytest.param(packet(qd=0, body=b""), dns.rcode.FORMERR, id="no-question"),
        pytest.param(packet(body=QUESTION[:9]), dns.rcode.FORMERR, id="name-cut-short"),
        pytest.param(packet(body=QUESTION[:-2]), dns.rcode.FORMERR, id="class-cut-short"),
        pytest.param(packet(body=b"\xc0\x0c\x00\x01\x00\x01"), dns.rcode.FORMERR,
                     id="compressed-question"),
        pytest.param(packet(body=b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"),
                     dns.rcode.FORMERR, id="label-too-long"),
        pytest.param(packet(body=b"\x3fx"), dns.rcode.FORMERR, id="label-runs-past-end"),
        pytest.param(packet(body=(b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01"),
                     dns.rcode.FORMERR, id="name-too-long"),
        pytest.param(packet(ar=1), dns.rcode.FORMERR, id="missing-additional"),
        pytest.param(packet(ar=1, body=QUESTION + b"\x00\x00\x29\x04\xd0"), dns.rcode.FORMERR,
                     id="opt-cut-short"),
        pytest.param(packet(ar=2, body=QUESTION + (b"\x00\x00\x29\x04\xd0" + bytes(6)) * 2),
                     dns.rcode.FORMERR, id="two-opt-records"),
        pytest.param(packet(flags=0x0900), dns.rcode.NOTIMP, id="opcode-iquery"),
        pytest.param(packet(flags=0x1100), dns.rcode.NOTIMP, id="opcode-status"),
        pytest.param(packet(flags=0x2000), dns.rcode.NOTIMP, id="opcode-notify"),
        pytest.param(packet(flags=0x2800), dns.rcode.NOTIMP, id="opcode-update"),
        pytest.param(packet(flags=0x7800), dns.rcode.NOTIMP, id="opcode-15"),
    ],
)
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_error_answers(server, protocol, data, rcode):
    if protocol == "udp":
        reply = await raw_udp_exchange(server, data)
        assert reply is not None
    else:
        reader, writer = await asyncio.open_connection(*where(server))
        try:
            writer.write(frame(data))
            reply = await read_framed(reader)
            # the connection stays usable after a bad query
            writer.write(frame(make_query(ZONE.www, "A", qid=77).to_wire()))
            assert parse_reply(await read_framed(reader)).id == 77
        finally:
            writer.close()

    response = parse_reply(reply)
    assert response.id == 0x1234
    assert response.flags & dns.flags.QR
    assert response.rcode() == rcode
    assert response.opcode() == dns.opcode.from_flags(struct.unpack("!H", data[2:4])[0])
    assert response.answer == response.authority == []
    await still_answers(server)


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_edns_version_1_is_badvers(server, protocol):
    query = make_query(ZONE.www, "A", edns=1, qid=0x4321)
    data = query.to_wire()
    if protocol == "udp":
        reply = await raw_udp_exchange(server, data)
    else:
        reader, writer = await asyncio.open_connection(*where(server))
        try:
            writer.write(frame(data))
            reply = await read_framed(reader)
        finally:
            writer.close()

    response = parse_reply(reply)
    assert response.id == 0x4321
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0, "BADVERS answers with the version we speak"
    assert response.answer == []


async def test_tcp_short_message_is_dropped_and_the_connection_still_works(server):
    reader, writer = await asyncio.open_connection(*where(server))
    try:
        writer.write(frame(b"\x00\x01\x02") + frame(make_query(ZONE.www, "A", qid=31).to_wire()))
        assert parse_reply(await read_framed(reader)).id == 31
    finally:
        writer.close()


async def test_bad_input_is_counted(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    for data in (b"", packet()[:5], packet(flags=0x8180)):
        assert await raw_udp_exchange(server, data, timeout=DROP_WAIT) is None
    for data in (packet(qd=2, body=QUESTION * 2), packet(body=QUESTION[:9])):
        assert await raw_udp_exchange(server, data) is not None
    text = await scrape(server)

    assert metric(text, "resolver_queries_total", protocol="udp", outcome="dropped") == 3
    assert metric(text, "resolver_queries_total", protocol="udp", outcome="formerr") == 2


# -- fuzzing ------------------------------------------------------------------------------------

VALID = make_query("www.Example.test", "A", edns=0, do=True).to_wire()


@st.composite
def mutated_queries(draw) -> bytes:
    """A valid EDNS query with some bytes changed and perhaps cut or extended: reaches deeper
    into the decoder than random bytes do."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    return bytes(data) + draw(st.binary(max_size=40))


@pytest.fixture
async def fuzz_server(start_server, fault_upstream):
    """Anything the fuzzer gets forwarded is answered at once by the fault upstream."""
    return await start_server(fault_upstream("answer"))


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(min_size=0, max_size=600), mutated_queries()))
async def test_fuzz_never_crashes_and_every_reply_parses(fuzz_server, data):
    """Each junk packet is followed by a probe query on the same socket; everything that comes
    back before the probe's answer is a reply to junk and must parse."""
    probe = make_query("www.example.org", "A", qid=0xBEEF).to_wire()  # blocked: answered at once
    async with raw_udp(fuzz_server) as sock:
        sock.send(probe)
        expected = await sock.receive()
        assert expected is not None
        sock.send(data)
        sock.send(probe)
        while True:
            reply = await sock.receive()
            assert reply is not None, "the server stopped answering"
            if reply == expected:
                break
            parse_reply(reply)


async def test_fuzz_over_tcp_never_breaks_the_connection(fuzz_server):
    """Junk inside well-formed frames gets an error or nothing, and the next frame is served."""
    reader, writer = await asyncio.open_connection(*where(fuzz_server))
    try:
        for index, junk in enumerate([b"", b"\xff" * 11, b"\x00" * 12, packet(qd=9),
                                      bytes(range(256)), VALID[:20], VALID + b"\x00" * 100]):
            qid = 1000 + index
            writer.write(frame(junk) + frame(make_query("www.example.org", "A", qid=qid).to_wire()))
            while True:
                response = parse_reply(await read_framed(reader))
                if response.id == qid and response.question:
                    break
    finally:
        writer.close()
