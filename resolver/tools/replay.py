"""`resolver rules replay LOG... --rules NEW...`: what new rules would have done to real
traffic, against a baseline.

Each query of the log is judged by both rule sets with `RuleSet.decide` (the server's
decision, for that client at that query's time) and sorted: newly blocked, newly allowed,
blocked by another rule, unchanged. Input: the query log (schema 1, docs/tools.md; unknown
keys ignored, an unknown schema number stops the replay with its file and line) and plain
`client qname [qtype]` lines, mixed freely; a line that is neither is skipped and counted,
the first few are shown with their file and line.

Streaming: lines are read one at a time and only counters are kept, so memory does not grow
with the log. The counters are bounded: distinct clients are exact sets up to CLIENT_CAP per
counter, then reported as "at least" that many; the most affected names are counted in a
table of at most NAME_SLOTS names, pruned to the heaviest half when full (then the report
says the counts are approximate: a name pruned and seen again counts from zero).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

from resolver.message.names import label_offsets, normalize, to_wire
from resolver.ops.config import Config
from resolver.ops.errors import ConfigError
from resolver.ops.shipped import SHIPPED_RULES
from resolver.rules.matcher import Hit, RuleSet
from resolver.rules.scope import client_address
from resolver.tools.common import (
    CHANGES,
    OK,
    Loaded,
    ToolError,
    config_or_default,
    instant,
    plural,
    positive,
    write_json,
)

SCHEMA = 1  # the query log schema this reader knows (docs/tools.md)
CLIENT_CAP = 10_000  # exact distinct clients per counter; beyond, "at least"
NAME_SLOTS = 10_000  # most-affected-names table: pruned to half when it holds this many
BAD_SHOWN = 10  # bad lines shown with their file and line; the rest are only counted
PEEK_LINES = 1000  # lines read ahead for the log's rules_version (the default baseline)
PROGRESS_EVERY = 8192  # lines between two progress bar updates

Key = tuple[str, str, str]  # list, entry, action (the labels of resolver_blocked_total)
# client, qname, qtype, time (a JSON record's text, or a plain line's --at), rules_version
Record = tuple[str, str, str, str | float | None, str | None]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "replay", help="what new rules would have done to logged queries",
        description="Replay a query log (JSON schema 1, or plain 'client qname [qtype]' "
        "lines) against the candidate rules and a baseline: queries and distinct clients "
        "newly blocked and newly allowed, per list and entry, and the names most affected. "
        "Exit 0 when no answer changes, 1 when some do.")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="log files; - reads stdin")
    parser.add_argument("--rules", nargs="+", action="extend", required=True, metavar="NEW",
                        help="the candidate rules")
    parser.add_argument("--baseline", nargs="+", action="extend", metavar="OLD",
                        help="the rules to compare with (default: the rules of -c, or the "
                        "shipped rules, whichever has the log's rules_version; else the "
                        "shipped rules)")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="config whose blocking.rules may be the baseline")
    parser.add_argument("--at", type=instant, metavar="TIME",
                        help="time to judge plain lines at (default now; JSON records carry "
                        "their own)")
    parser.add_argument("--top", type=positive, default=10, metavar="N",
                        help="most affected names to show (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.set_defaults(run=run)
    return parser


# --- reading ---------------------------------------------------------------------------------


class Bad(Exception):
    """A line that is not a query: skipped and counted."""


def parse_line(raw: bytes, where: str, plain_time: float) -> Record | None:
    """One line: a JSON record, a plain `client qname [qtype]` line, or None for a blank or
    comment line. Raises Bad for a line that is neither, ToolError for an unknown schema."""
    text = raw.strip()
    if text.startswith(b"{"):
        return _json_record(text, where)
    text = text.split(b"#", 1)[0]
    if not text.strip():
        return None
    fields = text.decode("utf-8", "replace").split()
    if len(fields) not in (2, 3):
        raise Bad(f"expected 'client qname [qtype]', got {plural(len(fields), 'field')}")
    if client_address(fields[0]) is None:
        raise Bad(f"{fields[0]!r} is not a client IP address")
    return fields[0], fields[1], fields[2] if len(fields) == 3 else "A", plain_time, None


def _json_record(text: bytes, where: str) -> Record:
    try:
        record = json.loads(text)
    except ValueError as error:
        raise Bad(f"not JSON: {error}") from None
    if not isinstance(record, dict):
        raise Bad("a JSON value that is not an object")
    schema = record.get("schema")
    if schema != SCHEMA:
        if schema is None:
            raise Bad("a JSON object without a schema number")
        raise ToolError([f"{where}: query log schema {schema!r} is not known (this resolver "
                         f"reads schema {SCHEMA}); replay stopped"])
    client, qname, qtype = record.get("client"), record.get("qname"), record.get("qtype", "A")
    if not (isinstance(client, str) and isinstance(qname, str) and isinstance(qtype, str)):
        raise Bad("client, qname and qtype must be strings")
    moment, version = record.get("time"), record.get("rules_version")
    return (client, qname, qtype, moment if isinstance(moment, str) else None,
            version if isinstance(version, str) else None)


def _when(record_time: object, plain_time: float) -> float:
    """A record's time as epoch seconds (plain lines carry --at already)."""
    if isinstance(record_time, float):
        return record_time
    if isinstance(record_time, str):
        try:
            moment = datetime.datetime.fromisoformat(record_time)
        except ValueError:
            raise Bad(f"time {record_time!r} is not an RFC 3339 time") from None
        if moment.tzinfo is None:
            raise Bad(f"time {record_time!r} has no UTC offset")
        return moment.timestamp()
    return plain_time


