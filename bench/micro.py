"""Per-stage cost of the hot path, in microseconds per query, without sockets.

Run by hand: `.venv/bin/python bench/micro.py`. It builds the real pipeline (shipped rules,
default config, metrics on) and times each stage on its own, then whole `Pipeline.handle`
calls for a blocked name and a cache hit (the full path), datagrams given to the real UDP
entry point and answered by the packet cache (the replay path a repeated question takes; the
transport only counts), and the Python cost of a forwarded query on either side of the
upstream socket, so a regression shows where the time went. The garbage collector runs
with the server's settings (cli.settle_memory).
Numbers move with the machine; compare them between commits on one machine. The last line,
the bytecode instructions one forwarded query runs on either side of the upstream socket,
does not move with the machine: it is the measure of the forwarding path's Python work.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import dnslib
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resolver.cli import settle_memory
from resolver.message import wire
from resolver.message.names import label_offsets, to_wire
from resolver.message.query import Outcome, Query
from resolver.message.reply import TtlPolicy, render, scan_reply
from resolver.ops.config import (
    LOCAL_NETWORKS,
    Config,
    QueryLogConfig,
    RateLimitConfig,
    UpstreamConfig,
    UpstreamServer,
)
from resolver.ops.metrics import UNTIMED, Metrics, new_row, observe
from resolver.ops.querylog import BATCH, Format, QueryLog, RotatingFile
from resolver.rules import table
from resolver.rules.loader import load_rules, read_rules
from resolver.rules.matcher import RuleSet
from resolver.server.app import build_pipeline
from resolver.server.outbox import Outbox
from resolver.server.udp import Gate, UdpServer
from resolver.stages.access import Networks
from resolver.stages.blocking import Blocker
from resolver.stages.cache import CacheLookup
from resolver.stages.contract import Answered
from resolver.stages.prefetch import Prefetch
from resolver.stages.ratelimit import Limiter
from resolver.upstream import udp as upstream_udp
from resolver.upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from _typeshed import TraceFunction

CLIENT = ("127.0.0.1", 40000)


class NullSink:
    """Stands in for a transport: the micro-benchmark never forwards."""

    name = "udp"

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None:
        raise AssertionError("a benchmarked query went upstream")


def packet(name: str, edns: bool) -> bytes:
    record = dnslib.DNSRecord.question(name)
    if edns:
        record.add_ar(dnslib.EDNS0(udp_len=1232))
    return bytes(record.pack())


def upstream_reply(query: bytes) -> bytes:
    """What an upstream would send for `query`: one A record."""
    record = dnslib.DNSRecord.parse(query)
    reply = record.reply(ra=1, aa=0)
    reply.add_answer(dnslib.RR(record.q.qname, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.10"),
                               ttl=300))
    return bytes(reply.pack())


class CountingTransport:
    """The client-facing UDP transport: counts what would be sent, sends nothing."""

    def __init__(self) -> None:
        self.sent = 0

    def sendto(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        self.sent += 1

    def is_closing(self) -> bool:
        return False


def udp_server(packets: Gate, outbox: Outbox) -> tuple[UdpServer, CountingTransport]:
    """The real UDP entry point (access and rate limits, packet cache, then the pipeline) on
    a counting transport."""
    server, transport = UdpServer(packets, outbox), CountingTransport()
    server.connection_made(transport)
    return server, transport


class CapturingTransport:
    """An upstream socket's transport that keeps what is sent instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        self.sent.append(data)


