"""The compiled matcher: immutable dicts from wire-form name to the rules that decide it.

A reload builds a new RuleSet and the server swaps one reference; nothing mutates one.

Two tables:
- the plain table holds the lists that apply to everyone, always, and enforce (every list
  of the shipped file): one rule per name, settled at build time, looked up by `lookup`
  with one dict lookup per label. A set with nothing else is answered by `lookup` alone;
- the staged table holds the lists whose effect depends on the client, the time or that
  only count (`RuleList.staged`): every rule per name, each with its compiled conditions
  (rules/scope.py), judged per query by `decide`.

Precedence (docs/rules.md#precedence), whatever the files' order, so that the version,
which ignores that order, determines what the rules do:
1. an allow list that applies to this client now, at any level covering the name, wins;
2. else the most specific domain of an enforcing block list that applies answers;
3. at the same domain, the list first in name order (then entry id) answers;
4. a dry-run list that applies and would have blocked the name (no applicable allow covers
   it) is reported, whichever list answers; it changes no answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from resolver.message.names import from_wire, label_offsets, normalize, to_wire
from resolver.rules import table as table_module
from resolver.rules.model import ALLOW, ENFORCE, Rule, RuleList
from resolver.rules.scope import Address, Staging, client_address
from resolver.rules.table import Domains, Table, rank, split
from resolver.rules.version import version_of_domains

_MAX_LABELS = 127  # in a 255-octet wire name: 127 one-letter labels and the root

Hit = tuple[Rule, int]  # a rule and the offset in the query name of the domain it matched
Staged = tuple[tuple[Rule, Staging], ...]  # a name's staged rules, in precedence order
Lookup = Callable[[bytes, Sequence[int]], "Hit | None"]  # RuleSet.lookup


class Decision:
    """What the rules say about one query: the block that answers (or None), the dry-run
    lists that would have blocked it (one hit per list, its most specific domain), and
    whether that depended on the client or the time (then no answer may be replayed to
    another client: stages/contract.py)."""

    __slots__ = ("block", "dry_runs", "per_client")

    def __init__(self, block: Hit | None, dry_runs: tuple[Hit, ...], per_client: bool):
        self.block = block
        self.dry_runs = dry_runs
        self.per_client = per_client


NOTHING: Final = Decision(None, (), False)  # no rule, or an allow that holds for everyone
ALLOWED_HERE: Final = Decision(None, (), True)  # an allow for this client or this time only


class RuleSet:
    """Immutable compiled matcher (see the module's docstring for the two tables).

    Allow rules of the plain table win at build time, not per query: a block domain (plain
    or staged) at or below a plainly allowed domain is dropped, because every name it could
    match is allowed anyway. After that the most specific plain hit always decides, so
    `lookup` stops at the first hit whether or not the set has allow rules.

    The plain table is a dict below table.COMPACT_FROM names and a compact table
    (rules/table.py: a few flat buffers in shared memory) from there on; `_get` is either's
    lookup of one name, and `lookup`, the hot path, is a function made for the one in use
    (`_dict_lookup`, `_compact_lookup`) that inlines it.

    Lookup also skips suffixes with more labels than the deepest rule or fewer than the
    shallowest: that saves the TLD lookup on nearly every query, and keeps the cost of a
    127-label query the same as a short one. The label indexes worth trying are
    precomputed per label count, since a range beats index arithmetic in the loop.
    """

    __slots__ = ("lists", "domain_count", "counts", "version", "staged", "lookup", "_table",
                 "_get", "_staged", "_staged_get", "_windows", "_depths", "_example")

    lists: tuple[RuleList, ...]
    domain_count: int  # distinct domains some enforcing list blocks
    counts: dict[str, int]  # domains each list names, by list name
    version: str  # rules/version.py
    staged: bool  # whether any list is staged: the Blocker then asks `decide`
    # lookup(name, offsets) -> (rule, offset) for the most specific blocking match of the
    # plain table (the lists that hold for every client, always), or None. name: lowercase
    # wire form of the query name; offsets: start of each label, most specific first, e.g.
    # (0, 4, 12) for www.example.org. None also when an allow rule covers the name. One
    # table probe per label; the allow check runs only on a hit. This is the whole answer
    # for a set without staged lists, and what CNAME cloaking judges chains by
    # (stages/cname.py), since a cached verdict is shared by everyone.
    lookup: Lookup
    _table: dict[bytes, Rule] | Table  # the plain table
    _get: Callable[[bytes], Rule | None]  # its lookup of one wire name
    _staged: dict[bytes, Staged]
    _staged_get: Callable[[bytes], Staged | None]
    _windows: tuple[range, ...]
    _depths: tuple[int, int]  # fewest and most labels of a name in either table
    _example: bytes | None

    def __init__(self, lists: Sequence[RuleList],
                 domains: Iterable[tuple[bytes, Rule]] | Domains):
        """Compile (wire name, rule) pairs; which of two rules for one name wins does not
        depend on their order (list name, then entry id: `rank`). A Domains (what the
        loader collects) is read without a Python object per name."""
        if not isinstance(domains, Domains):
            domains = Domains(domains)
        staged_names = {rule_list.name for rule_list in lists if rule_list.staged}
        counts = dict.fromkeys((rule_list.name for rule_list in lists), 0)
        plain: list[Rule] = []
        staged: dict[bytes, list[Rule]] = {}
        for rule in domains.rules():
            name = rule.list.name
            counts[name] = counts.get(name, 0) + len(domains.hashes(rule))
            if name in staged_names:
                for wire in split(domains.names(rule)):
                    staged.setdefault(wire, []).append(rule)
            else:
                plain.append(rule)
        version = version_of_domains(lists, domains)
        allows: dict[bytes, Rule] = {}
        for rule in sorted((rule for rule in plain if rule.list.action == ALLOW), key=rank):
            for wire in split(domains.names(rule)):
                allows.setdefault(wire, rule)
        enforced = {wire for wire, rules in staged.items()
                    if any(rule.list.action != ALLOW and rule.list.mode == ENFORCE
                           for rule in rules)}
        if allows:  # skipped for pure block sets: checking parents costs ~1 s per 1M domains
            staged = {wire: rules for wire, rules in staged.items()
                      if not _allowed(wire, allows)}
        table: dict[bytes, Rule] | Table
        if sum(len(domains.hashes(rule)) for rule in plain) >= table_module.COMPACT_FROM:
            table = table_module.build(domains, plain, allows)
            domain_count = table.blocks + len(enforced) - sum(
                1 for wire in enforced if _names_block(table, domains, plain, wire))
        else:
            table, domain_count = _dict_table(domains, plain, allows, enforced)
        stagings = {rule_list.name: Staging(rule_list) for rule_list in lists
                    if rule_list.name in staged_names}
        compiled = {wire: _compile(rules, stagings) for wire, rules in staged.items()}
        depths = (domains.shallowest, domains.deepest)
        self._fill(tuple(lists), domain_count, counts, version, table, compiled, depths,
                   _example(table, compiled))

    def _fill(self, lists: tuple[RuleList, ...], domain_count: int, counts: dict[str, int],
              version: str, table: dict[bytes, Rule] | Table, staged: dict[bytes, Staged],
              depths: tuple[int, int], example: bytes | None) -> None:
        """Set every attribute from the compiled tables (also what unpickling calls)."""
        setter = object.__setattr__  # the only writes, before anyone can see the set
        setter(self, "lists", lists)
        setter(self, "domain_count", domain_count)
        setter(self, "counts", counts)
        setter(self, "version", version)
        setter(self, "staged", bool(staged))
        setter(self, "_table", table)
        setter(self, "_get", table.get)
        setter(self, "_staged", staged)
        setter(self, "_staged_get", staged.get)
        setter(self, "_depths", depths)
        windows = _windows(*depths)
        setter(self, "_windows", windows)
        setter(self, "lookup", _compact_lookup(table, windows) if isinstance(table, Table)
               else _dict_lookup(table.get, windows))
        setter(self, "_example", example)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """Pickled as its compiled tables, so a supervisor can compile once per reload and
        ship the set to its workers (which then need not read files that may have changed
        since); a compact table goes by reference where the pickler shares it (table.dumps),
        and the lookup functions are made again on arrival."""
        return _rebuild, (self.lists, self.domain_count, self.counts, self.version,
                          self._table, self._staged, self._depths, self._example)

    def __setattr__(self, name: str, value: object) -> None:
        """Refuse changes: readers on other tasks rely on a set never changing under them."""
        raise AttributeError("RuleSet is immutable; build a new one")

    def decide(self, name: bytes, offsets: Sequence[int], client: str, now: float
               ) -> Decision:
        """The rules' decision for this client at this time (wall-clock epoch seconds):
        both tables, with the precedence of the module's docstring.

        Walks every suffix the tables could hold (an allow may sit above the block), reads
        the client's address only when a staged rule matched, and allocates nothing unless
        a staged rule matched or a block answers.
        """
        get = self._get
        staged_get = self._staged_get
        block: Hit | None = None
        dry_runs: dict[str, Hit] | None = None
        seen = False
        address: Address | None = None
        for index in self._windows[len(offsets)]:
            offset = offsets[index]
            suffix = name[offset:]
            rule = get(suffix)
            if rule is not None:
                if rule.list.action == ALLOW:
                    return NOTHING  # allowed for everyone: staged rules were dropped below
                if block is None:
                    block = (rule, offset)
            found = staged_get(suffix)
            if found is None:
                continue
            if not seen:
                seen, address = True, client_address(client)
            for staged_rule, staging in found:
                if not staging.applies(address, now):
                    continue
                if staging.allow:
                    return ALLOWED_HERE
                if staging.dry_run:
                    if dry_runs is None:
                        dry_runs = {}
                    dry_runs.setdefault(staged_rule.list.name, (staged_rule, offset))
                elif block is None or (block[1] == offset
                                       and rank(staged_rule) < rank(block[0])):
                    block = (staged_rule, offset)
        if not seen:
            return NOTHING if block is None else Decision(block, (), False)
        return Decision(block, tuple(dry_runs.values()) if dry_runs else (), True)

    def judge(self, name: str, client: str, now: float) -> Decision:
        """Text form of decide for tools and tests (raises ValueError for a bad name)."""
        wire = to_wire(normalize(name))
        return self.decide(wire, label_offsets(wire), client, now)

    def would_block(self, name: str, now: float | None = None) -> tuple[Rule, str] | None:
        """The enforcing rule, and the domain it names, that would block `name` for at least
        one client at some time, or None: scope, rollout and windows are ignored (but with
        `now`, a list whose window has ended blocks no more), dry-run lists never block, and
        only an allow that holds for everyone, always, prevents it (what a reload guard asks
        of its must-resolve names). Raises ValueError for a bad name, as normalize does."""
        wire = to_wire(normalize(name))
        offsets = label_offsets(wire)
        block: Hit | None = None
        for index in self._windows[len(offsets)]:
            offset = offsets[index]
            rule = self._get(wire[offset:])
            if rule is not None:
                if rule.list.action == ALLOW:
                    return None
                if block is None or (block[1] == offset and rank(rule) < rank(block[0])):
                    block = (rule, offset)
            for staged_rule, staging in self._staged_get(wire[offset:]) or ():
                if staging.allow or staging.dry_run:
                    continue
                expires = staged_rule.list.expires
                if now is not None and expires is not None and expires <= now:
                    continue
                if block is None or (block[1] == offset
                                     and rank(staged_rule) < rank(block[0])):
                    block = (staged_rule, offset)
        return None if block is None else (block[0], from_wire(wire[block[1]:]))

    def instants(self) -> tuple[tuple[float, RuleList, str], ...]:
        """Every window edge of the set's lists, in time order: (epoch seconds, list, "starts"
        or "expires"), for the Blocker's timer that logs lists turning on and off."""
        edges: list[tuple[float, RuleList, str]] = []
        for rule_list in self.lists:
            if rule_list.starts is not None:
                edges.append((rule_list.starts, rule_list, "starts"))
            if rule_list.expires is not None:
                edges.append((rule_list.expires, rule_list, "expires"))
        return tuple(sorted(edges, key=lambda item: (item[0], item[1].name)))

    def example_domain(self) -> str | None:
        """A blocked domain to show operators in the startup line, or None for no blocks."""
        return None if self._example is None else from_wire(self._example)

    def match(self, name: str) -> tuple[Rule, str] | None:
        """Text form of lookup for tools and tests: (rule, matched rule domain) or None.

        Raises ValueError for a name that is not valid, as normalize does.
        """
        wire = to_wire(normalize(name))
        found = self.lookup(wire, label_offsets(wire))
        if found is None:
            return None
        rule, offset = found
        return rule, from_wire(wire[offset:])


