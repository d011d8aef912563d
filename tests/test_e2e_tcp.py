"""The TCP transport: pipelining (RFC 7766), the idle timeout and the connection cap."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import dns.message
import dns.rcode
import pytest

from tests.e2e import TIMEOUT, ask, frame, make_query, read_framed, rrsets, where
from tests.servers import ZONE


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bool:
    """Whether the server closes (or resets) the connection within timeout."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_pipelined_queries_on_one_connection(server):
    """Queries written back to back are all answered, matched by ID, whatever the order."""
    queries = {
        101: (make_query(ZONE.www, "A", qid=101), dns.rcode.NOERROR),  # forwarded
        102: (make_query("www.example.org", "A", qid=102), dns.rcode.NXDOMAIN),  # blocked
        103: (make_query(ZONE.missing, "A", qid=103), dns.rcode.NXDOMAIN),  # forwarded, negative
        104: (make_query(ZONE.mixed, "TXT", qid=104), dns.rcode.NOERROR),  # forwarded
    }
    reader, writer = await asyncio.open_connection(*where(server))
    try:
        writer.write(b"".join(frame(query.to_wire()) for query, _ in queries.values()))
        answers = [dns.message.from_wire(await read_framed(reader)) for _ in queries]
    finally:
        writer.close()

    assert sorted(answer.id for answer in answers) == sorted(queries)
    for answer in answers:
        query, rcode = queries[answer.id]
        assert query.is_response(answer)
        assert answer.rcode() == rcode
    by_id = {answer.id: answer for answer in answers}
    assert rrsets(by_id[101].answer) == {(ZONE.www, "A", frozenset({ZONE.www_a}))}


async def test_a_query_split_across_segments(server):
    """Framing is by the length prefix, not by how the bytes arrive."""
    data = frame(make_query(ZONE.www, "A", qid=7).to_wire())
    reader, writer = await asyncio.open_connection(*where(server))
    try:
        for chunk in (data[:1], data[1:5], data[5:]):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        answer = dns.message.from_wire(await read_framed(reader))
    finally:
        writer.close()
    assert answer.id == 7
    assert rrsets(answer.answer) == {(ZONE.www, "A", frozenset({ZONE.www_a}))}


async def test_idle_connection_is_closed(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, server={"tcp_idle_timeout": 0.5})
    reader, writer = await asyncio.open_connection(*where(server))
    try:
        writer.write(frame(make_query(ZONE.www, "A", qid=9).to_wire()))
        assert dns.message.from_wire(await read_framed(reader)).id == 9
        assert await closed_by_server(reader)
    finally:
        writer.close()


async def test_idle_timeout_waits_for_answers_still_owed(start_server, fault_upstream):
    """A connection whose query is still upstream is not idle."""
    upstream = fault_upstream("slow", delay=0.8)
    server = await start_server(upstream, server={"tcp_idle_timeout": 0.3},
                                upstream={"timeout": 2.0, "deadline": 3.0})
    reader, writer = await asyncio.open_connection(*where(server))
    try:
        writer.write(frame(make_query("slow.example.test", "A", qid=5).to_wire()))
        answer = dns.message.from_wire(await read_framed(reader))
        assert answer.id == 5
        assert answer.rcode() == dns.rcode.NOERROR
        assert await closed_by_server(reader)
    finally:
        writer.close()


async def test_connection_cap(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, server={"tcp_max_connections": 2})
    query = make_query("www.example.org", "A", qid=11)  # blocked: answered synchronously
    first = await asyncio.open_connection(*where(server))
    second = await asyncio.open_connection(*where(server))
    try:
        for reader, writer in (first, second):  # both are served
            writer.write(frame(query.to_wire()))
            assert dns.message.from_wire(await read_framed(reader)).id == 11

        reader, writer = await asyncio.open_connection(*where(server))
        try:
            assert await closed_by_server(reader), "a third connection is refused"
        finally:
            writer.close()

        first[1].close()
        await first[1].wait_closed()
        for _ in range(50):  # the server notices the close shortly after
            if await _answers_over_a_new_connection(server):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("no new connection accepted after one closed")
    finally:
        second[1].close()


async def _answers_over_a_new_connection(server) -> bool:
    try:
        response = await ask(server, "tcp", make_query(ZONE.www, "A"))
    except (ConnectionError, EOFError, asyncio.IncompleteReadError):
        return False
    return response.rcode() == dns.rcode.NOERROR


async def test_a_client_that_stops_reading_loses_its_slot_at_the_idle_timeout(
        start_server, nsd_upstream):
    """Its unread answers would keep close() waiting for ever, holding one of the
    tcp_max_connections slots: at the idle timeout it is aborted instead."""
    server = await start_server(nsd_upstream, server={"tcp_idle_timeout": 0.3,
                                                      "tcp_max_connections": 1})
    hog = socket.create_connection(where(server))
    try:
        hog.setblocking(False)
        blocked = frame(make_query("www.example.org", "A", qid=1).to_wire()) * 100
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):  # until the server stops reading it (pause_writing)
                hog.send(blocked)
        await asyncio.sleep(1.0)  # past the idle timeout
        reader, writer = await asyncio.open_connection(*where(server))
        try:
            writer.write(frame(make_query("www.example.org", "A", qid=2).to_wire()))
            assert dns.message.from_wire(await read_framed(reader)).id == 2
        finally:
            writer.close()
    finally:
        hog.close()


async def test_a_trickle_of_an_unfinished_frame_does_not_keep_a_connection(
        start_server, nsd_upstream):
    """Slowloris: only whole queries count as activity."""
    server = await start_server(nsd_upstream, server={"tcp_idle_timeout": 0.4})
    reader, writer = await asyncio.open_connection(*where(server))

    async def trickle() -> None:
        writer.write(b"\x01")  # a frame of 256+ bytes, begun and never finished
        for _ in range(20):
            await asyncio.sleep(0.15)
            writer.write(b"\x00")

    trickling = asyncio.ensure_future(trickle())
    try:
        assert await closed_by_server(reader, timeout=1.5), "kept open by the trickle"
    finally:
        trickling.cancel()
        writer.close()


async def test_a_half_closed_connection_still_gets_its_forwarded_answer(start_server,
                                                                      fault_upstream):
    upstream = fault_upstream("slow", delay=0.3)
    server = await start_server(upstream, upstream={"timeout": 2.0, "deadline": 3.0})
    reader, writer = await asyncio.open_connection(*where(server))
    try:
        writer.write(frame(make_query("slow.example.test", "A", qid=21).to_wire()))
        writer.write(frame(make_query("www.example.org", "A", qid=22).to_wire()))  # blocked
        writer.write_eof()
        ids = {dns.message.from_wire(await read_framed(reader)).id for _ in range(2)}
        assert ids == {21, 22}
        assert await closed_by_server(reader), "closed once nothing more is owed"
    finally:
        writer.close()
