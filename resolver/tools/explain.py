"""`resolver rules explain`: why one name is blocked or allowed, for one client at one time.

The verdict is `RuleSet.judge`, the server's own decision; the blocked answer is made by the
blocking stage's `ListAnswers` (the bytes a client would get, decoded for people). Around
them, every rule whose domain covers the name is listed with what it did: decides, allows,
would block (dry run), is overridden or shadowed, or does not apply and why
(rules/explain.py). Only the query name is judged: a name allowed here may still be blocked
by the server when its CNAME chain leads into a blocked domain (docs/rules.md).
"""

from __future__ import annotations

import argparse
import struct
import time
from dataclasses import dataclass

import dnslib

from resolver.message import wire
from resolver.message.constants import CLASS_IN, EDE_OPTION
from resolver.message.names import from_wire, normalize, to_wire
from resolver.ops.config import BlockingConfig
from resolver.rules.explain import covering, not_applying
from resolver.rules.model import ALLOW, DRY_RUN, Rule
from resolver.rules.scope import utc
from resolver.stages.blocking import EDE_BLOCKED, ListAnswers
from resolver.tools.common import (
    OK,
    Loaded,
    ToolError,
    client_ip,
    config_or_default,
    instant,
    rule_paths,
    write_json,
)

DEFAULT_CLIENT = "127.0.0.1"  # a dig on the server's own host


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "explain", help="why a name is blocked or allowed, and the answer a client gets",
        description="Judge NAME as the server does for one client at one time: the deciding "
        "list and entry and the answer, or exactly why the name is allowed.")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--client", type=client_ip, default=DEFAULT_CLIENT, metavar="IP",
                        help=f"the client's address (default {DEFAULT_CLIENT})")
    parser.add_argument("--qtype", type=qtype, default="A", metavar="T",
                        help="query type: A, AAAA, MX, TYPE65280... (default A)")
    parser.add_argument("--at", type=instant, metavar="TIME",
                        help="RFC 3339 time to judge at, e.g. 2027-03-01T06:00:00Z (default now)")
    parser.add_argument("--rules", nargs="+", action="extend", default=[], metavar="PATH",
                        help="rule files or directories (default: the config's, else the "
                        "shipped rules)")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="config file: its blocking section shapes answers and names rules")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.set_defaults(run=run)
    return parser


def qtype(text: str) -> str:
    """argparse type: a query type mnemonic (or TYPEnnn), as dnslib and the query log write
    them."""
    try:
        number = getattr(dnslib.QTYPE, text.upper())
    except dnslib.DNSError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a query type") from None
    return str(dnslib.QTYPE[number])


