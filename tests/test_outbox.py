"""The Outbox: datagrams queued during a loop pass leave together, in order, once it ends."""

from __future__ import annotations

import asyncio

from resolver.server.outbox import Outbox

Address = tuple[str, int]


class Recorder:
    """A transport that records what it is asked to send."""

    def __init__(self, log: list[tuple[Recorder, bytes, Address | None]]) -> None:
        self.log = log

    def sendto(self, data: bytes, addr: Address | None = None) -> None:
        self.log.append((self, data, addr))


async def test_sends_wait_for_the_end_of_the_pass_and_keep_their_order():
    log: list[tuple[Recorder, bytes, Address | None]] = []
    client, upstream = Recorder(log), Recorder(log)
    outbox = Outbox()
    outbox.send(upstream, b"query")
    outbox.send(client, b"answer 1", ("127.0.0.1", 5300))
    outbox.send(client, b"answer 2", ("127.0.0.1", 5301))
    assert log == []  # nothing leaves while the callback that queued them runs
    await asyncio.sleep(0)
    assert log == [(upstream, b"query", None), (client, b"answer 1", ("127.0.0.1", 5300)),
                   (client, b"answer 2", ("127.0.0.1", 5301))]


class CountingOutbox(Outbox):
    """Counts its flushes."""

    __slots__ = ("flushes",)

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


async def test_one_flush_per_pass_and_a_new_one_for_the_next():
    log: list[tuple[Recorder, bytes, Address | None]] = []
    transport = Recorder(log)
    outbox = CountingOutbox()
    for index in range(3):
        outbox.send(transport, b"%d" % index)
    await asyncio.sleep(0)
    outbox.send(transport, b"next pass")
    await asyncio.sleep(0)
    assert [data for _, data, _ in log] == [b"0", b"1", b"2", b"next pass"]
    assert outbox.flushes == 2


class Broken:
    def sendto(self, data: bytes, addr: Address | None = None) -> None:
        raise ValueError("no route for this one")


async def test_a_send_that_raises_costs_the_others_nothing(caplog):
    log: list[tuple[Recorder, bytes, Address | None]] = []
    good = Recorder(log)
    outbox = Outbox()
    outbox.send(good, b"before")
    outbox.send(Broken(), b"bad", ("127.0.0.1", 9))
    outbox.send(good, b"after")
    await asyncio.sleep(0)
    assert [data for _, data, _ in log] == [b"before", b"after"]
    assert "could not send a datagram to ('127.0.0.1', 9)" in caplog.text
