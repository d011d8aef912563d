"""Policy stage: answer the names the rules block, from bytes prepared when the rules load.

Each list's answer pieces (SOA tail, sinkhole records, OPT with its Extended DNS Error) are
packed once per rule set. A blocked answer is then a header, the client's own question, and
those pieces: the SOA's owner is a compression pointer to the matched suffix inside the
question, so nothing depends on the query name except one two-byte pointer.

A name blocked by where its CNAME chain leads is stages/cname.py's; it answers with these
same pieces, the SOA then owned by the blocked domain, written out in full.

Staged lists (docs/rules.md#staged-lists) make the stage ask `RuleSet.decide` with the
client and the wall-clock time instead of `lookup`, and only for sets that have some: the
shipped file's plain lists keep the single dict walk. What the stage says then depends on
the client or the time, so it never lets the packet cache replay it (stages/contract.py):
a block is `Answered` without a replay, a pass is `PASS_PER_CLIENT`. Dry-run lists that
would have blocked are counted in `resolver_would_block_total` and logged, at most one line
per list every WOULD_BLOCK_LOG_EVERY seconds (the line says how many it left out). Windows
open and close by the time each query reads; a timer only logs that they did.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections.abc import Callable

from resolver.message import wire
from resolver.message.constants import (
    CLASS_IN,
    CLASSIC_UDP,
    MAX_NAME,
    NEVER,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    TYPE_A,
    TYPE_AAAA,
    TYPE_SOA,
    Cancellable,
    Clock,
)
from resolver.message.names import from_wire, to_wire
from resolver.message.query import Outcome, Query
from resolver.ops.config import BlockingConfig
from resolver.ops.metrics import Metrics
from resolver.rules.matcher import Hit, RuleSet
from resolver.rules.model import Rule, RuleList
from resolver.rules.scope import utc
from resolver.stages.contract import PASS, PASS_PER_CLIENT, Answered, CallLater, Result

log = logging.getLogger(__name__)

EDE_BLOCKED = 15  # RFC 8914 "Blocked"
SOA_TIMERS = (1, 3600, 600, 86400)  # serial, refresh, retry, expire
WOULD_BLOCK_LOG_EVERY = 10.0  # seconds between two "would block" lines of one list
# A window timer looks again at least this often, so a wall clock stepped by NTP (or a
# suspended VM) delays a window's log line by at most this much.
WINDOW_RECHECK = 3600.0

class ListAnswers:
    """The packed answer pieces of one rule list."""

    __slots__ = ("rcode", "soa_tail", "records", "opt", "refused", "long_soa")

    def __init__(self, rules: RuleList, config: BlockingConfig, version: str = ""):
        """version: the rule set's, named in the EDE text so a client's answer says which
        rules gave it (what a rollout's operator compares across servers)."""
        ttl = rules.ttl if rules.ttl is not None else config.ttl
        rdata = (to_wire(config.soa_mname) + to_wire(config.soa_rname)
                 + struct.pack("!IIIII", *SOA_TIMERS, ttl))
        self.soa_tail = struct.pack("!HHIH", TYPE_SOA, CLASS_IN, ttl, len(rdata)) + rdata
        self.rcode = NXDOMAIN if rules.action == "nxdomain" else NOERROR
        self.refused = rules.action == "refused"
        self.records = _sinkhole_records(rules, ttl) if rules.action == "sinkhole" else {}
        text = f"blocked by list {rules.name}" + (f" (rules {version})" if version else "")
        option = wire.ede_option(EDE_BLOCKED, text) if config.ede else b""
        self.opt = (wire.opt_record(False, option), wire.opt_record(True, option))
        # Whether an answer whose SOA owner points into the question can outgrow 512 bytes
        # (only with long SOA names, or a long list name in the EDE text)
        self.long_soa = (12 + MAX_NAME + 4 + 2 + len(self.soa_tail) + len(self.opt[1])
                         > CLASSIC_UDP)

    def build(self, q: Query, offset: int, owner: bytes | None = None) -> bytes:
        """The blocked answer for q, whose name matched the rule at name[offset:].

        owner: the SOA owner when the blocked domain is not in the question (a CNAME target,
        in uncompressed wire form); offset is then unused.
        """
        opt = self.opt[q.do] if q.edns else b""
        ar = 1 if q.edns else 0
        if self.refused:
            return wire.header(q, REFUSED, 0, 0, ar) + q.question + opt
        if self.records and q.qclass == CLASS_IN:
            found = self.records.get(q.qtype)
            if found:
                count, records = found  # many addresses may not fit a small UDP buffer
                return wire.fit(
                    q, wire.header(q, NOERROR, count, 0, ar) + q.question + records + opt)
        answer = wire.header(q, self.rcode, 0, 1, ar) + q.question
        if owner is None:
            answer += struct.pack("!H", 0xC000 | (12 + offset)) + self.soa_tail + opt
            # only long SOA names can take a name's answer past 512 bytes: look only then
            return wire.fit(q, answer) if self.long_soa else answer
        return wire.fit(q, answer + owner + self.soa_tail + opt)  # a CNAME target, in full


def _sinkhole_records(rules: RuleList, ttl: int) -> dict[int, tuple[int, bytes]]:
    """A and AAAA answer records whose owner points at the question name (offset 12)."""
    records = {}
    for rtype, addresses in ((TYPE_A, rules.sinkhole_v4), (TYPE_AAAA, rules.sinkhole_v6)):
        packed = [ipaddress.ip_address(a).packed for a in addresses]
        records[rtype] = (len(packed), b"".join(
            b"\xc0\x0c" + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(p)) + p
            for p in packed))
    return records


