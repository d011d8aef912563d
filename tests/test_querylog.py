"""resolver/ops/querylog.py: the schema-1 record key by key, sampling, the only-blocked
filter, client truncation, rotation, whole-line writes, and a stalled writer that drops and
counts instead of holding up `offer`. Records go through the real writer thread."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, SOA, DNSLabel, DNSRecord

from resolver.message import wire
from resolver.message.query import Outcome, Query
from resolver.ops.config import (
    STDERR,
    STDOUT,
    BlockingConfig,
    Overrides,
    QueryLogConfig,
    load_config,
)
from resolver.ops.metrics import Metrics
from resolver.ops.querylog import (
    PIPE_BUF,
    SCHEMA,
    Format,
    QueryLog,
    RotatingFile,
    chunks,
    qname,
    rcode,
    rfc3339,
    worker_path,
)
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.stages.blocking import Blocker
from resolver.stages.contract import Answered
from tests.dnsmsg import query_packet

WALL = 1796589575.123456  # 2026-12-06T20:39:35.123Z
RULES = """\
lists:
  - name: tracking
    entries:
      - id: example
        name: Example Org
        domains: [example.org]
      - blocked.test
  - name: trial
    mode: dry-run
    domains: [trial.test]
"""
KEYS = ["schema", "time", "client", "qname", "qtype", "protocol", "outcome", "rcode", "list",
        "entry", "mode", "upstream", "duration_ms", "rules_version"]


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(RULES)
    return load_rules([str(path)])


class Recorded:
    """A destination that keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.closed = False

    def write(self, lines: Sequence[bytes]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        self.closed = True

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines]


def query(name: str, qtype: str = "A", client: str = "192.0.2.77", transport: str = "udp"
          ) -> Query:
    return wire.parse_query(query_packet(name, qtype), (client, 5353), transport)


def blocked(rules: RuleSet, q: Query) -> bytes:
    """The blocker's own answer to q."""
    answered = Blocker(rules, BlockingConfig(rules=()), Metrics()).answer(q)
    assert isinstance(answered, Answered)
    return answered.data


def forwarded(q: Query) -> bytes:
    return bytes(DNSRecord.parse(q.data).reply().pack())


def logged(rules: RuleSet, offers: Sequence[tuple[Query, str, bytes | None, float, str]],
           **settings: object) -> tuple[list[dict[str, object]], Metrics]:
    """Offer each (query, outcome, answer, duration, upstream), close, and read the lines."""
    config = QueryLogConfig(path="unused", **settings)  # type: ignore[arg-type]
    metrics = Metrics()
    destination = Recorded()
    querylog = QueryLog(config, lambda: rules, metrics, destination=destination,
                        wall=lambda: WALL)
    for q, outcome, answer, duration, upstream in offers:
        querylog.offer(q, q.transport, outcome, answer, duration, upstream)
    querylog.close()
    assert destination.closed
    return destination.records(), metrics


def counted(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    return next(s.values for s in metrics.snapshot() if s.name == name)


def test_a_blocked_answer_is_one_record_with_every_key_in_order(rules):
    q = query("WWW.Example.ORG")
    [record], metrics = logged(rules, [(q, Outcome.BLOCKED, blocked(rules, q), 0.000041, "")])
    assert list(record) == KEYS
    assert record == {
        "schema": 1, "time": "2026-12-06T20:39:35.123Z", "client": "192.0.2.0",
        "qname": "www.example.org", "qtype": "A", "protocol": "udp", "outcome": "blocked",
        "rcode": "NXDOMAIN", "list": "tracking", "entry": "example", "mode": "enforce",
        "upstream": None, "duration_ms": 0.041, "rules_version": rules.version}
    assert type(record["schema"]) is int and SCHEMA == 1
    assert type(record["duration_ms"]) is float
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(record["time"]))
    assert counted(metrics, "querylog_records_total") == {(): 1}
    assert counted(metrics, "querylog_dropped_total") == {("queue_full",): 0,
                                                          ("write_error",): 0}


