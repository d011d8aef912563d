"""The query log: one JSON object per answered query, written by a thread (docs/querylog.md).

`offer` runs on the event loop for every answer (the pipeline's observer), so it does as
little as it can: the only-blocked filter, the 1-in-N countdown, and one append of a tuple of
references to a bounded deque. Everything else happens on the writer thread, for the records
written only: the rule that decided (re-derived from the rule set that was in force, which
is immutable), the client's truncation, the names, the JSON. When the writer falls behind and
the deque is full, a record is dropped and counted instead: the log never makes an answer
wait, and never holds more than `query_log.queue` records.

Lines reach the destination whole: a batch is cut at line ends into writes of at most
PIPE_BUF bytes on stdout and stderr (a pipe does not interleave writes that small, so the
lines of several worker processes sharing a pipe never mix), and appended to a file opened
O_APPEND, which only its own process writes and rotates (`worker_path`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from dnslib import QTYPE, RCODE, DNSRecord

from resolver.message.constants import TYPE_SOA, Clock
from resolver.message.names import from_wire, label_offsets, normalize, to_wire
from resolver.message.query import Outcome, Query
from resolver.ops.config import STDERR, STDOUT, QueryLogConfig
from resolver.ops.metrics import Metrics
from resolver.rules.matcher import Hit, RuleSet
from resolver.stages.access import client_network

log = logging.getLogger(__name__)

SCHEMA = 1  # the record format's version: bumped when a key changes meaning or goes away
BATCH = 1000  # records formatted and written together
IDLE = 0.05  # seconds the writer sleeps when nothing is queued
CLOSE_WAIT = 5.0  # seconds `close` waits for the writer to write what is queued
COMPLAIN_EVERY = 60.0  # seconds between two log lines about a failing destination
PIPE_BUF = select.PIPE_BUF  # a write to a pipe of at most this many bytes is never split
NOTHING: tuple[None, None, None] = (None, None, None)  # no rule to name
CLIENTS_KEPT = 65536  # truncated client addresses remembered (then forgotten all at once)
_PLAIN = re.compile(rb"[a-z0-9_-]*")  # label octets written as they are (names.from_wire)

# What offer queues: (wall time, query, transport, outcome, answer, duration, upstream, rules)
Item = tuple[float, Query, str, str, bytes | None, float, str, RuleSet]


class Destination(Protocol):
    """Where lines go; called on the writer thread only."""

    def write(self, lines: Sequence[bytes]) -> None: ...

    def close(self) -> None: ...


def worker_path(path: str | None, index: int) -> str | None:
    """Worker `index`'s own log file, so no two processes append to or rotate one file;
    stdout and stderr are shared (their lines are written whole)."""
    if path is None or path in (STDOUT, STDERR):
        return path
    return f"{path}.worker-{index}"


class QueryLog:
    """Filters, samples and queues records on the event loop; a thread writes them."""

    def __init__(self, config: QueryLogConfig, rules: Callable[[], RuleSet], metrics: Metrics,
                 *, destination: Destination | None = None, wall: Clock = time.time,
                 clock: Clock = time.monotonic):
        """rules: the rule set in force now (the blocker's); destination: where lines go
        (None: config.path's); wall: the records' time; clock: paces the writer's complaints."""
        self._rules = rules
        self._wall = wall
        self._clock = clock
        self._only_blocked = config.only_blocked
        self._sample = config.sample
        self._countdown = 1  # the first offered record is logged
        self._limit = config.queue
        self._pending: collections.deque[Item] = collections.deque()
        self._format = Format(config)
        self._destination = destination or open_destination(config)
        self._records = metrics.counter("querylog_records_total",
                                        "Query log records written.", ())
        self._dropped = metrics.counter(
            "querylog_dropped_total", "Query log records dropped, by reason: queue_full (the "
            "writer fell behind) or write_error (the destination failed).", ("reason",))
        self._records.expect([()])
        self._dropped.expect([("queue_full",), ("write_error",)])
        self._complained = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resolver-querylog",
                                        daemon=True)
        self._thread.start()

    def offer(self, q: Query | None, transport: str, outcome: str, answer: bytes | None,
              duration: float, upstream: str) -> None:
        """One answered (or dropped) query, from the pipeline; queued if it is to be logged.
        q None (a packet that did not decode) has no name to log and is skipped."""
        if q is None:
            return
        if self._only_blocked and outcome != Outcome.BLOCKED:
            rules = self._rules()
            if not rules.staged or not _would_block(rules, q, self._wall()):
                return
        countdown = self._countdown - 1
        if countdown:
            self._countdown = countdown
            return
        self._countdown = self._sample
        pending = self._pending
        if len(pending) >= self._limit:
            self._dropped.inc(("queue_full",))
            return
        pending.append((self._wall(), q, transport, outcome, answer, duration, upstream,
                        self._rules()))

    def close(self) -> None:
        """Write what is queued (waiting at most CLOSE_WAIT) and close the destination."""
        self._stop.set()
        self._thread.join(CLOSE_WAIT)
        if self._thread.is_alive():  # a stalled destination: its records are lost
            log.warning("the query log writer did not finish within %gs; %d records lost",
                        CLOSE_WAIT, len(self._pending))
            return
        self._destination.close()

    def _run(self) -> None:
        pending = self._pending
        while True:
            batch = [pending.popleft() for _ in range(min(BATCH, len(pending)))]
            if batch:
                self._write(batch)
            elif self._stop.is_set():
                return
            else:
                self._stop.wait(IDLE)

    def _write(self, batch: list[Item]) -> None:
        lines = []
        for item in batch:
            try:
                lines.append(self._format.line(item))
            except Exception:  # a bug must cost its record, not the log
                log.exception("could not format a query log record")
                self._dropped.inc(("write_error",))
        try:
            self._destination.write(lines)
        except OSError as exc:
            self._dropped.inc(("write_error",), len(lines))
            now = self._clock()
            if now - self._complained >= COMPLAIN_EVERY:
                self._complained = now
                log.error("writing the query log failed: %s; its records are dropped", exc)
            return
        self._records.inc((), len(lines))


def _would_block(rules: RuleSet, q: Query, now: float) -> bool:
    """Whether a dry-run list would have blocked q (only staged sets have dry-run lists)."""
    return bool(rules.decide(q.name, q.offsets, q.client[0], now).dry_runs)


class Format:
    """Turns a queued item into its JSON line (schema 1; on the writer thread)."""

    def __init__(self, config: QueryLogConfig):
        self._truncate = config.truncate_clients
        self._prefixes = (config.ipv4_prefix, config.ipv6_prefix)
        # ipaddress takes 4 us per address, and clients ask again and again
        self._clients: dict[str, str] = {}
        self._second = -1  # the whole second `_stamp` holds the text of
        self._stamp = ""

    def line(self, item: Item) -> bytes:
        wall, q, transport, outcome, answer, duration, upstream, rules = item
        rule_list, entry, mode = attribution(rules, q, outcome, answer, wall)
        record = {
            "schema": SCHEMA,
            "time": self.time(wall),
            "client": self.client(q.client[0]),
            "qname": qname(q),
            "qtype": QTYPE[q.qtype],  # TYPE65280 for a number without a mnemonic
            "protocol": transport,
            "outcome": outcome,
            "rcode": rcode(answer),
            "list": rule_list,
            "entry": entry,
            "mode": mode,
            "upstream": upstream or None,
            "duration_ms": round(duration * 1000, 3),
            "rules_version": rules.version,
        }
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()

    def time(self, wall: float) -> str:
        """rfc3339, the date and time text made once a second."""
        second, millis = divmod(int(wall * 1000), 1000)
        if second != self._second:
            self._second, self._stamp = second, rfc3339(second)[:-5]
        return f"{self._stamp}.{millis:03d}Z"

    def client(self, address: str) -> str:
        """The address, its host bits zeroed when truncating."""
        if not self._truncate:
            return address
        clients = self._clients
        truncated = clients.get(address)
        if truncated is None:
            if len(clients) >= CLIENTS_KEPT:
                clients.clear()
            truncated = clients[address] = self._truncated(address)
        return truncated

    def _truncated(self, address: str) -> str:
        """An IPv4-mapped IPv6 address is truncated as the IPv4 address it is."""
        network = client_network(address, *self._prefixes)
        return address if network is None else str(network.network_address)


def qname(q: Query) -> str:
    """The query name as names.from_wire writes it ("." for the root), joined directly when
    every label is plain letters, digits, '-' and '_' (2 us less a record, nearly always)."""
    name = q.name
    labels = [name[offset + 1:offset + 1 + name[offset]] for offset in q.offsets]
    if _PLAIN.fullmatch(b"".join(labels)):
        return b".".join(labels).decode() or "."
    return from_wire(name)


def rfc3339(wall: float) -> str:
    """UTC with milliseconds and Z: 2026-12-06T20:39:35.123Z."""
    seconds, millis = divmod(int(wall * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def rcode(answer: bytes | None) -> str | None:
    """The answer's header rcode by name (RCODE3 style for one without), None: no answer."""
    if answer is None or len(answer) < 4:
        return None
    code = answer[3] & 0xF
    return str(RCODE.forward.get(code, f"RCODE{code}"))


def attribution(rules: RuleSet, q: Query, outcome: str, answer: bytes | None, now: float
                ) -> tuple[str | None, str | None, str | None]:
    """(list, entry id, mode) of the rule that blocked the answer, or of a dry-run list that
    would have blocked an answer that was not blocked; NOTHING otherwise. Judged again by
    the rules that were in force (as the blocker judged, so the same rule answers)."""
    if rules.staged:
        decision = rules.decide(q.name, q.offsets, q.client[0], now)
        block, dry_runs = decision.block, decision.dry_runs
    else:
        block, dry_runs = rules.lookup(q.name, q.offsets), ()
    hit: Hit | None
    if outcome == Outcome.BLOCKED:
        hit = block or _cloaked(rules, answer)
    else:
        hit = dry_runs[0] if dry_runs else None
    if hit is None:
        return NOTHING
    rule = hit[0]
    return rule.list.name, rule.entry_id, rule.list.mode


def _cloaked(rules: RuleSet, answer: bytes | None) -> Hit | None:
    """A name blocked for where its CNAME chain leads (stages/cname.py) is answered with the
    SOA owned by the blocked domain: that domain's rule. (A sinkhole answer carries no SOA:
    its rule stays unnamed.)"""
    if answer is None:
        return None
    for record in DNSRecord.parse(answer).auth:
        if record.rtype == TYPE_SOA:
            wire = to_wire(normalize(str(record.rname)))
            return rules.lookup(wire, label_offsets(wire))
    return None


# -- destinations -------------------------------------------------------------------------------


def open_destination(config: QueryLogConfig) -> Destination:
    path = config.path
    if path is None:
        raise ValueError("the query log is off (query_log.path is null)")
    if path in (STDOUT, STDERR):
        return Stream((sys.stdout if path == STDOUT else sys.stderr).fileno())
    return RotatingFile(path, config.max_bytes, config.backups)


def chunks(lines: Sequence[bytes], limit: int) -> Iterator[bytes]:
    """The lines joined into pieces of at most limit bytes, cut only at line ends (a line
    longer than limit is a piece of its own)."""
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > limit:
            yield b"".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield b"".join(piece)


def write_all(fd: int, data: bytes) -> None:
    """os.write until all is written (a file or a large piece may take several)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Stream:
    """stdout or stderr, by descriptor: around Python's buffered file, whose buffer could
    split a line between two writes."""

    def __init__(self, fd: int):
        self._fd = fd

    def write(self, lines: Sequence[bytes]) -> None:
        for piece in chunks(lines, PIPE_BUF):
            write_all(self._fd, piece)

    def close(self) -> None:
        """Left open: it is the process's."""


class RotatingFile:
    """A file appended to, renamed to PATH.1 (PATH.1 to PATH.2, ...) when the next lines
    would take it past max_bytes (0: never), keeping `backups` old files."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        self._path, self._max, self._backups = path, max_bytes, backups
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def write(self, lines: Sequence[bytes]) -> None:
        piece: list[bytes] = []
        size = self._size
        for line in lines:
            if self._max and size and size + len(line) > self._max:
                if piece:
                    write_all(self._fd, b"".join(piece))
                    piece = []
                self._rotate()
                size = 0
            piece.append(line)
            size += len(line)
        if piece:
            write_all(self._fd, b"".join(piece))
        self._size = size

    def close(self) -> None:
        os.close(self._fd)

    def _open(self) -> int:
        return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _rotate(self) -> None:
        """Shift the backups up one (the oldest is replaced), move the file to PATH.1, and
        begin a new one. The old file stays open until the new one is: when a step fails (a
        directory the user may not write), the error goes up (the batch is counted as a
        write error) and the descriptor kept is still the old file's, never a closed one."""
        if self._backups:
            for index in range(self._backups - 1, 0, -1):
                older = f"{self._path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self._path}.{index + 1}")
            os.replace(self._path, f"{self._path}.1")
        else:
            os.unlink(self._path)
        fd = self._open()
        os.close(self._fd)
        self._fd = fd