async def forward_round_trip(config: Config, rules: RuleSet, number: int
                             ) -> tuple[float, float, int, int]:
    """µs of Python per forwarded query: client query to upstream socket, and upstream reply
    to client answer (scan, cache store, render, count), without the syscalls. Queries go in
    batches of 100 in flight, as under dnsperf -q 100; each name is new (a cache miss)."""
    metrics = Metrics()
    outbox = Outbox()
    pool = UpstreamPool(config.upstream, metrics, outbox=outbox)
    await pool.open()  # real sockets (to the discard port), whose transports are then swapped
    sockets = pool.upstreams[0].udp._sockets  # type: ignore[union-attr]  # a bench may pry
    for sock in sockets:
        sock.transport.close()
        sock.transport = CapturingTransport()
    upstream_udp.SOCKET_QUERIES = 1 << 62  # the capturing sockets are never swapped
    loop = asyncio.get_running_loop()
    chain = build_pipeline(config, rules, metrics, pool, time.monotonic, loop.call_later)
    server, client_side = udp_server(chain.front, outbox)
    queries = [packet(f"n{i}.cold.example", False) for i in range(number)]
    out = back = 0.0
    for start in range(0, number, 100):
        began = time.perf_counter()
        for query in queries[start:start + 100]:
            server.datagram_received(query, CLIENT)
        outbox.flush()
        out += time.perf_counter() - began
        sent = [(sock, data) for sock in sockets for data in sock.transport.sent]
        for sock in sockets:
            sock.transport.sent.clear()
        replies = [(sock, upstream_reply(data)) for sock, data in sent]
        began = time.perf_counter()
        for sock, reply in replies:
            sock.datagram_received(reply, None)
        outbox.flush()
        back += time.perf_counter() - began
    assert client_side.sent == number, client_side.sent
    # One more query, its bytecodes counted: a measure that does not move with the machine.
    counted = packet("counted.example", False)

    def query_out() -> None:
        server.datagram_received(counted, CLIENT)
        outbox.flush()

    ops_out = bytecodes(query_out)
    sock, data = next((sock, data) for sock in sockets for data in sock.transport.sent)
    reply = upstream_reply(data)

    def reply_back() -> None:
        sock.datagram_received(reply, None)
        outbox.flush()

    ops_back = bytecodes(reply_back)
    return out / number * 1e6, back / number * 1e6, ops_out, ops_back


def bytecodes(func: Callable[[], None]) -> int:
    """How many bytecode instructions func() runs, in every Python function it calls."""
    count = 0

    def trace(frame: FrameType, event: str, arg: object) -> TraceFunction:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        func()
    finally:
        sys.settrace(None)
    return count - 5  # func's own: its start, the two results it drops, its return


# Staged lists beside the shipped ones, for the decision lines: a scoped block, a rollout
# list and a dry-run list on one name (both judged for the client), and a name on neither.
STAGED = """\
lists:
  - name: scoped
    clients: [127.0.0.0/8]
    domains: [scoped.example]
  - name: canary
    rollout: 50%
    domains: [canary.example]
  - name: watch
    mode: dry-run
    domains: [canary.example]
"""


def staged_rules(shipped: tuple[str, ...]) -> RuleSet:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as extra:
        extra.write(STAGED)
        extra.flush()
        return load_rules([*shipped, extra.name])


def lookup_rows(shipped: RuleSet, count: int) -> list[tuple[str, Callable[[], object], int]]:
    """RuleSet.lookup alone: the shipped set (a dict) against `count` generated domains with
    the shipped ones (the compact table of rules/table.py), and the shipped set forced
    compact. Each row is (label, a function making `per` lookups, per), over many names,
    since a compact table's probe run differs from name to name and from process to process
    (the hash key): hits are a name under each shipped domain (two suffixes tried), misses
    1,000 names under example<N>.org (two)."""
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "big.txt"
        path.write_text("".join(f"d{i}.example\n" for i in range(count)))
        big = load_rules([*shipped_paths(), str(path)])
        forced = table.COMPACT_FROM
        table.COMPACT_FROM = 0
        try:
            small_compact = load_rules(shipped_paths())
        finally:
            table.COMPACT_FROM = forced
    hits = [b"\x01x\x03www" + name for name, _ in read_rules(shipped_paths())[1]]
    misses = [to_wire(f"www.example{i}.org") for i in range(1000)]
    rows: list[tuple[str, Callable[[], object], int]] = []
    for label, rules in ((f"{shipped.domain_count} (dict)", shipped),
                         (f"{shipped.domain_count} (compact)", small_compact),
                         (f"{big.domain_count:,} (compact)", big)):
        for what, names in (("hit", hits), ("miss", misses)):
            rows.append((f"lookup {what}, {label}", bound_lookups(rules, names), len(names)))
    return rows