def _rebuild(lists: tuple[RuleList, ...], domain_count: int, counts: dict[str, int],
             version: str, table: dict[bytes, Rule] | Table, staged: dict[bytes, Staged],
             depths: tuple[int, int], example: bytes | None) -> RuleSet:
    """A RuleSet from its compiled tables (the other half of RuleSet.__reduce__)."""
    rules = RuleSet.__new__(RuleSet)
    rules._fill(lists, domain_count, counts, version, table, staged, depths, example)
    return rules


def _dict_lookup(get: Callable[[bytes], Rule | None], windows: tuple[range, ...]) -> Lookup:
    """RuleSet.lookup over a dict: one dict lookup per label tried."""

    def lookup(name: bytes, offsets: Sequence[int]) -> Hit | None:
        for index in windows[len(offsets)]:
            offset = offsets[index]
            rule = get(name[offset:])
            if rule is not None:
                return None if rule.list.action == ALLOW else (rule, offset)
        return None

    return lookup


def _compact_lookup(table: Table, windows: tuple[range, ...]) -> Lookup:
    """RuleSet.lookup over a compact table: Table.get inlined (a call per label would cost
    more than the probe), measured in bench/micro.py's "lookup" lines."""
    keys, ids, mask, rules = table.probe()

    def lookup(name: bytes, offsets: Sequence[int]) -> Hit | None:
        for index in windows[len(offsets)]:
            offset = offsets[index]
            key = hash(name[offset:])
            slot = key & mask
            found = keys[slot]
            while found:
                if found == key:
                    rule = rules[ids[slot]]
                    return None if rule.list.action == ALLOW else (rule, offset)
                slot = (slot + 1) & mask
                found = keys[slot]
        return None

    return lookup


