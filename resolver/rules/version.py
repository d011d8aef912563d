"""The version of a rule set: a short digest of what it says, not of how the files say it.

Operators compare versions across workers and across a fleet (the `resolver_rules_info`
metric, the startup and reload lines, the EDE text of blocked answers), so two servers
loaded with the same rules must agree, whatever the order of the files, their comments or
whitespace. The digest covers each list's settings and its sorted (domain, entry) pairs,
lists taken in name order.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator

from resolver.rules.model import ENFORCE, EVERYONE, Network, Rule, RuleList
from resolver.rules.table import Domains, split

LENGTH = 12  # hex digits shown: 48 bits, ample to tell rule sets apart


def version_of(lists: Iterable[RuleList], domains: Iterable[tuple[bytes, Rule]]) -> str:
    """The version of the rule set these lists and (wire name, rule) pairs compile into."""
    by_list: dict[str, list[bytes]] = {}
    for wire, rule in domains:
        by_list.setdefault(rule.list.name, []).append(
            b"%s\x00%s\x00%s" % (wire, rule.entry_id.encode(), rule.entry_name.encode()))
    digest = hashlib.sha256()
    for rule_list in sorted(lists, key=lambda item: item.name):
        digest.update(settings(rule_list).encode() + b"\x01")
        for line in sorted(by_list.get(rule_list.name, ())):
            digest.update(line + b"\x02")
    return digest.hexdigest()[:LENGTH]


def version_of_domains(lists: Iterable[RuleList], domains: Domains) -> str:
    """version_of for names kept flat (rules/table.py), the same digest without a tuple or
    a formatted line per name: a list whose names all belong to one plain rule (no entry
    id or name: every list read from a domain file) has lines `wire NUL NUL`, which sort as
    their names do (a name that is a prefix of another is followed by NUL, the least
    octet), so its names are sorted bare and fed to the digest in one join."""
    by_list: dict[str, list[Rule]] = {}
    for rule in domains.rules():
        by_list.setdefault(rule.list.name, []).append(rule)
    digest = hashlib.sha256()
    for rule_list in sorted(lists, key=lambda item: item.name):
        digest.update(settings(rule_list).encode() + b"\x01")
        rules = by_list.get(rule_list.name, [])
        if len(rules) == 1 and not rules[0].entry_id and not rules[0].entry_name:
            end = b"\x00\x00\x00\x02"  # the root octet, two empty fields, the separator
            for part in _sorted_parts(domains.names(rules[0]), len(domains.hashes(rules[0]))):
                digest.update(end.join(part) + end)
            continue
        lines = [b"%s\x00%s\x00%s" % (wire, rule.entry_id.encode(), rule.entry_name.encode())
                 for rule in rules for wire in split(domains.names(rule))]
        for line in sorted(lines):
            digest.update(line + b"\x02")
    return digest.hexdigest()[:LENGTH]


_PART = 1 << 16  # names sorted at once: bounds the Python objects alive while sorting


def _sorted_parts(names: bytearray, count: int) -> Iterator[list[bytes]]:
    """A run of wire names (rules/table.py) as sorted lists of bare names (no root octet),
    each list after the one before in order: a sample sort, so that a million names are
    never a million objects at once (about 60 MB more at the peak of a reload)."""
    if count <= _PART:
        bare = bytes(names).split(b"\x00")[:-1]
        bare.sort()
        if bare:
            yield bare
        return
    step = max(1, count // (64 * (count // _PART + 1)))
    sample = sorted(wire[:-1] for index, wire in enumerate(split(names)) if not index % step)
    splitters = sample[::64][1:]
    parts = [bytearray() for _ in range(len(splitters) + 1)]
    for wire in split(names):
        parts[bisect.bisect_right(splitters, wire[:-1])] += wire
    for part in parts:
        bare = bytes(part).split(b"\x00")[:-1]
        part.clear()
        bare.sort()
        if bare:
            yield bare


def settings(rule_list: RuleList) -> str:
    """What a list says besides its domains, in one canonical line (not where it came from:
    moving a list to another file changes nothing it does).

    The staging settings are appended only when they differ from the defaults, each under its
    own tag, so a list that applies to everyone, always, keeps the version it had before lists
    could be staged. Networks are sorted and canonical, times are epoch seconds (the same
    instant written with another UTC offset is the same setting), a rollout is a float (50,
    "50%" and 50.0 are one setting).
    """
    line = "|".join((rule_list.name, rule_list.action, ",".join(rule_list.sinkhole_v4),
                     ",".join(rule_list.sinkhole_v6), str(rule_list.ttl)))
    staging = [
        ("mode", rule_list.mode if rule_list.mode != ENFORCE else None),
        ("clients", _networks(rule_list.clients)),
        ("except_clients", _networks(rule_list.except_clients)),
        ("rollout", repr(rule_list.rollout) if rule_list.rollout != EVERYONE else None),
        ("starts", None if rule_list.starts is None else repr(float(rule_list.starts))),
        ("expires", None if rule_list.expires is None else repr(float(rule_list.expires))),
    ]
    return line + "".join(f"|{tag}={value}" for tag, value in staging if value is not None)


def _networks(networks: tuple[Network, ...]) -> str | None:
    """Sorted canonical text of a scope, None for none (IPv4 before IPv6)."""
    if not networks:
        return None
    return ",".join(str(network) for network in sorted(
        networks, key=lambda net: (net.version, net.network_address.packed, net.prefixlen)))
