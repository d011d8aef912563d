"""`resolver rules export --format rpz|hosts|dnsmasq|unbound`: the rules for other servers.

Only what applies to everyone, always, and answers is exported: lists that are dry-run,
client-scoped, rolled out to a share or windowed are left out, since none of these formats
can say so; so is an action a format cannot answer with. Which rule answers a domain is
asked of the compiled rule set (`RuleSet.match`, what the server's lookup does), so the
export keeps the server's precedence: a block covered by an allow entry is not written
(an RPZ or an unbound zone would otherwise let the more specific block win), and a domain
two lists name is written once, for the list that answers. Every file starts with a header
comment saying what its format cannot express and what was left out, with counts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from resolver.message.names import from_wire, to_wire
from resolver.ops.config import BlockingConfig
from resolver.rules.model import ALLOW, DEFAULT_SINKHOLE_V4, DEFAULT_SINKHOLE_V6, RuleList
from resolver.stages.blocking import SOA_TIMERS
from resolver.tools.common import (
    OK,
    Loaded,
    ToolError,
    config_or_default,
    plural,
    rule_paths,
    scope_parts,
)

FORMATS = ("rpz", "hosts", "dnsmasq", "unbound")
DEFAULT_ORIGIN = "rpz.local."
MAX_WIRE = 255  # octets in a wire-form name (RFC 1035)
# The actions each format can answer with ("allow" = an exception to a broader block)
ACTIONS = {
    "rpz": ("nxdomain", "nodata", "sinkhole", ALLOW),
    "hosts": ("nxdomain", "nodata", "refused", "sinkhole"),  # all written as addresses
    "dnsmasq": ("nxdomain", "sinkhole", ALLOW),
    "unbound": ("nxdomain", "nodata", "sinkhole", "refused", ALLOW),
}
CANNOT = {
    "rpz": "client scope (clients, except_clients), rollout, dry-run lists, time windows "
           "(starts, expires), REFUSED answers, the EDE text of blocked answers",
    "hosts": "blocking the names below a domain (a hosts file matches exact names only), "
             "NXDOMAIN, NODATA and REFUSED answers (every block is an address: 0.0.0.0 and "
             "::, or the list's sinkhole addresses), allow entries, client scope, rollout, "
             "dry-run lists, time windows, TTLs",
    "dnsmasq": "NODATA and REFUSED answers, client scope, rollout, dry-run lists, time "
               "windows, TTLs, the EDE text of blocked answers",
    "unbound": "client scope, rollout, dry-run lists, time windows, the EDE text of blocked "
               "answers; unbound chooses the TTLs of its always_* answers",
}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "export", help="write the enforcing lists as RPZ, hosts, dnsmasq or unbound config",
        description="Export the lists that apply to everyone, always, and enforce. A header "
        "comment says what the format cannot express and what was left out.")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--rules", nargs="+", action="extend", default=[], metavar="PATH",
                        help="rule files or directories (default: the config's, else the "
                        "shipped rules)")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="config file: blocking.ttl and the SOA names, and the rules")
    parser.add_argument("--origin", default=DEFAULT_ORIGIN, metavar="ZONE",
                        help=f"RPZ zone name (default {DEFAULT_ORIGIN})")
    parser.add_argument("--serial", type=int, metavar="N",
                        help="RPZ SOA serial (default: from the rule-set version)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    parser.set_defaults(run=run)
    return parser


@dataclass(slots=True)
class Plan:
    """What a format gets: block domains with their list, allowed domains, and what was left
    out (one line each, for the header)."""

    blocks: list[tuple[str, RuleList]] = field(default_factory=list)
    allows: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def plan(loaded: Loaded, fmt: str, fits: int = MAX_WIRE) -> Plan:
    """Sort the rules into what the format can hold and what it cannot. fits: the longest
    wire name the format takes (an RPZ owner also carries its origin)."""
    result = Plan()
    kept: dict[str, RuleList] = {}
    for rule_list in loaded.lists:
        count = loaded.rules.counts.get(rule_list.name, 0)
        why = _left_out(rule_list, fmt)
        if why is not None:
            result.left_out.append(f"list {rule_list.name} ({plural(count, 'domain')}): {why}")
        else:
            kept[rule_list.name] = rule_list
    blocks: dict[str, RuleList] = {}
    allows: set[str] = set()
    covered = too_long = 0
    for wire, rule in loaded.domains:
        exported = kept.get(rule.list.name)
        if exported is None:
            continue
        if len(wire) > fits:
            too_long += 1
            continue
        domain = from_wire(wire)
        if exported.action == ALLOW:
            allows.add(domain)
            continue
        found = loaded.rules.match(domain)  # the server's answer for the domain itself
        if found is None:
            covered += 1
        elif found[0].list.name == exported.name:
            blocks[domain] = exported
    if covered:
        result.left_out.append(f"{plural(covered, 'block domain')} at or below an allowed "
                               "domain (allow wins; nothing to export)")
    if too_long:
        result.left_out.append(f"{plural(too_long, 'domain')} too long for the zone's origin")
    result.blocks = sorted(blocks.items(), key=lambda item: _order(item[0]))
    result.allows = sorted(allows, key=_order)
    return result


def _left_out(rule_list: RuleList, fmt: str) -> str | None:
    if rule_list.mode != "enforce":
        return "dry-run"
    if rule_list.staged:
        return f"staged ({', '.join(scope_parts(rule_list))})"
    if rule_list.action not in ACTIONS[fmt]:
        return f"action {rule_list.action} has no {fmt} equivalent"
    return None


def _order(domain: str) -> tuple[str, ...]:
    """Zone order, roughly: by labels from the right, so a domain's subtree stays together."""
    return tuple(reversed(domain.split(".")))