@pytest.mark.parametrize(("name", "qtype", "client", "transport", "outcome", "answer",
                          "upstream", "expected"), [
    # forwarded: the upstream's label and its rcode, no rule
    ("www.example.test", "AAAA", "2001:db8:aa12:3456::1", "tcp", Outcome.FORWARDED, "reply",
     "127.0.0.1:53", {"client": "2001:db8:aa12:3400::", "qtype": "AAAA", "protocol": "tcp",
                      "rcode": "NOERROR", "list": None, "entry": None, "mode": None,
                      "upstream": "127.0.0.1:53"}),
    # a plain entry of a list: entry ""
    ("x.blocked.test", "A", "192.0.2.1", "udp", Outcome.BLOCKED, "blocked", "",
     {"list": "tracking", "entry": "", "mode": "enforce", "rcode": "NXDOMAIN"}),
    # answered (from the cache), but a dry-run list would have blocked it
    ("www.trial.test", "A", "192.0.2.1", "udp", Outcome.CACHED, "reply", "",
     {"list": "trial", "entry": "", "mode": "dry-run", "rcode": "NOERROR", "upstream": None}),
    # nothing was sent: no rcode
    ("www.example.test", "A", "192.0.2.1", "udp", Outcome.DROPPED, None, "",
     {"rcode": None, "outcome": "dropped", "list": None}),
    # a type without a mnemonic, and the root
    ("example.test", "TYPE65280", "192.0.2.1", "udp", Outcome.FORWARDED, "reply", "",
     {"qtype": "TYPE65280", "qname": "example.test"}),
    (".", "NS", "192.0.2.1", "udp", Outcome.FORWARDED, "reply", "", {"qname": ".",
                                                                    "qtype": "NS"}),
])
def test_record_fields(rules, name, qtype, client, transport, outcome, answer, upstream,
                       expected):
    q = query(name, qtype, client, transport)
    data = {"reply": forwarded(q), "blocked": blocked(rules, q) if answer == "blocked" else b"",
            None: None}[answer]
    [record], _ = logged(rules, [(q, outcome, data, 0.0123456, upstream)])
    assert list(record) == KEYS
    assert {key: record[key] for key in expected} == expected
    assert record["duration_ms"] == 12.346


def test_a_name_blocked_for_its_cname_chain_names_the_rule_of_the_blocked_domain(rules):
    """stages/cname.py answers with the SOA owned by the blocked domain."""
    q = query("cdn.example.test")
    reply = DNSRecord.parse(q.data).reply()
    reply.header.rcode = 3
    reply.add_auth(RR("tracker.example.org", QTYPE.SOA, rdata=SOA("m.invalid", "r.invalid")))
    [record], _ = logged(rules, [(q, Outcome.BLOCKED, bytes(reply.pack()), 0.001, "")])
    assert (record["list"], record["entry"], record["mode"]) == ("tracking", "example",
                                                                 "enforce")


def test_an_undecodable_packet_is_not_logged(rules):
    config = QueryLogConfig(path="unused")
    destination = Recorded()
    querylog = QueryLog(config, lambda: rules, Metrics(), destination=destination)
    querylog.offer(None, "udp", Outcome.FORMERR, b"\x00" * 12, 0.0, "")
    querylog.close()
    assert destination.lines == []


@pytest.mark.parametrize(("sample", "offered", "kept"), [
    (1, 5, [0, 1, 2, 3, 4]),
    (2, 5, [0, 2, 4]),
    (3, 7, [0, 3, 6]),
    (100, 250, [0, 100, 200]),
    (1000, 999, [0]),
])
def test_one_in_n_is_logged_counted_not_random(rules, sample, offered, kept):
    offers = [(query(f"n{i}.example.test"), Outcome.FORWARDED, None, 0.0, "")
              for i in range(offered)]
    records, _ = logged(rules, offers, sample=sample)
    assert [record["qname"] for record in records] == [f"n{i}.example.test" for i in kept]


