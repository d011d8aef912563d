"""Why a rule does or does not take part in one query: the reasons `resolver rules explain`
gives (resolver/tools/explain.py).

The verdict itself is always `RuleSet.decide`'s, the server's own; this module only says,
for each rule whose domain covers the name, whether its list applies to this client at this
time and, when it does not, which condition failed. It checks the conditions in the order
`Staging.applies` does, with the same primitives (the window, `Scope`, the rollout bucket),
so "applies" here is exactly `Staging.applies` (tests/test_tools_explain.py compares the two
on a table of lists and clients). Pure: the client and the time are arguments.
"""

from __future__ import annotations

from collections.abc import Iterable

from resolver.message.names import from_wire, label_offsets, normalize, to_wire
from resolver.rules.model import EVERYONE, Network, Rule, RuleList
from resolver.rules.scope import Scope, bucket, client_address, rollout_key, threshold, utc


def not_applying(rule_list: RuleList, host: str, now: float) -> str | None:
    """Why the list does not apply to the client at host at `now` (epoch seconds), or None
    when it applies. A client whose address cannot be read is outside every client list and
    every rollout below 100%, as in Staging.applies."""
    address = client_address(host)
    if rule_list.starts is not None and now < rule_list.starts:
        return f"outside its time window: it starts at {utc(rule_list.starts)}"
    if rule_list.expires is not None and now >= rule_list.expires:
        return f"outside its time window: it expired at {utc(rule_list.expires)}"
    clients, excepted = rule_list.clients, rule_list.except_clients
    if clients and (address is None or address not in Scope(clients)):
        return f"client {host} is not in its clients ({_networks(clients)})"
    if excepted and address is not None and address in Scope(excepted):
        return f"client {host} is in its except_clients ({_networks(excepted)})"
    rollout = rule_list.rollout
    if rollout < EVERYONE and (address is None or bucket(rollout_key(rule_list.name), address)
                               >= threshold(rollout)):
        return f"client {host} is outside its rollout slice ({rollout:g}% of clients)"
    return None


def covering(domains: Iterable[tuple[bytes, Rule]], name: str) -> list[tuple[Rule, str]]:
    """Every rule whose domain is `name` or a domain above it, with that domain: most
    specific first, then in precedence order (list name, entry id), one rule per list and
    domain (the matcher keeps a list's first entry by id, too). A scan of all pairs: for a
    tool asking about one name, not for the query path. Raises ValueError for a bad name."""
    wire = to_wire(normalize(name))
    depth = {wire[offset:]: index for index, offset in enumerate(label_offsets(wire))}
    found: dict[tuple[bytes, str], Rule] = {}
    for domain, rule in domains:
        if domain in depth:
            key = (domain, rule.list.name)
            kept = found.get(key)
            if kept is None or (rule.entry_id, rule.entry_name) < (kept.entry_id,
                                                                    kept.entry_name):
                found[key] = rule
    ordered = sorted(found.items(), key=lambda item: (depth[item[0][0]], item[0][1],
                                                       item[1].entry_id))
    return [(rule, from_wire(domain)) for (domain, _), rule in ordered]


def _networks(networks: tuple[Network, ...]) -> str:
    return ", ".join(str(network) for network in networks)