@dataclass(slots=True)
class LogFiles:
    """The logs as one stream of (file, line number, raw line), with the first lines read
    ahead for the log's rules_version; stdin is read once, like any pipe."""

    paths: Sequence[str]
    peeked: list[bytes] = field(default_factory=list)
    _first: IO[bytes] | None = None

    def size(self) -> int | None:
        """Total bytes, for the progress bar (None when a log is a pipe)."""
        total = 0
        for path in self.paths:
            try:
                total += os.stat(path).st_size if path != "-" else 0
            except OSError:
                return None
            if path == "-":
                return None
        return total

    def _open(self, path: str) -> IO[bytes]:
        if path == "-":
            return sys.stdin.buffer
        try:
            return open(path, "rb")
        except OSError as error:
            raise ToolError([f"{path}: cannot read: {error.strerror}"]) from None

    def log_version(self) -> str | None:
        """The rules_version of the first JSON record among the first PEEK_LINES lines."""
        self._first = self._open(self.paths[0])
        for raw in itertools.islice(self._first, PEEK_LINES):
            self.peeked.append(raw)
            if raw.lstrip().startswith(b"{"):
                try:
                    version = json.loads(raw).get("rules_version")
                except (ValueError, AttributeError):
                    continue
                if isinstance(version, str):
                    return version
        return None

    def lines(self) -> Iterator[tuple[str, int, bytes]]:
        for index, path in enumerate(self.paths):
            stream = self._first if index == 0 and self._first is not None else self._open(path)
            source: Iterable[bytes] = (itertools.chain(self.peeked, stream) if index == 0
                                       else stream)
            try:
                for number, raw in enumerate(source, 1):
                    yield path, number, raw
            finally:
                if stream is not sys.stdin.buffer:
                    stream.close()


# --- counting --------------------------------------------------------------------------------


@dataclass(slots=True)
class Clients:
    """Distinct clients, exactly up to CLIENT_CAP, then "at least"."""

    seen: set[str] = field(default_factory=set)
    capped: bool = False

    def add(self, client: str) -> None:
        if len(self.seen) < CLIENT_CAP:
            self.seen.add(client)
        elif client not in self.seen:
            self.capped = True

    def as_json(self) -> dict[str, object]:
        return {"count": len(self.seen), "at_least": self.capped}

    def __str__(self) -> str:
        return f"{'at least ' if self.capped else ''}{plural(len(self.seen), 'client')}"


@dataclass(slots=True)
class Tally:
    queries: int = 0
    clients: Clients = field(default_factory=Clients)

    def add(self, client: str) -> None:
        self.queries += 1
        self.clients.add(client)

    def as_json(self) -> dict[str, object]:
        return {"queries": self.queries, "clients": self.clients.as_json()}

    def __str__(self) -> str:
        return f"{plural(self.queries, 'query', 'queries')}, {self.clients}"


@dataclass(slots=True)
class TopNames:
    """The names seen most often, in a table of at most NAME_SLOTS names."""

    counts: dict[str, int] = field(default_factory=dict)
    pruned: bool = False

    def add(self, name: str) -> None:
        counts = self.counts
        counts[name] = counts.get(name, 0) + 1
        if len(counts) >= NAME_SLOTS:
            kept = sorted(counts.items(), key=lambda item: -item[1])[:NAME_SLOTS // 2]
            self.counts = dict(kept)
            self.pruned = True

    def top(self, number: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))[:number]


