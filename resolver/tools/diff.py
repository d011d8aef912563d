"""`resolver rules diff OLD... --to NEW...`: what exactly a rule change changes.

Both sides are loaded as the server loads them, and compared list by list (by name): lists
added and removed, each list's settings (action, mode, scope, rollout, window, TTL,
sinkhole addresses), entries added, removed and renamed, and (domain, entry) pairs added and
removed. Files, comments and order do not count, as they do not for the rule-set version.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field

from resolver.message.names import from_wire
from resolver.rules.model import Network, RuleList
from resolver.rules.scope import utc
from resolver.tools.common import CHANGES, OK, Loaded, plural, write_json

Pair = tuple[str, str]  # (domain, entry id)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "diff", help="what changes between two rule sets",
        description="Compare rule sets: a summary line (counts) first, then per list the "
        "domains and entries added and removed and the changed settings. Exit 0 when "
        "nothing changes, 1 when something does.")
    parser.add_argument("old", nargs="+", metavar="OLD", help="the rules now (files, dirs)")
    parser.add_argument("--to", nargs="+", action="extend", required=True, metavar="NEW",
                        help="the rules to compare with")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.set_defaults(run=run)
    return parser


@dataclass(slots=True)
class ListView:
    """One list as the files say it: settings, entries (id -> name) and (domain, entry)."""

    settings: RuleList
    entries: dict[str, str] = field(default_factory=dict)
    pairs: set[Pair] = field(default_factory=set)


def views(loaded: Loaded) -> dict[str, ListView]:
    by_name = {rule_list.name: ListView(rule_list) for rule_list in loaded.lists}
    for wire, rule in loaded.domains:
        view = by_name[rule.list.name]
        view.pairs.add((from_wire(wire), rule.entry_id))
        if rule.entry_id:
            view.entries[rule.entry_id] = rule.entry_name
    return by_name


@dataclass(slots=True)
class ListChange:
    name: str
    change: str  # added, removed, changed
    settings: dict[str, tuple[str, str]] = field(default_factory=dict)
    entries_added: list[Pair] = field(default_factory=list)  # (id, name)
    entries_removed: list[Pair] = field(default_factory=list)
    entries_renamed: list[tuple[str, str, str]] = field(default_factory=list)
    added: list[Pair] = field(default_factory=list)  # (domain, entry id)
    removed: list[Pair] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name, "change": self.change,
            "settings": {key: {"from": old, "to": new}
                         for key, (old, new) in self.settings.items()},
            "entries_added": [{"id": i, "name": n} for i, n in self.entries_added],
            "entries_removed": [{"id": i, "name": n} for i, n in self.entries_removed],
            "entries_renamed": [{"id": i, "from": a, "to": b}
                                for i, a, b in self.entries_renamed],
            "domains_added": [{"domain": d, "entry": e} for d, e in self.added],
            "domains_removed": [{"domain": d, "entry": e} for d, e in self.removed]}


def compare(old: Loaded, new: Loaded) -> list[ListChange]:
    """Every list that differs, in name order."""
    before, after = views(old), views(new)
    changes = []
    for name in sorted(before.keys() | after.keys()):
        was, now = before.get(name), after.get(name)
        change = ListChange(name, "changed" if was and now else "added" if now else "removed")
        empty = ListView(RuleList(name))
        was, now = was or empty, now or empty
        if change.change == "changed":
            change.settings = {key: (a, b) for key, a, b in _settings(was.settings, now.settings)
                               if a != b}
        change.entries_added = sorted((i, n) for i, n in now.entries.items()
                                      if i not in was.entries)
        change.entries_removed = sorted((i, n) for i, n in was.entries.items()
                                        if i not in now.entries)
        change.entries_renamed = sorted((i, n, now.entries[i]) for i, n in was.entries.items()
                                        if i in now.entries and now.entries[i] != n)
        change.added = sorted(now.pairs - was.pairs)
        change.removed = sorted(was.pairs - now.pairs)
        if change.change != "changed" or any((change.settings, change.entries_added,
                                              change.entries_removed, change.entries_renamed,
                                              change.added, change.removed)):
            changes.append(change)
    return changes


def _settings(a: RuleList, b: RuleList) -> Iterable[tuple[str, str, str]]:
    """(key, old text, new text) for every setting a list has besides its domains."""
    for key, show in (("action", str), ("mode", str), ("clients", _nets),
                      ("except_clients", _nets), ("rollout", lambda v: f"{v:g}%"),
                      ("starts", _time), ("expires", _time), ("ttl", _ttl),
                      ("sinkhole_v4", ", ".join), ("sinkhole_v6", ", ".join)):
        yield key, show(getattr(a, key)), show(getattr(b, key))


def _nets(networks: tuple[Network, ...]) -> str:
    return ", ".join(sorted(str(n) for n in networks)) or "(every client)"


def _time(epoch: float | None) -> str:
    return "(none)" if epoch is None else utc(epoch)


def _ttl(ttl: int | None) -> str:
    return "(blocking.ttl)" if ttl is None else str(ttl)


def summary(old: Loaded, new: Loaded, changes: list[ListChange]) -> dict[str, object]:
    kinds = [change.change for change in changes]
    return {
        "from": old.rules.version, "to": new.rules.version, "changed": bool(changes),
        "lists_added": kinds.count("added"), "lists_removed": kinds.count("removed"),
        "lists_changed": kinds.count("changed"),
        "domains_added": sum(len(c.added) for c in changes),
        "domains_removed": sum(len(c.removed) for c in changes),
        "entries_added": sum(len(c.entries_added) for c in changes),
        "entries_removed": sum(len(c.entries_removed) for c in changes)}


def summary_line(counts: dict[str, object]) -> str:
    head = f"rules {counts['from']} -> {counts['to']}: "
    if not counts["changed"]:
        return head + "no change"
    number = {key: int(str(value)) for key, value in counts.items()
              if isinstance(value, int) and not isinstance(value, bool)}
    return head + (
        f"{plural(number['lists_added'], 'list')} added, {number['lists_removed']} removed, "
        f"{number['lists_changed']} changed; "
        f"{plural(number['domains_added'], 'domain')} added, {number['domains_removed']} "
        f"removed; {plural(number['entries_added'], 'entry', 'entries')} added, "
        f"{number['entries_removed']} removed")


def _entry(entry_id: str) -> str:
    return f" (entry {entry_id})" if entry_id else ""


def print_change(change: ListChange, new: Loaded) -> None:
    if change.change == "added":
        rule_list = next(lst for lst in new.lists if lst.name == change.name)
        print(f"list {change.name} added: {rule_list.action}, {rule_list.mode}")
    else:
        print(f"list {change.name} {change.change}:")
    for key, (a, b) in change.settings.items():
        print(f"  {key}: {a} -> {b}")
    for entry_id, name in change.entries_added:
        print(f"  + entry {entry_id}" + (f" ({name})" if name else ""))
    for entry_id, name in change.entries_removed:
        print(f"  - entry {entry_id}" + (f" ({name})" if name else ""))
    for entry_id, a, b in change.entries_renamed:
        print(f"  ~ entry {entry_id}: name {a!r} -> {b!r}")
    for domain, entry_id in change.added:
        print(f"  + {domain}{_entry(entry_id)}")
    for domain, entry_id in change.removed:
        print(f"  - {domain}{_entry(entry_id)}")


def run(args: argparse.Namespace) -> int:
    old, new = Loaded.read(args.old), Loaded.read(args.to)
    changes = compare(old, new)
    counts = summary(old, new, changes)
    if args.json:
        write_json({"summary": counts, "lists": [change.as_json() for change in changes]})
    else:
        print(summary_line(counts))
        for change in changes:
            print_change(change, new)
    return CHANGES if changes else OK