@dataclass(frozen=True, slots=True)
class Candidate:
    """One rule whose domain covers the name, and what it did to this query."""

    rule: Rule
    domain: str
    status: str  # decides, allows, would-block, counted-elsewhere, overridden, shadowed,
    #              not-applying
    reason: str

    def as_json(self) -> dict[str, object]:
        return {"list": self.rule.list.name, "entry": self.rule.entry_id,
                "entry_name": self.rule.entry_name, "domain": self.domain,
                "action": self.rule.list.action, "mode": self.rule.list.mode,
                "status": self.status, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Explanation:
    name: str
    verdict: str  # blocked or allowed
    why: str  # one sentence
    decider: Candidate | None
    dry_runs: tuple[Candidate, ...]
    candidates: tuple[Candidate, ...]


def explain(loaded: Loaded, name: str, client: str, now: float) -> Explanation:
    """Judge name for client at now (epoch seconds) and say why. ValueError: a bad name."""
    name = normalize(name)
    decision = loaded.rules.judge(name, client, now)
    wire_name = to_wire(name)
    block = None if decision.block is None else (decision.block[0],
                                                  from_wire(wire_name[decision.block[1]:]))
    counted = {rule.list.name: from_wire(wire_name[offset:]) for rule, offset in
               decision.dry_runs}
    found = [(rule, domain, not_applying(rule.list, client, now))
             for rule, domain in covering(loaded.domains, name)]
    allow = next(((rule, domain) for rule, domain, reason in found
                  if reason is None and rule.list.action == ALLOW), None)
    candidates = tuple(_candidate(rule, domain, reason, block, allow, counted)
                       for rule, domain, reason in found)
    decider = next((c for c in candidates if c.status == "decides"), None)
    dry_runs = tuple(c for c in candidates if c.status == "would-block")
    if decider is not None:
        why = f"blocked by {_label(decider.rule, decider.domain)}"
        return Explanation(name, "blocked", why, decider, dry_runs, candidates)
    if allow is not None:
        why = f"allowed by {_label(*allow)}: an allow entry wins over every block"
    elif not candidates:
        why = f"allowed: no list names {name} or a domain above it"
    else:
        why = "allowed: no enforcing block list naming it applies to this client at this time"
    return Explanation(name, "allowed", why, None, dry_runs, candidates)


def _candidate(rule: Rule, domain: str, reason: str | None, block: tuple[Rule, str] | None,
               allow: tuple[Rule, str] | None, counted: dict[str, str]) -> Candidate:
    """What one covering rule did, given the decision (block, dry-run hits) and the allow
    that applies, if any."""
    if reason is not None:
        return Candidate(rule, domain, "not-applying", f"does not apply: {reason}")
    if block is not None and rule is block[0] and domain == block[1]:
        return Candidate(rule, domain, "decides", "answers: the most specific applicable "
                         "block (first list by name at that domain)")
    if rule.list.action == ALLOW:
        if allow is not None and rule is allow[0] and domain == allow[1]:
            return Candidate(rule, domain, "allows", "allows the name (allow wins)")
        return Candidate(rule, domain, "allows", "allows the name too")
    if rule.list.mode == DRY_RUN:
        where = counted.get(rule.list.name)
        if where == domain:
            return Candidate(rule, domain, "would-block", f"would block it (action "
                             f"{rule.list.action}): a dry run, counted in "
                             "resolver_would_block_total; the answer is unchanged")
        if where is not None:
            return Candidate(rule, domain, "counted-elsewhere",
                             f"dry run counted at its more specific domain {where}")
        return Candidate(rule, domain, "overridden",
                         f"dry run not counted: {_label(*allow)} allows the name" if allow
                         else "dry run not counted")
    if allow is not None:
        return Candidate(rule, domain, "overridden",
                         f"overridden: {_label(*allow)} allows the name (allow wins)")
    if block is None:  # an applicable block that neither answers nor is allowed: a bug
        raise AssertionError(f"{_label(rule, domain)} applies, but nothing blocks or allows")
    why = ("first in name order (then entry id) at that domain" if block[1] == domain
           else "its more specific domain answers first")
    return Candidate(rule, domain, "shadowed", f"shadowed: {_label(*block)} answers, "
                     f"{why}")


def _label(rule: Rule, domain: str) -> str:
    entry = f", entry {rule.entry_id}" if rule.entry_id else ""
    named = f" ({rule.entry_name})" if rule.entry_name else ""
    return f"list {rule.list.name}{entry}{named}, domain {domain}"


@dataclass(frozen=True, slots=True)
class Answer:
    """The blocked answer as the client would decode it (data: its bytes)."""

    data: bytes
    rcode: str
    answer: tuple[str, ...]
    authority: tuple[str, ...]
    ede: str | None

    def as_json(self) -> dict[str, object]:
        return {"rcode": self.rcode, "answer": list(self.answer),
                "authority": list(self.authority), "ede": self.ede}


def blocked_answer(loaded: Loaded, decider: Candidate, blocking: BlockingConfig, name: str,
                   rdtype: str, client: str) -> Answer:
    """The bytes the blocking stage answers an EDNS query (as dig sends) with, decoded.

    The query goes through the server's own parser, so the offset of the matched domain in
    it is the one the stage would use."""
    name_wire = to_wire(name)
    packet = (struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 1) + name_wire
              + struct.pack("!HH", getattr(dnslib.QTYPE, rdtype), CLASS_IN)
              + wire.opt_record(False))
    query = wire.parse_query(packet, (client, 53), "udp")
    offset = len(name_wire) - len(to_wire(decider.domain))
    data = ListAnswers(decider.rule.list, blocking, loaded.rules.version).build(query, offset)
    record = dnslib.DNSRecord.parse(data)
    ede = None
    for opt in record.ar:
        for option in opt.rdata if opt.rtype == dnslib.QTYPE.OPT else ():
            if option.code == EDE_OPTION and option.data[:2] == struct.pack(
                    "!H", EDE_BLOCKED):
                ede = f"{EDE_BLOCKED} (Blocked): {option.data[2:].decode()}"
    return Answer(data, str(dnslib.RCODE[record.header.rcode]),
                  tuple(_text(rr) for rr in record.rr), tuple(_text(rr) for rr in record.auth),
                  ede)


def run(args: argparse.Namespace) -> int:
    config = config_or_default(args.config)
    loaded = Loaded.read(rule_paths(args.rules, config))
    now = args.at if args.at is not None else time.time()
    try:
        result = explain(loaded, args.name, args.client, now)
    except ValueError as error:
        raise ToolError([str(error)]) from None
    answer = None if result.decider is None else blocked_answer(
        loaded, result.decider, config.blocking, result.name, args.qtype, args.client)
    if args.json:
        write_json({
            "name": result.name, "qtype": args.qtype, "client": args.client, "at": utc(now),
            "rules_version": loaded.rules.version, "verdict": result.verdict, "why": result.why,
            "decision": None if result.decider is None else result.decider.as_json(),
            "answer": None if answer is None else answer.as_json(),
            "dry_run": [c.as_json() for c in result.dry_runs],
            "rules": [c.as_json() for c in result.candidates]})
        return OK
    print(f"{result.name} {args.qtype} from {args.client} at {utc(now)}, rules "
          f"{loaded.rules.version}")
    print(result.why + (f": action {result.decider.rule.list.action}, mode "
                        f"{result.decider.rule.list.mode}" if result.decider else ""))
    if answer is not None:
        print(f"answer: {answer.rcode}")
        for line in answer.answer + answer.authority:
            print(f"  {line}")
        if answer.ede:
            print(f"  EDE {answer.ede}")
    else:
        print("answer: forwarded upstream or from the cache (the rules leave it alone)")
    for candidate in result.dry_runs:
        print(f"dry run: {_label(candidate.rule, candidate.domain)} would block it (action "
              f"{candidate.rule.list.action})")
    if result.candidates:
        print("rules naming it or a domain above it:")
    for candidate in result.candidates:
        print(f"  {_label(candidate.rule, candidate.domain)} ({candidate.rule.list.action}, "
              f"{candidate.rule.list.mode}): {candidate.reason}")
    return OK


def _text(record: dnslib.RR) -> str:
    """A record on one line, single-spaced (dnslib pads its fields into columns)."""
    return " ".join(str(record).split())