@dataclass(slots=True)
class Change:
    """One kind of change (newly blocked, newly allowed, blocked by another rule): in all,
    per rule (the new rule's; for newly allowed, the old one's) and per name."""

    total: Tally = field(default_factory=Tally)
    by_rule: dict[Key, Tally] = field(default_factory=dict)
    names: TopNames = field(default_factory=TopNames)

    def add(self, client: str, name: str, key: Key) -> None:
        self.total.add(client)
        tally = self.by_rule.get(key)
        if tally is None:
            tally = self.by_rule[key] = Tally()
        tally.add(client)
        self.names.add(name)

    def as_json(self, top: int) -> dict[str, object]:
        return {**self.total.as_json(),
                "by_rule": [{"list": k[0], "entry": k[1], "action": k[2], **t.as_json()}
                            for k, t in _ordered(self.by_rule)],
                "top_names": [{"name": n, "queries": c} for n, c in self.names.top(top)],
                "top_names_approximate": self.names.pruned}


def _ordered(by_rule: dict[Key, Tally]) -> list[tuple[Key, Tally]]:
    return sorted(by_rule.items(), key=lambda item: (-item[1].queries, item[0]))


@dataclass(slots=True)
class Report:
    queries: int = 0
    bad: int = 0
    other_version: int = 0  # records logged under rules other than the baseline's
    clients: Clients = field(default_factory=Clients)
    newly_blocked: Change = field(default_factory=Change)
    newly_allowed: Change = field(default_factory=Change)
    changed_rule: Change = field(default_factory=Change)
    unchanged_blocked: int = 0
    unchanged_allowed: int = 0
    dry_run: dict[Key, Tally] = field(default_factory=dict)

    @property
    def changes(self) -> bool:
        return bool(self.newly_blocked.total.queries or self.newly_allowed.total.queries
                    or self.changed_rule.total.queries)


class Replay:
    """Judges records with both rule sets and counts what differs."""

    def __init__(self, baseline: RuleSet, candidate: RuleSet):
        self.baseline = baseline
        self.candidate = candidate
        self.report = Report()
        # Only a set with time windows needs each record's time parsed (about a third of
        # the cost of a line): without any, the time changes no decision.
        self.timed = bool(baseline.instants() or candidate.instants())

    def add(self, client: str, qname: str, when: float, version: str | None) -> None:
        """One query; raises Bad for a name that is not valid."""
        try:
            name = normalize(qname)
        except ValueError as error:
            raise Bad(str(error)) from None
        wire = to_wire(name)
        offsets = label_offsets(wire)
        old = self.baseline.decide(wire, offsets, client, when)
        new = self.candidate.decide(wire, offsets, client, when)
        report = self.report
        report.queries += 1
        report.clients.add(client)
        if version is not None and version != self.baseline.version:
            report.other_version += 1
        for rule, _ in new.dry_runs:
            tally = report.dry_run.get(rule.labels)
            if tally is None:
                tally = report.dry_run[rule.labels] = Tally()
            tally.add(client)
        _sort(report, client, name, old.block, new.block)


def _sort(report: Report, client: str, name: str, old: Hit | None, new: Hit | None) -> None:
    if old is None:
        if new is None:
            report.unchanged_allowed += 1
        else:
            report.newly_blocked.add(client, name, new[0].labels)
    elif new is None:
        report.newly_allowed.add(client, name, old[0].labels)
    elif new[0].labels != old[0].labels:
        report.changed_rule.add(client, name, new[0].labels)
    else:
        report.unchanged_blocked += 1


def replay(logs: LogFiles, replayer: Replay, plain_time: float, progress: bool) -> Report:
    """Stream every line of the logs through the replayer."""
    bar = _bar(logs.size()) if progress else None
    report = replayer.report
    read = 0
    for path, number, raw in logs.lines():
        read += len(raw)
        if bar is not None and number % PROGRESS_EVERY == 0:
            bar.update(read)
            read = 0
        where = f"{path}:{number}"
        try:
            record = parse_line(raw, where, plain_time)
            if record is None:
                continue
            client, qname, _, moment, version = record
            when = _when(moment, plain_time) if replayer.timed else plain_time
            replayer.add(client, qname, when, version)
        except Bad as error:
            report.bad += 1
            if report.bad <= BAD_SHOWN:
                print(f"{where}: skipped: {error}", file=sys.stderr)
    if bar is not None:
        bar.update(read)
        bar.close()
    return report