def bound_lookups(rules: RuleSet, names: list[bytes]) -> Callable[[], object]:
    pairs = [(name, label_offsets(name)) for name in names]
    lookup = rules.lookup

    def run() -> None:
        for name, offsets in pairs:
            lookup(name, offsets)

    return run


def shipped_paths() -> list[str]:
    return list(Config().blocking.rules)


class NullDestination:
    def write(self, lines: object) -> None:
        pass

    def close(self) -> None:
        pass


def querylog_rows(rules: RuleSet, q: Query, answer: bytes
                  ) -> list[tuple[str, Callable[[], object]]]:
    """The query log's cost: `offer` on the event loop when the record is sampled out and
    when it is queued (the writer stopped, so its thread does not share the measurement),
    and the writer thread's work per record: formatting, and writing in batches."""
    config = QueryLogConfig(path="-", queue=10**8)
    sampled = QueryLog(QueryLogConfig(path="-", sample=10**9), lambda: rules, Metrics(),
                       destination=NullDestination())
    sampled.offer(q, "udp", Outcome.BLOCKED, answer, 0.0, "")  # the 1st is logged; no more
    queued = QueryLog(config, lambda: rules, Metrics(), destination=NullDestination())
    queued.close()  # no writer: offer only appends
    item = (time.time(), q, "udp", Outcome.BLOCKED, answer, 0.00004, "", rules)
    line = Format(config).line
    lines = [line(item)] * BATCH
    devnull = RotatingFile("/dev/null", 0, 0)
    return [
        ("query log: offer, sampled out", lambda: sampled.offer(
            q, "udp", Outcome.BLOCKED, answer, 0.0, "")),
        ("query log: offer, queued", lambda: queued.offer(
            q, "udp", Outcome.BLOCKED, answer, 0.0, "")),
        ("query log: format a blocked record (thread)", lambda: line(item)),
        # per batch: the per-record cost is this over BATCH
        (f"query log: write {BATCH} lines (thread)", lambda: devnull.write(lines)),
    ]


