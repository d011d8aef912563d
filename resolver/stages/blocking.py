"""Policy stage: answer the names the rules block, from bytes prepared when the rules load.

Each list's answer pieces (SOA tail, sinkhole records, OPT with its Extended DNS Error) are
packed once per rule set. A blocked answer is then a header, the client's own question, and
those pieces: the SOA's owner is a compression pointer to the matched suffix inside the
question, so nothing depends on the query name except one two-byte pointer.

A name blocked by where its CNAME chain leads is stages/cname.py's; it answers with these
same pieces, the SOA then owned by the blocked domain, written out in full.
"""

from __future__ import annotations

import ipaddress
import struct
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
)
from resolver.message.names import to_wire
from resolver.message.query import Outcome, Query
from resolver.ops.config import BlockingConfig
from resolver.ops.metrics import Metrics
from resolver.rules.matcher import RuleSet
from resolver.rules.model import Rule, RuleList
from resolver.stages.contract import PASS, Answered, Result

EDE_BLOCKED = 15  # RFC 8914 "Blocked"
SOA_TIMERS = (1, 3600, 600, 86400)  # serial, refresh, retry, expire


class ListAnswers:
    """The packed answer pieces of one rule list."""

    __slots__ = ("rcode", "soa_tail", "records", "opt", "refused", "long_soa")

    def __init__(self, rules: RuleList, config: BlockingConfig):
        ttl = rules.ttl if rules.ttl is not None else config.ttl
        rdata = (to_wire(config.soa_mname) + to_wire(config.soa_rname)
                 + struct.pack("!IIIII", *SOA_TIMERS, ttl))
        self.soa_tail = struct.pack("!HHIH", TYPE_SOA, CLASS_IN, ttl, len(rdata)) + rdata
        self.rcode = NXDOMAIN if rules.action == "nxdomain" else NOERROR
        self.refused = rules.action == "refused"
        self.records = _sinkhole_records(rules, ttl) if rules.action == "sinkhole" else {}
        option = (wire.ede_option(EDE_BLOCKED, f"blocked by list {rules.name}")
                  if config.ede else b"")
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
    """

    def __init__(self, rules: RuleSet, config: BlockingConfig, metrics: Metrics):
        self._metrics = metrics
        self._config = config
        self._listeners: list[Callable[[], None]] = []
        self.install(rules)
        metrics.gauge("rules_domains", "Domains blocked by the loaded rules.", (),
                      lambda: {(): self.rules.domain_count}, merge="max")

    def install(self, rules: RuleSet) -> None:
        """Swap in a new rule set with its packed answers in one assignment (no locks needed)."""
        answers = {lst.name: ListAnswers(lst, self._config) for lst in rules.lists}
        self._state = (rules, answers)
        for listener in self._listeners:
            listener()

    def on_install(self, listener: Callable[[], None]) -> None:
        """Call listener after every rule swap (caches drop or recheck what the rules shaped)."""
        self._listeners.append(listener)

    @property
    def rules(self) -> RuleSet:
        return self._state[0]

    def answer(self, q: Query) -> Result:
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

    def answer_owned(self, q: Query, rule: Rule, owner: bytes) -> bytes:
        """The rule's blocked answer for q with the SOA owned by `owner`, a blocked domain that
        is not in the question (where a CNAME chain led), counted like any other block."""
        self._metrics.blocked.inc(rule.labels)
        return self._state[1][rule.list.name].build(q, 0, owner=owner)
