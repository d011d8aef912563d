"""CNAME cloaking: an allowed name whose answer's CNAME chain leads into a blocked domain is
answered as blocked, as Pi-hole, Blocky and AdGuard Home do.

The chain is judged in two places, both here:
- when an upstream reply lands (the forwarder asks `verdict` before answering), and
- for answers already cached: the cache keeps each entry's verdict, taken when the entry is
  stored and again on every rule install, so a plain cache hit pays nothing; the cache
  passes an entry whose chain is blocked (and an expired one) on, and the `CnameBlocker`
  stage answers a fresh entry with a blocked chain as blocked.

The answer is the blocking list's own, with the SOA owned by the blocked domain.

Only the lists that hold for everyone, always, and enforce take part (`RuleSet.lookup`'s
plain table): a cached verdict is shared by every client who asks, so a list scoped to some
clients, a rollout slice, a time window or a dry run must not feed it, or one client's
view would reach another. Such lists judge the query name only (docs/rules.md).
"""

from __future__ import annotations

from resolver.message.names import label_offsets
from resolver.message.query import Outcome, Query
from resolver.rules.model import Rule
from resolver.stages.blocking import Blocker
from resolver.stages.cache import Cache
from resolver.stages.contract import PASS, Answered, Result

Cloak = tuple[Rule, bytes]  # the rule, and the blocked domain (wire form) a CNAME chain reaches


class CnameCheck:
    """Judges CNAME chains against the live rules, and answers the ones they block."""

    def __init__(self, blocker: Blocker):
        self._blocker = blocker

    def verdict(self, targets: tuple[bytes, ...]) -> Cloak | None:
        """The first block among an answer's CNAME targets (lowercase wire names): the rule and
        the blocked domain, or None when the live rules let the whole chain through. Judged
        by the plain lists only (see the module's docstring): the same for every client."""
        rules = self._blocker.rules
        for target in targets:
            hit = rules.lookup(target, label_offsets(target))
            if hit is not None:
                return hit[0], target[hit[1]:]
        return None

    def answer(self, q: Query, cloak: Cloak) -> Answered:
        """q's blocked answer, its chain having led into cloak's domain. Never replayed: the
        entry behind it may change under the packet cache."""
        rule, domain = cloak
        return Answered(self._blocker.answer_owned(q, rule, domain), Outcome.BLOCKED)


class CnameBlocker:
    """Stage: a cached answer whose CNAME chain leads into a blocked domain is answered as
    blocked, without asking upstream again."""

    def __init__(self, check: CnameCheck, cache: Cache):
        self._check = check
        self._cache = cache

    def answer(self, q: Query) -> Result:
        entry = self._cache.fresh(q.cache_key)
        if entry is None or entry.cloak is None:
            return PASS
        return self._check.answer(q, entry.cloak)