def per_query_us(func: Callable[[], object], number: int) -> float:
    best = min(timeit.repeat(func, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--number", type=int, default=100_000)
    parser.add_argument("--edns", action="store_true", help="queries carry EDNS (adds EDE)")
    parser.add_argument("--rules-count", type=int, default=1_000_000,
                        help="domains of the large set in the lookup lines (0: none)")
    args = parser.parse_args()

    config = Config(upstream=UpstreamConfig(servers=(UpstreamServer("127.0.0.1", 9),)))
    metrics = Metrics()
    rules = load_rules(config.blocking.rules)
    chain = build_pipeline(config, rules, metrics, UpstreamPool(config.upstream, metrics),
                           lambda: 1000.0, asyncio.new_event_loop().call_later)
    pipeline, blocker, cache = chain.pipeline, chain.blocker, chain.cache
    cache_stage = CacheLookup(cache, metrics, Prefetch(config.cache, metrics, lambda q: False))
    settle_memory()  # the server's garbage-collector settings, which the numbers depend on
    sink = NullSink()
    udp, _ = udp_server(chain.front, Outbox())
    # limits on, at a rate no benchmark reaches: what the limiter's allowed path costs
    limited_config = dataclasses.replace(config, ratelimit=RateLimitConfig(qps=1e7, burst=10**6))
    limited = build_pipeline(limited_config, rules, Metrics(), UpstreamPool(config.upstream,
                             Metrics()), time.monotonic, asyncio.new_event_loop().call_later)
    udp_limited, _ = udp_server(limited.front, Outbox())
    limiter = Limiter(limited_config.ratelimit, time.monotonic,
                      asyncio.new_event_loop().call_later)
    local = Networks(LOCAL_NETWORKS)

    blocked = packet("www.binance.com", args.edns)
    allowed = packet("www.example.org", args.edns)
    q_blocked = wire.parse_query(blocked, CLIENT, "udp")
    q_allowed = wire.parse_query(allowed, CLIENT, "udp")
    reply = scan_reply(upstream_reply(allowed), 12 + len(q_allowed.question), TtlPolicy())
    cache.put(q_allowed.cache_key, reply)
    staged = Blocker(staged_rules(config.blocking.rules), config.blocking, Metrics())
    q_scoped = wire.parse_query(packet("www.scoped.example", args.edns), CLIENT, "udp")
    q_canary = wire.parse_query(packet("www.canary.example", args.edns), CLIENT, "udp")
    made = blocker.answer(q_blocked)
    assert isinstance(made, Answered)
    record, answer, row = Metrics().queries.record, made.data, new_row()

    rows: list[tuple[str, Callable[[], object]]] = [
        ("decode (parse_query)", lambda: wire.parse_query(blocked, CLIENT, "udp")),
        ("policy: blocked (lookup + count + build)", lambda: blocker.answer(q_blocked)),
        ("policy: pass (lookup miss)", lambda: blocker.answer(q_allowed)),
        # a set with staged lists: decide() with the client and the wall clock
        ("policy, staged set: scoped block (decide)", lambda: staged.answer(q_scoped)),
        ("policy, staged set: rollout + dry-run", lambda: staged.answer(q_canary)),
        ("policy, staged set: shipped block", lambda: staged.answer(q_blocked)),
        ("policy, staged set: pass (on no list)", lambda: staged.answer(q_allowed)),
        ("cache hit (lookup + render)", lambda: cache_stage.answer(q_allowed)),
        # the fenced shortcut: a miss says FORWARD, skipping the stages that read entries
        ("cache miss (lookup, FORWARD)", lambda: cache_stage.answer(q_blocked)),
        ("encode cached reply (render, aged)", lambda: render(q_allowed, reply, 7)),
        # the per-answer bookkeeping: queries_total with its qtype and rcode and the
        # duration histogram in one record, for an untimed local answer (pipeline.TIME_EVERY),
        # a timed one (first bucket) and a forwarded one (a bisect); a histogram row's observe
        # alone (an upstream reply's); a clock read, which timing costs twice
        ("record an untimed answer (Queries.record)",
         lambda: record("udp", "blocked", 1, answer, UNTIMED)),
        ("record a timed local answer",
         lambda: record("udp", "blocked", 1, answer, 0.00002)),
        ("clock read (time.monotonic)", time.monotonic),
        ("record a forwarded answer (+ bisect)",
         lambda: record("udp", "forwarded", 1, answer, 0.0042)),
        ("histogram: observe one value (a row)", lambda: observe(row, 0.0042)),
        ("whole handle(): blocked", lambda: pipeline.handle(blocked, CLIENT, sink)),
        ("whole handle(): cache hit", lambda: pipeline.handle(allowed, CLIENT, sink)),
        ("datagram: blocked, packet cache replay", lambda: udp.datagram_received(blocked, CLIENT)),
        ("datagram: cached, packet cache replay", lambda: udp.datagram_received(allowed, CLIENT)),
        ("datagram: blocked, replay, rate limit on",
         lambda: udp_limited.datagram_received(blocked, CLIENT)),
        ("access: an address's first check (Networks)", lambda: "192.168.7.7" in local),
        ("rate limit: allowed (Limiter.admit)", lambda: limiter.admit("127.0.0.0/24")),
    ]
    rows += querylog_rows(rules, q_blocked, made.data)
    print(f"{'stage':44} {'us/query':>9} {'queries/s':>11}")
    for label, func in rows:
        us = per_query_us(func, args.number)
        print(f"{label:44} {us:9.3f} {1e6 / us:11,.0f}")
    for label, func, per in lookup_rows(rules, args.rules_count) if args.rules_count else ():
        us = per_query_us(func, max(1, args.number // per)) / per
        print(f"{label:44} {us:9.3f} {1e6 / us:11,.0f}")
    out, back, ops_out, ops_back = uvloop.run(
        forward_round_trip(config, rules, min(args.number, 20_000)))
    for label, us in (("forward: query to upstream socket", out),
                      ("forward: upstream reply to client answer", back)):
        print(f"{label:44} {us:9.3f} {1e6 / us:11,.0f}")
    print(f"forward, bytecodes run: {ops_out} out, {ops_back} back, {ops_out + ops_back} "
          f"in all")


if __name__ == "__main__":
    main()