def _bar(total: int | None):  # type: ignore[no-untyped-def]
    """A progress bar on stderr, in bytes of log read (only on a terminal: run() asks)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="replay", file=sys.stderr,
                leave=False)


# --- the baseline ----------------------------------------------------------------------------


def choose_baseline(args: argparse.Namespace, config: Config, logged: str | None
                    ) -> tuple[Loaded, str]:
    """The baseline and a sentence saying why it is the one (docs/tools.md#replay):
    --baseline if given; else, of the config's rules (-c) and the shipped rules, the first
    whose version is the log's rules_version; else the shipped rules."""
    if args.baseline:
        loaded = Loaded.read(args.baseline)
        return loaded, f"rules {loaded.rules.version} (--baseline)"
    places = ([("the config's blocking.rules", config.blocking.rules)] if args.config else [])
    places.append(("the shipped rules", (SHIPPED_RULES,)))
    tried = []
    for label, paths in places:
        try:
            loaded = Loaded.read(paths)
        except ConfigError as error:
            raise ToolError([f"baseline ({label}): {p}" for p in error.problems]) from None
        if logged is not None and loaded.rules.version == logged:
            return loaded, f"rules {logged} ({label}: the log's rules_version)"
        tried.append(f"{label} are {loaded.rules.version}")
    shipped = Loaded.read((SHIPPED_RULES,))
    why = ("the log names no rules_version" if logged is None else
           f"the log's rules_version {logged} was not found: {'; '.join(tried)}")
    return shipped, f"rules {shipped.rules.version} (the shipped rules; {why})"


# --- output ----------------------------------------------------------------------------------


def as_json(report: Report, baseline: str, candidate: str, files: int, top: int
            ) -> dict[str, object]:
    return {
        "queries": report.queries, "files": files, "bad_lines": report.bad,
        "clients": report.clients.as_json(), "baseline": baseline, "candidate": candidate,
        "records_under_other_rules": report.other_version,
        "newly_blocked": report.newly_blocked.as_json(top),
        "newly_allowed": report.newly_allowed.as_json(top),
        "blocked_by_another_rule": report.changed_rule.as_json(top),
        "unchanged": {"blocked": report.unchanged_blocked, "allowed": report.unchanged_allowed},
        "dry_run": [{"list": k[0], "entry": k[1], "action": k[2], **t.as_json()}
                    for k, t in _ordered(report.dry_run)]}


def _rule(key: Key) -> str:
    return f"list {key[0]}" + (f", entry {key[1]}" if key[1] else "") + f" ({key[2]})"


def print_report(report: Report, baseline: str, candidate: str, files: int, top: int) -> None:
    print(f"replayed {plural(report.queries, 'query', 'queries')} from "
          f"{plural(files, 'file')} ({plural(report.bad, 'bad line')} skipped), "
          f"{report.clients}")
    print(f"baseline: {baseline}")
    print(f"candidate: {candidate}")
    if report.other_version:
        print(f"note: {plural(report.other_version, 'record')} were logged under rules "
              "other than the baseline's")
    for title, change, verb in (("newly blocked", report.newly_blocked, "by"),
                                ("newly allowed", report.newly_allowed, "was"),
                                ("blocked by another rule", report.changed_rule, "now")):
        print(f"{title}: {change.total}")
        for key, tally in _ordered(change.by_rule):
            print(f"  {verb} {_rule(key)}: {tally}")
        names = change.names.top(top)
        if names:
            approximate = " (approximate counts)" if change.names.pruned else ""
            print(f"  most affected names{approximate}:")
            for name, count in names:
                print(f"    {count:>8}  {name}")
    print(f"unchanged: {report.unchanged_blocked} blocked, {report.unchanged_allowed} allowed")
    for key, tally in _ordered(report.dry_run):
        print(f"dry run: {_rule(key)} would block {tally}")


def run(args: argparse.Namespace) -> int:
    config = config_or_default(args.config)
    candidate = Loaded.read(args.rules)
    logs = LogFiles(args.logs)
    baseline, why = choose_baseline(args, config, logs.log_version())
    plain_time = args.at if args.at is not None else time.time()
    report = replay(logs, Replay(baseline.rules, candidate.rules), plain_time,
                    progress=sys.stderr.isatty())
    new = f"rules {candidate.rules.version}"
    if args.json:
        write_json(as_json(report, why, new, len(args.logs), args.top))
    else:
        print_report(report, why, new, len(args.logs), args.top)
    return CHANGES if report.changes else OK