def _dict_table(domains: Domains, plain: list[Rule], allows: dict[bytes, Rule],
                enforced: set[bytes]) -> tuple[dict[bytes, Rule], int]:
    """The plain table of a small set as a dict, and the distinct domains blocked."""
    blocks: dict[bytes, Rule] = {}
    for rule in plain:
        if rule.list.action == ALLOW:
            continue
        for wire in split(domains.names(rule)):
            kept = blocks.setdefault(wire, rule)  # one dict operation for a new name
            if kept is not rule and rank(rule) < rank(kept):
                blocks[wire] = rule
    domain_count = len(blocks.keys() | enforced) if enforced else len(blocks)
    table = blocks
    if allows:
        table = {wire: rule for wire, rule in blocks.items() if not _allowed(wire, allows)}
        table.update(allows)
    return table, domain_count


def _names_block(table: Table, domains: Domains, plain: list[Rule], wire: bytes) -> bool:
    """Whether a plain block rule names wire (a name an allow may have taken over)."""
    rule = table.get(wire)
    if rule is None:
        return False
    if rule.list.action != ALLOW:
        return True
    key = hash(wire)
    return any(key in domains.hashes(each) for each in plain if each.list.action != ALLOW)


def _example(table: dict[bytes, Rule] | Table, staged: dict[bytes, Staged]) -> bytes | None:
    """A blocked domain to show operators (RuleSet.example_domain)."""
    pairs = table.listed() if isinstance(table, Table) else table.items()
    example = next((wire for wire, rule in pairs if rule.list.action != ALLOW
                    and table.get(wire) is rule), None)
    if example is None:
        example = next((wire for wire, rules in staged.items()
                        if any(not staging.allow and not staging.dry_run
                               for _, staging in rules)), None)
    return example


def _compile(rules: list[Rule], stagings: dict[str, Staging]) -> Staged:
    """A name's staged rules in precedence order, one per list (its first entry by rank)."""
    kept: dict[str, Rule] = {}
    for rule in sorted(rules, key=rank):
        kept.setdefault(rule.list.name, rule)
    return tuple((rule, stagings[name]) for name, rule in kept.items())


def _windows(shallowest: int, deepest: int) -> tuple[range, ...]:
    """For each label count a name can have, the offsets indexes whose suffix could be a rule.

    A suffix starting at index i of n offsets has n - i labels; only depths that some rule
    has can hit. With no rules every range is empty.
    """
    shallowest = min(shallowest, deepest + 1)  # no rules: every range empty
    counts = range(_MAX_LABELS + 1)
    return tuple(range(max(0, count - deepest), count - shallowest + 1) for count in counts)


def _allowed(wire: bytes, allows: dict[bytes, Rule]) -> bool:
    """True if the name or one of its parents is allowed."""
    return any(wire[offset:] in allows for offset in label_offsets(wire))
