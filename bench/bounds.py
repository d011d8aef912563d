"""Two reference forwarders that bound what a Python forward path can reach here (run by hand).

Neither is a server to deploy: UDP only, no timeouts, retries, coalescing of duplicates, TCP,
health, serve-stale or metrics endpoint. Each does, per cold query, the work every forwarder
must do, with one flat function per direction and no pipeline stages:

- `minimal`: everything inline on bytes and tuples: question read, suffix-dict rule walk,
  cache miss, random ID, send; reply matched by ID and question, records walked for the
  shortest TTL and the OPT record, a tuple cached, the answer patched and sent.
- `helpers`: the same flat flow over this project's own pieces: wire.parse_query (a Query),
  RuleSet.lookup, Cache (Entry and Reply objects), scan_reply, render and the Outbox.

Run them under the shared harness in place of ours, beside unbound, on the cold mix:

    ../shared/bench/compare.sh --peers unbound --mixes cold --ours \
        '.venv/bin/python bench/bounds.py helpers --port {port} --upstream {upstream} \
         --rules {rules_yaml}'

The ratio to unbound each prints, next to ours from bench/compare.sh, shows how much of the
gap to a target is the pipeline's layering (helpers vs ours) and how much is the objects and
bookkeeping every feature needs (minimal vs helpers). A cache hit answers with the stored
bytes and a new ID (TTLs not counted down): enough for the harness's checks, and the cold
mix never hits.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import socket
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resolver.cli import settle_memory
from resolver.message import (
    constants,
    wire,
)
from resolver.message.query import CacheKey, Query
from resolver.message.reply import TtlPolicy, render, scan_reply
from resolver.ops.config import CacheConfig
from resolver.ops.metrics import Metrics
from resolver.rules.loader import load_rules
from resolver.server.app import UDP_RECEIVE_BUFFER
from resolver.server.outbox import Outbox
from resolver.stages.cache import Cache
from resolver.upstream.ids import random_id

SOCKETS = 4
COUNTS = struct.Struct("!HHHHH")
RR_FIXED = struct.Struct("!HHIH")
UPSTREAM_OPT = wire.opt_record(False, size=1232)
NXDOMAIN_FLAGS = b"\x81\x83"  # QR RD RA, NXDOMAIN
MAX_CACHED = 100_000

Key = tuple[bytes, bytes, int]  # Minimal's cache key: name, type and class, CD
# What Minimal keeps of a forwarded query: its header's first 4 bytes, question, name, key,
# and who asked
Waiting = tuple[bytes, bytes, bytes, Key, tuple[str, int], "Client"]


class Minimal:
    """Per forward: bytes, one small object, tuples."""

    def __init__(self, rules, outbox: Outbox):
        self.rules = rules._get  # the compiled suffix dict's get: lowercase wire name -> rule
        self.outbox = outbox
        self.cache: OrderedDict[Key, bytes] = OrderedDict()
        self.inflight: dict[Key, Waiting] = {}

    def query(self, data: bytes, addr, client, upstream) -> None:
        if len(data) < 12 or data[2] & 0xF8 or data[4:6] != b"\x00\x01":
            return
        pos, offsets, length = 12, [], data[12]
        try:
            while length:
                if length > 63:
                    return
                offsets.append(pos - 12)
                pos += length + 1
                length = data[pos]
        except IndexError:
            return
        end = pos + 1
        name = data[12:end].lower()
        for offset in offsets:
            if self.rules(name[offset:]) is not None:
                client.transport.sendto(data[:2] + NXDOMAIN_FLAGS + data[4:], addr)
                return
        question = data[12:end + 4]
        key = (name, question[-4:], data[3] & 0x10)  # CD shapes the answer
        cached = self.cache.get(key)
        if cached is not None:
            client.transport.sendto(data[:2] + cached, addr)
            return
        if key in self.inflight:
            return
        waiter = self.inflight[key] = (data[:4], question, name, key, addr, client)
        sock, qid = upstream.take(waiter)
        self.outbox.send(sock.transport, struct.pack("!HHHHHH", qid, 0x0120, 1, 0, 0, 1)
                         + question + UPSTREAM_OPT)

    def reply(self, data: bytes, sock) -> None:
        waiter = sock.pending.get((data[0] << 8) | data[1]) if len(data) >= 12 else None
        if waiter is None:
            return
        head, question, name, key, addr, client = waiter
        qend = 12 + len(question)
        if not (data[2] & 0x80 and data[12:qend - 4].lower() == name
                and data[qend - 4:qend] == question[-4:]):
            return
        del sock.pending[(data[0] << 8) | data[1]]
        del self.inflight[key]
        flags, _, an, ns, ar = COUNTS.unpack_from(data, 2)
        pos, shortest, opt_at = qend, 86400, None
        for _ in range(an + ns + ar):
            start, label = pos, data[pos]
            pos = pos + 2 if label >= 0xC0 else pos + 1 if not label else wire.skip_name(data, pos)
            rtype, _, ttl, rdlength = RR_FIXED.unpack_from(data, pos)
            if rtype == constants.TYPE_OPT:
                opt_at = start
            elif ttl < shortest:
                shortest = ttl
            pos += 10 + rdlength
        if opt_at is not None:
            pos, ar = opt_at, ar - 1
        rest = (COUNTS.pack(0x8080 | (head[2] << 8 | head[3]) & 0x7910 | flags & 0xF, 1, an, ns, ar)
                + question + data[qend:pos])
        if shortest:
            self.cache[key] = rest
            if len(self.cache) > MAX_CACHED:
                self.cache.popitem(last=False)
        self.outbox.send(client.transport, head[:2] + rest, addr)


class Helpers:
    """Per forward: the project's Query, Reply and Entry objects, and its functions."""

    def __init__(self, rules, outbox: Outbox):
        self.rules = rules
        self.outbox = outbox
        metrics = Metrics()
        self.cache = Cache(CacheConfig(), metrics)
        self.policy = TtlPolicy()
        self.inflight: dict[CacheKey, tuple[Query, Client, float]] = {}
        self.counts: dict[tuple[str, str], int] = {}  # answers by protocol and outcome
        self.srtt = 0.0

    def query(self, data: bytes, addr, client, upstream) -> None:
        try:
            q = wire.parse_query(data, addr, "udp")
        except wire.FormError:
            return
        if self.rules.lookup(q.name, q.offsets) is not None:
            client.transport.sendto(data[:2] + NXDOMAIN_FLAGS + data[4:], addr)
            return
        key = q.cache_key
        entry = self.cache.entries.get(key)
        if entry is not None:
            client.transport.sendto(render(q, entry.reply, 0), addr)
            return
        if key in self.inflight:
            return
        waiter = self.inflight[key] = (q, client, time.monotonic())
        sock, qid = upstream.take(waiter)
        self.outbox.send(sock.transport, wire.upstream_query(q, qid, 1232))

    def reply(self, data: bytes, sock) -> None:
        qid = (data[0] << 8) | data[1] if len(data) >= 12 else None
        waiter = sock.pending.get(qid)
        if waiter is None:
            return
        q, client, sent = waiter
        end = 12 + len(q.question)
        if not (len(data) >= end and data[2] & 0x80 and data[4:6] == b"\x00\x01"
                and data[12:end - 4].lower() == q.name and data[end - 4:end] == q.question[-4:]):
            return
        del sock.pending[qid]
        self.srtt += 0.3 * (time.monotonic() - sent - self.srtt)  # an upstream's health
        del self.inflight[q.cache_key]
        reply = scan_reply(data, end, self.policy)
        self.cache.put(q.cache_key, reply)
        counts, label = self.counts, ("udp", "forwarded")
        counts[label] = counts.get(label, 0) + 1
        client.deliver(render(q, reply, 0), q.client)


