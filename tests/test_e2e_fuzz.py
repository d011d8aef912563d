"""Fuzzing the running server over UDP and TCP with hypothesis: mutated valid queries, random
bytes, and streams cut anywhere. The server must never crash or hang, every reply must parse
(dnspython, strictly), and a normal query must be answered after each batch.

Two profiles: `fuzz` (the default, in CI: a few thousand examples in all, derandomized so a
run is repeatable) and `deep` (HYPOTHESIS_PROFILE=deep: 100,000 examples per test, random),
registered here because they are these tests' own.
"""

from __future__ import annotations

import asyncio
import os
import struct

import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.server.app import RunningServer
from tests.conftest import StartFault, StartServer
from tests.e2e import TIMEOUT, frame, make_query, raw_udp, read_framed, where

settings.register_profile(
    "fuzz", max_examples=1500, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile(
    "deep", max_examples=100_000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROFILE = settings.get_profile(
    "deep" if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else "fuzz")

SEEDS = [make_query(name, rdtype, edns=edns, do=do).to_wire()
         for name, rdtype, edns, do in [
             ("www.Example.test", "A", 0, True), ("a.b.c.example.test", "AAAA", None, False),
             ("www.example.org", "ANY", 0, False), ("x.test", "TXT", 0, False),
             ("sink.test", "A", None, False)]]
PROBE = make_query("www.example.org", "A", qid=0xBEEF).to_wire()  # blocked: answered at once


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid query with some bytes changed, perhaps cut or extended: reaches deeper into the
    decoder than random bytes do."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=64))


PACKETS = st.one_of(mutated(), st.binary(max_size=600))
BATCHES = st.lists(PACKETS, min_size=1, max_size=8)


def parses(reply: bytes) -> dns.message.Message:
    return dns.message.from_wire(reply, ignore_trailing=False)


@pytest.fixture
async def fuzzed(start_server: StartServer, fault_upstream: StartFault) -> RunningServer:
    """Anything the fuzzer gets forwarded is answered at once by the fault upstream (or, if it
    cannot read it, SERVFAIL after a short deadline, so a connection waits little for it)."""
    return await start_server(fault_upstream("answer"), server={"tcp_idle_timeout": 2.0},
                              upstream={"timeout": 0.05, "deadline": 0.1})


@PROFILE
@given(batch=BATCHES)
async def test_udp(fuzzed: RunningServer, batch: list[bytes]) -> None:
    """A batch of packets, then the probe on the same socket: everything that comes back before
    the probe's answer (and the late answers to forwarded junk) must parse."""
    async with raw_udp(fuzzed) as sock:
        for data in batch:
            if data:  # a datagram of no bytes cannot be sent through a connected socket
                sock.send(data)
        sock.send(PROBE)
        while True:
            reply = await sock.receive()
            assert reply is not None, "the server stopped answering"
            if parses(reply).id == 0xBEEF and reply[2] & 0x80:
                break


@PROFILE
@given(batch=BATCHES, framed=st.booleans(), cut=st.integers(0, 16))
async def test_tcp(fuzzed: RunningServer, batch: list[bytes], framed: bool, cut: int) -> None:
    """The batch as frames (or as a raw stream, which may declare frames it never finishes),
    cut short by up to `cut` bytes, then the client's end closed: every framed reply parses
    and the server closes its end; then a new connection is served."""
    stream = b"".join(frame(data) if framed else data for data in batch)
    stream = stream[:max(0, len(stream) - cut)]
    reader, writer = await asyncio.open_connection(*where(fuzzed))
    try:
        writer.write(stream)
        writer.write_eof()
        while True:
            try:
                head = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
            except asyncio.IncompleteReadError as end:
                assert end.partial == b""  # closed between replies, never inside one
                break
            (size,) = struct.unpack("!H", head)
            parses(await asyncio.wait_for(reader.readexactly(size), TIMEOUT))
    except ConnectionResetError:
        pass  # refused cheaply: allowed, as long as the next connection is served
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection(*where(fuzzed))
    try:
        writer.write(frame(PROBE))
        assert parses(await read_framed(reader)).id == 0xBEEF
    finally:
        writer.close()