@pytest.mark.parametrize(("sample", "names", "kept"), [
    # only blocked answers and would-blocks pass the filter; sampling counts what passed
    (1, ["a.example.org", "a.example.test", "a.trial.test", "b.example.test"],
     ["a.example.org", "a.trial.test"]),
    (2, ["a.example.org", "a.example.test", "a.trial.test", "b.example.org", "c.example.org"],
     ["a.example.org", "b.example.org"]),
])
def test_only_blocked_keeps_blocks_and_would_blocks(rules, sample, names, kept):
    offers = []
    for name in names:
        q = query(name)
        is_blocked = name.endswith("example.org")
        offers.append((q, Outcome.BLOCKED if is_blocked else Outcome.FORWARDED,
                       blocked(rules, q) if is_blocked else forwarded(q), 0.0, ""))
    records, _ = logged(rules, offers, only_blocked=True, sample=sample)
    assert [record["qname"] for record in records] == kept


@pytest.mark.parametrize(("address", "settings", "expected"), [
    ("192.0.2.77", {}, "192.0.2.0"),
    ("198.51.100.255", {}, "198.51.100.0"),
    ("2001:db8:aa12:3456::1", {}, "2001:db8:aa12:3400::"),
    ("2001:db8:aaff:ffff:ffff::1", {}, "2001:db8:aaff:ff00::"),
    ("::ffff:192.0.2.77", {}, "192.0.2.0"),  # an IPv4 client of an IPv6 listener
    ("fe80::1%eth0", {}, "fe80::"),
    ("192.0.2.77", {"ipv4_prefix": 16}, "192.0.0.0"),
    ("192.0.2.77", {"ipv4_prefix": 32}, "192.0.2.77"),
    ("192.0.2.77", {"ipv4_prefix": 0}, "0.0.0.0"),
    ("2001:db8::1", {"ipv6_prefix": 128}, "2001:db8::1"),
    ("2001:db8:1:2::1", {"ipv6_prefix": 48}, "2001:db8:1::"),
    ("2001:db8::1", {"ipv6_prefix": 0}, "::"),
    ("192.0.2.77", {"truncate_clients": False}, "192.0.2.77"),
    ("2001:db8::1", {"truncate_clients": False}, "2001:db8::1"),
])
def test_client_truncation(address, settings, expected):
    assert Format(QueryLogConfig(**settings)).client(address) == expected


@pytest.mark.parametrize(("labels", "text"), [
    ([b"www", b"example", b"org"], "www.example.org"),
    ([b"_dmarc", b"x-y", b"test"], "_dmarc.x-y.test"),
    ([], "."),
    ([b"a.b", b"test"], "a\\046b.test"),  # a dot inside a label, escaped as from_wire does
    ([b"a\x07", b"test"], "a\\007.test"),
])
def test_qname_text(labels, text):
    packet = bytes(DNSRecord.question(DNSLabel(labels)).pack())
    assert qname(wire.parse_query(packet, ("192.0.2.1", 53), "udp")) == text


@pytest.mark.parametrize(("wall", "text"), [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (WALL, "2026-12-06T20:39:35.123Z"),
    (1796589575.9999, "2026-12-06T20:39:35.999Z"),  # cut, never rounded into the next second
])
def test_time_format(wall, text):
    assert rfc3339(wall) == text
    made = Format(QueryLogConfig())
    assert [made.time(wall), made.time(wall + 0.5), made.time(wall + 1)] == [
        rfc3339(wall), rfc3339(wall + 0.5), rfc3339(wall + 1)]  # each second's text anew


@pytest.mark.parametrize(("code", "name"), [
    (0, "NOERROR"), (1, "FORMERR"), (2, "SERVFAIL"), (3, "NXDOMAIN"), (5, "REFUSED"),
    (15, "RCODE15")])
