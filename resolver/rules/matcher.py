"""The compiled matcher: one immutable dict from wire-form name to the rule that decides it.

A reload builds a new RuleSet and the server swaps one reference; nothing mutates one.
"""

from collections.abc import Callable, Iterable, Sequence

from resolver.message.names import from_wire, label_offsets, normalize, to_wire
from resolver.rules.model import ALLOW, Rule, RuleList
from resolver.rules.version import version_of

_MAX_LABELS = 127  # in a 255-octet wire name: 127 one-letter labels and the root


class RuleSet:
    """Immutable compiled matcher: a dict from lowercase wire-form name to Rule.

    Allow rules win over block rules. That is settled at build time, not per query: a block
    domain at or below an allowed domain is dropped, because every name it could match is
    allowed anyway. After that the most specific table hit always decides, so lookup stops
    at the first hit whether or not the set has allow rules.

    Lookup also skips suffixes with more labels than the deepest rule or fewer than the
    shallowest: that saves the TLD lookup on nearly every query, and keeps the cost of a
    127-label query the same as a short one. The label indexes worth trying are
    precomputed per label count, since a range beats index arithmetic in the loop.
    """

    __slots__ = ("lists", "domain_count", "counts", "version", "_get", "_windows", "_example")

    lists: tuple[RuleList, ...]
    domain_count: int  # distinct blocked domains
    counts: dict[str, int]  # domains each list names, by list name
    version: str  # rules/version.py
    _get: Callable[[bytes], Rule | None]  # the table's dict.get, bound once
    _windows: tuple[range, ...]
    _example: bytes | None

    def __init__(self, lists: Sequence[RuleList], domains: Iterable[tuple[bytes, Rule]]):
        """Compile (wire name, rule) pairs given in load order; the first block rule wins."""
        domains = domains if isinstance(domains, list) else list(domains)
        blocks: dict[bytes, Rule] = {}
        allows: dict[bytes, Rule] = {}
        counts = dict.fromkeys((rule_list.name for rule_list in lists), 0)
        for wire, rule in domains:
            (allows if rule.list.action == ALLOW else blocks).setdefault(wire, rule)
            counts[rule.list.name] = counts.get(rule.list.name, 0) + 1
        setter = object.__setattr__  # the only writes, before anyone can see the set
        setter(self, "lists", tuple(lists))
        setter(self, "domain_count", len(blocks))
        setter(self, "counts", counts)
        setter(self, "version", version_of(lists, domains))
        table = blocks
        if allows:  # skipped for pure block sets: checking parents costs ~1 s per 1M domains
            table = {wire: rule for wire, rule in blocks.items() if not _allowed(wire, allows)}
            table.update(allows)
        setter(self, "_get", table.get)
        setter(self, "_windows", _windows({len(label_offsets(wire)) for wire in table}))
        setter(self, "_example", next((wire for wire, rule in table.items()
                                       if rule.list.action != ALLOW), None))

    def __setattr__(self, name: str, value: object) -> None:
        """Refuse changes: readers on other tasks rely on a set never changing under them."""
        raise AttributeError("RuleSet is immutable; build a new one")

    def lookup(self, name: bytes, offsets: Sequence[int]) -> tuple[Rule, int] | None:
        """Return (rule, offset) for the most specific blocking match, or None.

        name: lowercase wire form of the query name; offsets: start of each label, most
        specific first, e.g. (0, 4, 12) for www.example.org. None also when an allow rule
        covers the name. One dict lookup per label; the allow check runs only on a hit.
        """
        get = self._get
        for index in self._windows[len(offsets)]:
            offset = offsets[index]
            rule = get(name[offset:])
            if rule is not None:
                return None if rule.list.action == ALLOW else (rule, offset)
        return None

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


def _windows(depths: set[int]) -> tuple[range, ...]:
    """For each label count a name can have, the offsets indexes whose suffix could be a rule.

    A suffix starting at index i of n offsets has n - i labels; only depths that some rule
    has can hit. With no rules every range is empty.
    """
    deepest, shallowest = max(depths, default=0), min(depths, default=1)
    counts = range(_MAX_LABELS + 1)
    return tuple(range(max(0, count - deepest), count - shallowest + 1) for count in counts)


def _allowed(wire: bytes, allows: dict[bytes, Rule]) -> bool:
    """True if the name or one of its parents is allowed."""
    return any(wire[offset:] in allows for offset in label_offsets(wire))