def header(loaded: Loaded, fmt: str, result: Plan, mark: str) -> Iterator[str]:
    yield (f"{mark} resolver rules export --format {fmt}: rules {loaded.rules.version}, "
           f"{plural(len(result.blocks), 'blocked domain')}, "
           f"{plural(len(result.allows), 'allowed domain')}")
    yield f"{mark} {fmt} cannot express: {CANNOT[fmt]}."
    for line in result.left_out or ["nothing"]:
        yield f"{mark} left out: {line}"


def _ttl(rule_list: RuleList, blocking: BlockingConfig) -> int:
    return rule_list.ttl if rule_list.ttl is not None else blocking.ttl


def rpz(loaded: Loaded, blocking: BlockingConfig, origin: str, serial: int | None
        ) -> Iterator[str]:
    """An RPZ zone (BIND's response policy zones): QNAME triggers, `name` and `*.name`."""
    origin = origin if origin.endswith(".") else origin + "."
    fits = MAX_WIRE - (len(to_wire(origin.rstrip("."))) - 1) - 2  # owner, origin, "*."
    result = plan(loaded, "rpz", fits)
    yield from header(loaded, "rpz", result, ";")
    number = serial if serial is not None else int(loaded.rules.version[:8], 16)
    mname, rname = blocking.soa_mname, blocking.soa_rname
    yield f"$ORIGIN {origin}"
    yield f"$TTL {blocking.ttl}"
    refresh, retry, expire = SOA_TIMERS[1:]
    yield f"@ IN SOA {mname}. {rname}. {number} {refresh} {retry} {expire} {blocking.ttl}"
    yield f"@ IN NS {mname}."
    for domain, rule_list in result.blocks:
        ttl = _ttl(rule_list, blocking)
        for owner in (domain, f"*.{domain}"):
            for record in _rpz_records(rule_list):
                yield f"{owner} {ttl} IN {record}"
    for domain in result.allows:
        for owner in (domain, f"*.{domain}"):
            yield f"{owner} {blocking.ttl} IN CNAME rpz-passthru."


def _rpz_records(rule_list: RuleList) -> list[str]:
    if rule_list.action == "nodata":
        return ["CNAME *."]
    if rule_list.action == "sinkhole":
        return ([f"A {a}" for a in rule_list.sinkhole_v4]
                + [f"AAAA {a}" for a in rule_list.sinkhole_v6])
    return ["CNAME ."]


def hosts(loaded: Loaded, blocking: BlockingConfig) -> Iterator[str]:
    result = plan(loaded, "hosts")
    yield from header(loaded, "hosts", result, "#")
    for domain, rule_list in result.blocks:
        sinkhole = rule_list.action == "sinkhole"
        v4 = rule_list.sinkhole_v4 if sinkhole else DEFAULT_SINKHOLE_V4
        v6 = rule_list.sinkhole_v6 if sinkhole else DEFAULT_SINKHOLE_V6
        for address in (*v4, *v6):
            yield f"{address} {domain}"


def dnsmasq(loaded: Loaded, blocking: BlockingConfig) -> Iterator[str]:
    """address=/name/ answers NXDOMAIN for the name and below; address=/name/IP a sinkhole;
    server=/name/# sends a name below a blocked domain to the usual upstreams."""
    result = plan(loaded, "dnsmasq")
    yield from header(loaded, "dnsmasq", result, "#")
    for domain, rule_list in result.blocks:
        if rule_list.action == "sinkhole":
            for address in (*rule_list.sinkhole_v4, *rule_list.sinkhole_v6):
                yield f"address=/{domain}/{address}"
        else:
            yield f"address=/{domain}/"
    for domain in result.allows:
        yield f"server=/{domain}/#"


UNBOUND_TYPES = {"nxdomain": "always_nxdomain", "nodata": "always_nodata",
                 "refused": "always_refuse", ALLOW: "always_transparent"}


def unbound(loaded: Loaded, blocking: BlockingConfig) -> Iterator[str]:
    """local-zone per domain (a zone covers the names below it; the most specific wins).
    A sinkhole at the default addresses is always_null; other addresses are a redirect zone
    with local-data."""
    result = plan(loaded, "unbound")
    yield from header(loaded, "unbound", result, "#")
    yield "server:"
    for domain, rule_list in result.blocks:
        if rule_list.action != "sinkhole":
            yield f'    local-zone: "{domain}." {UNBOUND_TYPES[rule_list.action]}'
        elif (rule_list.sinkhole_v4, rule_list.sinkhole_v6) == (DEFAULT_SINKHOLE_V4,
                                                                DEFAULT_SINKHOLE_V6):
            yield f'    local-zone: "{domain}." always_null'
        else:
            yield f'    local-zone: "{domain}." redirect'
            ttl = _ttl(rule_list, blocking)
            for rtype, addresses in (("A", rule_list.sinkhole_v4),
                                     ("AAAA", rule_list.sinkhole_v6)):
                for address in addresses:
                    yield f'    local-data: "{domain}. {ttl} IN {rtype} {address}"'
    for domain in result.allows:
        yield f'    local-zone: "{domain}." {UNBOUND_TYPES[ALLOW]}'


def run(args: argparse.Namespace) -> int:
    config = config_or_default(args.config)
    loaded = Loaded.read(rule_paths(args.rules, config))
    blocking = config.blocking
    if args.format == "rpz":
        lines = rpz(loaded, blocking, args.origin, args.serial)
    else:
        lines = {"hosts": hosts, "dnsmasq": dnsmasq, "unbound": unbound}[args.format](
            loaded, blocking)
    text = "".join(line + "\n" for line in lines)
    if args.output is None:
        sys.stdout.write(text)
        return OK
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as error:
        raise ToolError([f"{args.output}: cannot write: {error.strerror}"]) from None
    return OK