class Socket(asyncio.DatagramProtocol):
    """An upstream UDP socket: what it has in flight, by ID."""

    def __init__(self, path) -> None:
        self.path = path
        self.pending: dict[int, object] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.path.reply(data, self)


class Upstream:
    """SOCKETS connected sockets, taken in turn."""

    def __init__(self) -> None:
        self.sockets: list[Socket] = []
        self.turn = 0

    def take(self, waiter) -> tuple[Socket, int]:
        """The next socket and a random ID not in flight on it, now holding waiter."""
        self.turn = (self.turn + 1) % len(self.sockets)
        sock, qid = self.sockets[self.turn], random_id()
        while qid in sock.pending:
            qid = random_id()
        sock.pending[qid] = waiter
        return sock, qid


class Client(asyncio.DatagramProtocol):
    def __init__(self, path, upstream: Upstream, outbox: Outbox) -> None:
        self.path, self.upstream, self.outbox = path, upstream, outbox

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.deliver = functools.partial(self.outbox.send, transport)

    def datagram_received(self, data: bytes, addr) -> None:
        self.path.query(data, addr, self, self.upstream)


async def serve(mode: str, port: int, upstream_address: tuple[str, int], rules_file: str) -> None:
    loop = asyncio.get_running_loop()
    outbox = Outbox()
    path = (Minimal if mode == "minimal" else Helpers)(load_rules([rules_file]), outbox)
    upstream = Upstream()
    for _ in range(SOCKETS):
        _, sock = await loop.create_datagram_endpoint(lambda: Socket(path),
                                                      remote_addr=upstream_address)
        upstream.sockets.append(sock)
    transport, _ = await loop.create_datagram_endpoint(lambda: Client(path, upstream, outbox),
                                                       local_addr=("127.0.0.1", port))
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                  UDP_RECEIVE_BUFFER)  # as app.py asks
    print(f"bounds: {mode} forwarder on 127.0.0.1:{port} (UDP only)", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("minimal", "helpers"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--rules", required=True, help="a rule file in our YAML format")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    settle_memory()
    try:
        uvloop.run(serve(args.mode, args.port, (host, int(port)), args.rules))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