def test_rcode_names(code, name):
    assert rcode(b"\x12\x34\x81" + bytes([0x80 | code])) == name
    assert rcode(None) is None


@pytest.mark.parametrize(("path", "index", "expected"), [
    ("/var/log/q.jsonl", 0, "/var/log/q.jsonl.worker-0"),
    ("/var/log/q.jsonl", 3, "/var/log/q.jsonl.worker-3"),
    (STDOUT, 1, STDOUT),
    (STDERR, 1, STDERR),
    (None, 1, None),
])
def test_each_worker_has_its_own_file(path, index, expected):
    assert worker_path(path, index) == expected


@pytest.mark.parametrize(("sizes", "limit", "pieces"), [
    ([10, 10, 10], 30, [30]),
    ([10, 10, 10], 25, [20, 10]),
    ([10, 40, 10], 25, [10, 40, 10]),  # a line longer than the limit goes alone, whole
    ([], 25, []),
])
def test_chunks_cut_at_line_ends(sizes, limit, pieces):
    lines = [b"x" * (size - 1) + b"\n" for size in sizes]
    cut = list(chunks(lines, limit))
    assert [len(piece) for piece in cut] == pieces
    assert b"".join(cut) == b"".join(lines)


def line(number: int) -> bytes:
    return f'{{"n": {number:04d}}}\n'.encode()  # 12 bytes