class Blocker:
    """Answers queries whose name is blocked; passes everything else on.

    It sits first in the chain so a newly blocked name is refused even while an answer for it
    is still in the cache.

    clock: the monotonic clock (rate-limits the "would block" lines); wall: epoch seconds,
    what list windows are written in; schedule: arms the timer that logs windows opening
    and closing (None: no timer, as in table tests that step `wall` themselves).
    """

    answer: Callable[[Query], Result]  # the stage's entry point, chosen by install

    def __init__(self, rules: RuleSet, config: BlockingConfig, metrics: Metrics, *,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 schedule: CallLater | None = None):
        self._metrics = metrics
        self._config = config
        self._clock = clock
        self._wall = wall
        self._schedule = schedule
        self._timer: Cancellable | None = None
        self._edges: list[tuple[float, RuleList, str]] = []
        self._generation = 0
        self._said: dict[str, tuple[float, int]] = {}  # list -> last line, matches left out
        self._listeners: list[Callable[[], None]] = []
        self._would_block = metrics.counter(
            "would_block_total",
            "Queries a dry-run list would have blocked, by list, entry and action.",
            ("list", "entry", "action"))
        self.install(rules)
        metrics.gauge("rules_domains", "Domains each loaded rule list names, by list and mode.",
                      ("list", "mode"), self._domains, merge="max")

    def install(self, rules: RuleSet, config: BlockingConfig | None = None) -> None:
        """Swap in a new rule set with its packed answers in one assignment (no locks needed),
        and arm the window timer for the new set's lists. config: the `blocking` section to
        pack answers with from now on (a reload reads it again), else the one in use."""
        if config is not None:
            self._config = config
        answers = {lst.name: ListAnswers(lst, self._config, rules.version)
                   for lst in rules.lists}
        self._state = (rules, answers)
        # A set without staged lists keeps the one-dict path, not even a test of its own
        # per query: the method is chosen here, once per install (bench/micro.py's
        # "policy" lines and its bytecode count are the same as before lists could be staged).
        self.answer = self._decide if rules.staged else self._lookup
        try:
            self._arm(rules)
        except Exception:  # the timer only logs: the new rules stand regardless
            log.exception("could not arm the list-window timer")
        for listener in self._listeners:  # each runs, or a stale cache could outlive the swap
            try:
                listener()
            except Exception:
                log.exception("unexpected error after installing rules %s", rules.version)

    def close(self) -> None:
        """Stop the list-window timer (the server is stopping)."""
        self._generation += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_install(self, listener: Callable[[], None]) -> None:
        """Call listener after every rule swap (caches drop or recheck what the rules shaped)."""
        self._listeners.append(listener)

    @property
    def rules(self) -> RuleSet:
        return self._state[0]

    def _lookup(self, q: Query) -> Result:
        """The answer when the set has no staged list: the plain table decides for all."""
        rules, answers = self._state
        hit = rules.lookup(q.name, q.offsets)
        if hit is None:
            return PASS
        rule, offset = hit
        blocked = self._metrics.blocked
        blocked.inc(rule.labels)
        # replayable until the rules change (install clears the packet cache)
        return Answered(answers[rule.list.name].build(q, offset), Outcome.BLOCKED,
                        (NEVER, blocked, rule.labels))

    def _decide(self, q: Query) -> Result:
        """The answer when the set has staged lists: what `decide` says for this client now."""
        rules, answers = self._state
        decision = rules.decide(q.name, q.offsets, q.client[0], self._wall())
        if decision.dry_runs:
            self._would(q, decision.dry_runs)
        block = decision.block
        if block is None:
            return PASS_PER_CLIENT if decision.per_client else PASS
        rule, offset = block
        blocked = self._metrics.blocked
        blocked.inc(rule.labels)
        data = answers[rule.list.name].build(q, offset)
        if decision.per_client:  # this client's, now: never replayed to the next one
            return Answered(data, Outcome.BLOCKED)
        return Answered(data, Outcome.BLOCKED, (NEVER, blocked, rule.labels))

    def _would(self, q: Query, hits: tuple[Hit, ...]) -> None:
        """Count what dry-run lists would have blocked; log it, rate-limited per list."""
        counts = self._would_block.counts
        now = self._clock()
        for rule, offset in hits:
            key = rule.labels
            counts[key] = counts.get(key, 0) + 1
            name = rule.list.name
            last, left_out = self._said.get(name, (None, 0))
            if last is not None and now - last < WOULD_BLOCK_LOG_EVERY:
                self._said[name] = (last, left_out + 1)
                continue
            self._said[name] = (now, 0)
            log.info("would block %s for %s: dry-run list %s%s, domain %s, action %s%s",
                     from_wire(q.name), q.client[0], name,
                     f", entry {rule.entry_id}" if rule.entry_id else "",
                     from_wire(q.name[offset:]), rule.list.action,
                     f" ({left_out} more not logged since the last line)" if left_out else "")

    def answer_owned(self, q: Query, rule: Rule, owner: bytes) -> bytes:
        """The rule's blocked answer for q with the SOA owned by `owner`, a blocked domain that
        is not in the question (where a CNAME chain led), counted like any other block."""
        self._metrics.blocked.inc(rule.labels)
        return self._state[1][rule.list.name].build(q, 0, owner=owner)

    def _domains(self) -> dict[tuple[str, ...], float]:
        """resolver_rules_domains: each list's domain count under its name and mode."""
        rules = self.rules
        return {(lst.name, lst.mode): rules.counts.get(lst.name, 0) for lst in rules.lists}

    def _arm(self, rules: RuleSet) -> None:
        """Forget the old set's window edges, log where the new set's windows stand, and arm
        the timer for the next edge still to come."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._generation += 1
        now = self._wall()
        edges = rules.instants()
        for rule_list in {edge[1].name: edge[1] for edge in edges}.values():
            log.info("rules %s: list %s %s", rules.version, rule_list.name,
                     _window_state(rule_list, now))
        self._edges = [edge for edge in edges if edge[0] > now]
        self._next(now)

    def _next(self, now: float) -> None:
        if self._edges and self._schedule is not None:
            delay = min(max(0.0, self._edges[0][0] - now), WINDOW_RECHECK)
            self._timer = self._schedule(delay, self._tick, self._generation)

    def _tick(self, generation: int) -> None:
        """A window edge is due (or the recheck): log the edges now passed, arm the next."""
        if generation != self._generation:  # armed for rules that have been replaced
            return
        self._timer = None
        now = self._wall()
        while self._edges and self._edges[0][0] <= now:
            at, rule_list, edge = self._edges.pop(0)
            if edge == "starts":
                log.info("list %s is now active: its window started at %s", rule_list.name,
                         utc(at))
            else:
                log.info("list %s is no longer active: its window ended at %s",
                         rule_list.name, utc(at))
        self._next(now)


def _window_state(rule_list: RuleList, now: float) -> str:
    """Where a list's window stands, for the log line of a rule install."""
    starts, expires = rule_list.starts, rule_list.expires
    if starts is not None and now < starts:
        until = f" until {utc(expires)}" if expires is not None else ""
        return f"is not active yet: its window starts at {utc(starts)}{until}"
    if expires is not None and now >= expires:
        return f"is no longer active: its window ended at {utc(expires)}"
    return "is active" + (f" until {utc(expires)}" if expires is not None else "")

