"""The version of a rule set: a short digest of what it says, not of how the files say it.

Operators compare versions across workers and across a fleet (the `resolver_rules_info`
metric, the startup and reload lines, the EDE text of blocked answers), so two servers
loaded with the same rules must agree, whatever the order of the files, their comments or
whitespace. The digest covers each list's settings and its sorted (domain, entry) pairs,
lists taken in name order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from resolver.rules.model import ENFORCE, EVERYONE, Network, Rule, RuleList

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