@pytest.mark.parametrize(("backups", "files"), [
    (2, ["q.log", "q.log.1", "q.log.2"]),
    (0, ["q.log"]),
])
def test_rotation_by_size_keeps_backups(tmp_path, backups, files):
    path = tmp_path / "q.log"
    path.write_bytes(line(0))  # what an earlier run wrote counts toward the size
    log = RotatingFile(str(path), 60, backups)
    for start in range(1, 30, 4):
        log.write([line(n) for n in range(start, start + 4)])
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    sizes = [(tmp_path / name).stat().st_size for name in files]
    assert all(0 < size <= 60 for size in sizes)
    newest_first = [(tmp_path / name).read_bytes() for name in files]
    written = b"".join(reversed(newest_first))
    assert written == b"".join(line(n) for n in range(33 - len(written) // 12, 33))


def test_a_rotation_that_fails_keeps_writing_to_the_open_file(tmp_path, monkeypatch):
    """A rename that fails (a directory the user may not write) raises, so the batch counts
    as a write error, and the descriptor kept is the old file's: the next lines go there,
    never into a closed descriptor that another file may have taken."""
    path = tmp_path / "q.log"
    log = RotatingFile(str(path), 30, 1)
    log.write([line(1), line(2)])

    def refuse(*_: object) -> None:
        raise PermissionError("not yours")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        log.write([line(3)])
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # would take a closed number
    monkeypatch.undo()
    log.write([line(4)])  # rotates now, then writes to a new file
    log.close()
    os.close(other)
    assert (tmp_path / "other").read_bytes() == b""
    assert (tmp_path / "q.log.1").read_bytes() == line(1) + line(2)
    assert path.read_bytes() == line(4)


def test_rotation_writes_the_file_in_the_configured_place(tmp_path, rules):
    """End to end through the writer thread into a real file, rotated."""
    path = tmp_path / "queries.jsonl"
    config = QueryLogConfig(path=str(path), max_bytes=1000, backups=3)
    querylog = QueryLog(config, lambda: rules, Metrics())
    for i in range(20):
        q = query(f"n{i}.example.test")
        querylog.offer(q, "udp", Outcome.FORWARDED, forwarded(q), 0.001, "127.0.0.1:53")
    querylog.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "queries.jsonl" and len(names) > 1
    oldest_first = [*reversed(names[1:]), names[0]]
    lines = [line for name in oldest_first
             for line in (tmp_path / name).read_text().splitlines()]
    kept = [json.loads(text)["qname"] for text in lines]
    assert kept == [f"n{i}.example.test" for i in range(20 - len(kept), 20)]


class Stalled(Recorded):
    """A destination whose write waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.entered = threading.Event()

    def write(self, lines: Sequence[bytes]) -> None:
        self.entered.set()
        assert self.go.wait(30), "never released"
        super().write(lines)


def test_a_stalled_writer_drops_and_counts_instead_of_stalling_offer(rules):
    destination = Stalled()
    metrics = Metrics()
    querylog = QueryLog(QueryLogConfig(path="unused", queue=10), lambda: rules, metrics,
                        destination=destination)
    q = query("www.example.test")
    answer = forwarded(q)
    querylog.offer(q, "udp", Outcome.FORWARDED, answer, 0.0, "")
    assert destination.entered.wait(10)  # the writer holds that one, stuck in write

    def offer_many() -> None:
        for _ in range(1000):
            querylog.offer(q, "udp", Outcome.FORWARDED, answer, 0.0, "")

    offering = threading.Thread(target=offer_many)
    offering.start()
    offering.join(10)  # generous: 1000 offers take about a millisecond
    assert not offering.is_alive(), "offer waited for the writer"
    dropped = counted(metrics, "querylog_dropped_total")[("queue_full",)]
    assert dropped == 1000 - 10
    destination.go.set()
    querylog.close()
    assert len(destination.lines) == 1 + 10
    assert counted(metrics, "querylog_records_total") == {(): 11}


class Broken(Recorded):
    def write(self, lines: Sequence[bytes]) -> None:
        raise OSError(28, "No space left on device")


def test_a_failing_destination_counts_its_records_as_dropped(rules, caplog):
    metrics = Metrics()
    querylog = QueryLog(QueryLogConfig(path="unused"), lambda: rules, metrics,
                        destination=Broken())
    q = query("www.example.test")
    for _ in range(3):
        querylog.offer(q, "udp", Outcome.FORWARDED, None, 0.0, "")
    querylog.close()
    assert counted(metrics, "querylog_dropped_total")[("write_error",)] == 3
    assert counted(metrics, "querylog_records_total") == {(): 0}
    assert "No space left on device" in caplog.text


def test_stdout_gets_whole_json_lines(rules, capfd):
    querylog = QueryLog(QueryLogConfig(path=STDOUT), lambda: rules, Metrics())
    for i in range(500):  # more than PIPE_BUF bytes: several writes
        q = query(f"name-{i}.example.test")
        querylog.offer(q, "udp", Outcome.FORWARDED, forwarded(q), 0.0, "")
    querylog.close()
    out = capfd.readouterr().out
    assert len(out) > PIPE_BUF
    names = [json.loads(text)["qname"] for text in out.splitlines()]
    assert names == [f"name-{i}.example.test" for i in range(500)]


@pytest.mark.parametrize(("text", "flag", "expected"), [
    ("query_log: {path: queries.jsonl}\n", None, "{dir}/queries.jsonl"),
    ("query_log: {path: '-'}\n", None, STDOUT),
    ("query_log: {path: stdout}\n", None, STDOUT),
    ("query_log: {path: stderr}\n", None, STDERR),
    ("query_log: {path: null}\n", None, None),
    ("{}\n", None, None),
    ("{}\n", "-", STDOUT),
    ("query_log: {path: queries.jsonl}\n", "other.jsonl", "{cwd}/other.jsonl"),
])
def test_query_log_destination_from_file_and_flag(tmp_path, text, flag, expected):
    config_file = tmp_path / "resolver.yaml"
    config_file.write_text(text)
    config = load_config(str(config_file), Overrides(query_log=flag), resolv_conf=os.devnull)
    if expected is not None:
        expected = expected.format(dir=tmp_path, cwd=Path.cwd())
    assert config.query_log.path == expected
