"""Parsers for the formats block lists are published in: plain domains, hosts, AdBlock, RPZ.

Each parser is a generator over lines (a file object, a list, a download being read), so a
feed of millions of lines is never held as a list of objects. For every line that says
something it yields one item per name:
- `(line number, normalized name, allow)` for a usable name: a block (allow False) or an
  exception (allow True: AdBlock's `@@`, RPZ's `rpz-passthru.`);
- `(line number, reason)` for anything that cannot be used, so that nothing is dropped
  silently: a regular expression, a cosmetic filter, an IP trigger, a bad name...
Comments, blank lines and a format's own structure (a zone's SOA and NS records, an AdBlock
header) yield nothing.

Names are normalized with resolver.message.names.normalize, as rule files are (lowercase,
no trailing dot, IDN to punycode), and each one blocks the name and every name below it, as
every rule does. Why some lines are refused rather than approximated: a DNS resolver sees
only a name, so a rule narrowed to some pages, request types or sites (an AdBlock path or
`$third-party`) would block far more than its author meant.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

from resolver.message.names import normalize

Usable = tuple[int, str, bool]  # (line number, normalized name, allow)
Unusable = tuple[int, str]  # (line number, reason)
Item = Usable | Unusable

DOMAINS, HOSTS, ADBLOCK, RPZ = "domains", "hosts", "adblock", "rpz"
FORMATS: Final = (DOMAINS, HOSTS, ADBLOCK, RPZ)

_BOM = "\ufeff"
_WILDCARD = "*."


def parse(format_name: str, lines: Iterable[str]) -> Iterator[Item]:
    """The items of lines in format_name (one of FORMATS; ValueError for another)."""
    parser = _PARSERS.get(format_name)
    if parser is None:
        raise ValueError(f"{format_name!r} is not one of {', '.join(FORMATS)}")
    return parser(lines)


def is_usable(item: Item) -> bool:
    """Whether an item is a name (rather than a reason): the one test callers need."""
    return len(item) == 3


def _name(number: int, text: str, allow: bool = False) -> Item:
    """A usable item, or the reason text is no valid name (normalize says why)."""
    try:
        return number, normalize(text), allow
    except ValueError as error:
        return number, str(error)


# ---------------------------------------------------------------------------------------------
# domains: one name a line, `#` and `!` comments (a line's end too, after whitespace or `#`).


def parse_domains(lines: Iterable[str]) -> Iterator[Item]:
    """One name per line. A leading `*.` is dropped (an entry covers every name below it
    anyway, and the name itself is blocked too, as most such lists mean)."""
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text[0] in "#!":
            if number == 1 and text.startswith(_BOM):
                text = text[1:].strip()
                if text and text[0] not in "#!":
                    yield from _domain_line(number, text)
            continue
        if "#" in text or " " in text or "\t" in text:
            yield from _domain_line(number, text)
            continue
        try:  # the fast path: a bare name
            yield number, normalize(text), False
        except ValueError:
            yield from _domain_line(number, text)


def _domain_line(number: int, text: str) -> Iterator[Item]:
    """The slow path of a domains line: a BOM, a comment after the name, or a bad name."""
    text = text.lstrip(_BOM).split("#", 1)[0].strip()
    if not text:
        return
    if text.startswith(_WILDCARD):
        text = text[2:]
    if len(text.split()) > 1:
        yield number, f"{text!r}: expected one name per line (is this a hosts file?)"
        return
    yield _name(number, text)


# ---------------------------------------------------------------------------------------------
# hosts: `0.0.0.0 name [name...]`, the addresses that mean "nowhere"; the local names that
# every hosts file lists for itself are skipped with a reason.

_BLOCKING_ADDRESSES = frozenset({"0.0.0.0", "127.0.0.1", "::", "::1", "0:0:0:0:0:0:0:0",
                                 "0:0:0:0:0:0:0:1"})
_LOCAL_NAMES = frozenset({
    "localhost", "localhost.localdomain", "local", "broadcasthost", "localhost4",
    "localhost4.localdomain4", "localhost6", "localhost6.localdomain6", "ip6-localhost",
    "ip6-loopback", "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters",
    "ip6-allhosts", "0.0.0.0",
})


def parse_hosts(lines: Iterable[str]) -> Iterator[Item]:
    """`address name...` lines with a blocking address; other addresses map names to real
    hosts (a redirect, not a block) and are reported."""
    for number, line in enumerate(lines, 1):
        if "#" in line:
            line = line.split("#", 1)[0]
        parts = line.split()
        if not parts:
            continue
        address = parts[0].lstrip(_BOM) if number == 1 else parts[0]
        if address not in _BLOCKING_ADDRESSES:
            yield number, _not_blocking(address, parts)
            continue
        if len(parts) == 1:
            yield number, f"address {address} without a name"
            continue
        for text in parts[1:]:
            if text in _LOCAL_NAMES:
                yield number, f"{text!r} is a local host name, not one to block"
                continue
            try:
                yield number, normalize(text), False
            except ValueError as error:
                yield number, str(error)


def _not_blocking(address: str, parts: list[str]) -> str:
    if len(parts) == 1:
        return f"{address!r}: expected an address and names (is this a domains list?)"
    return (f"address {address!r} is not one that blocks (0.0.0.0, 127.0.0.1, :: or ::1): "
            "the line maps names to a host, which a block list cannot say")


# ---------------------------------------------------------------------------------------------
# adblock: `||name^` blocks the name and below, `@@||name^` excepts it. Only options that keep
# the rule about the whole name are accepted.

# $important only ranks the rule among others; $all and $document name every request to the
# host. Everything else narrows the rule to some requests, sites or clients (or, like
# $badfilter and $dnsrewrite, means something other than a block).
_WHOLE_NAME_OPTIONS = frozenset({"important", "all", "document", "doc"})
_COSMETIC = ("##", "#@#", "#?#", "#@?#", "#$#", "#@$#", "#%#", "#@%#")


def parse_adblock(lines: Iterable[str]) -> Iterator[Item]:
    """AdBlock-style rules as AdGuard Home and Pi-hole read them for DNS. A bare name (the
    domains-only lines many such lists mix in) is taken as `||name^`."""
    for number, line in enumerate(lines, 1):
        text = line.strip().lstrip(_BOM) if number == 1 else line.strip()
        if (not text or text[0] == "!" or (text[0] == "[" and text[-1] == "]")
                or _adblock_comment(text)):
            continue  # a comment, or the [Adblock Plus 2.0] header
        yield _adblock_rule(number, text)


def _adblock_rule(number: int, text: str) -> Item:
    if any(marker in text for marker in _COSMETIC):
        return number, "cosmetic filter (hides page elements): not a DNS rule"
    allow = text.startswith("@@")
    body = text[2:] if allow else text
    if len(body) > 1 and body[0] == "/" and (body.endswith("/") or "/$" in body):
        return number, "regular expression rule: only whole names can be used"
    body, _, options = body.partition("$")
    refused = [option for option in options.split(",") if option
               and option.strip().lower() not in _WHOLE_NAME_OPTIONS]
    if refused:
        return number, (f"option ${refused[0]} narrows the rule to some requests, sites or "
                        "clients: a DNS answer cannot")
    if body.startswith("||"):
        return _adblock_host(number, body[2:], allow)
    if body.startswith("|") or "/" in body or ":" in body:
        return number, "URL or path rule: DNS sees only the name"
    if "*" in body or "^" in body:
        return number, "wildcard or partial-name rule: only whole names can be used"
    if not body:
        return number, "empty rule"
    return _name(number, body, allow)


def _adblock_host(number: int, body: str, allow: bool) -> Item:
    """The part after `||`: a name, then `^` (or `^|`), and nothing else."""
    name, caret, rest = body.partition("^")
    if "/" in name or "/" in rest or ":" in name:
        return number, "URL or path rule: DNS sees only the name"
    if "*" in name:
        return number, "wildcard rule: only whole names can be used"
    if not caret:
        return number, ("no ^ after the name: the rule would also match longer names that "
                        "start with it")
    if rest not in ("", "|"):
        return number, f"{rest!r} after ^: only whole names can be used"
    return _name(number, name, allow)


def _adblock_comment(text: str) -> bool:
    """AdGuard also takes `#` comments; `##` and friends are cosmetic filters instead."""
    return text[0] == "#" and not any(text.startswith(marker) for marker in _COSMETIC)


# ---------------------------------------------------------------------------------------------
# rpz: a zone file (RFC 1035 master format) whose owner names are triggers (ISC's RPZ draft):
# `name CNAME .` (NXDOMAIN), `*.name CNAME .`, `name CNAME *.` (NODATA), `rpz-drop.`: block;
# `rpz-passthru.`: allow. IP, NSIP, NSDNAME and client-IP triggers, and local data, are
# reported.

_CLASSES = frozenset({"IN", "CH", "HS", "CS"})
_STRUCTURE = frozenset({"SOA", "NS"})  # the zone's own records
_BLOCK_TARGETS = frozenset({".", "*.", "rpz-drop."})
_ALLOW_TARGETS = frozenset({"rpz-passthru."})
_TRIGGER_LABELS = {
    "rpz-ip": "IP (response address) trigger",
    "rpz-nsip": "NSIP (name server address) trigger",
    "rpz-nsdname": "NSDNAME (name server name) trigger",
    "rpz-client-ip": "client IP trigger",
}


def parse_rpz(lines: Iterable[str]) -> Iterator[Item]:
    """QNAME triggers of an RPZ zone. Names are relative to $ORIGIN, or else to the SOA's
    owner name (a zone dumped by a transfer has no $ORIGIN line). `name` and `*.name` with
    the same action, one after the other as zones write them, yield the name once."""
    zone = _Zone()
    for number, fields in _records(lines):
        item = zone.record(number, fields)
        if item is not None:
            yield item


def _records(lines: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each record: comments cut, parentheses joined. The
    owner field is '' for a line that starts with blank space (the previous owner's)."""
    pending: list[str] = []
    start = 0
    depth = 0
    for number, line in enumerate(lines, 1):
        if number == 1:
            line = line.lstrip(_BOM)
        text = line.split(";", 1)[0] if ";" in line else line
        if depth == 0:
            if not text.strip():
                continue
            start = number
            pending = [""] if text[0] in " \t" else []
        depth += text.count("(") - text.count(")")
        pending += text.replace("(", " ").replace(")", " ").split()
        if depth <= 0:
            depth = 0
            yield start, pending
    if depth > 0:
        yield start, [*pending, "("]  # unbalanced: reported by _Zone.record


class _Zone:
    """What a zone's records have said so far: the origin, the last owner, the last name."""

    def __init__(self) -> None:
        self.origin: str | None = None  # absolute, with its trailing dot; '.' is the root
        self.owner = ""
        self.last: tuple[str, bool] | None = None  # the last name yielded, and allow

    def record(self, number: int, fields: list[str]) -> Item | None:
        if fields[-1] == "(":
            return number, "unbalanced parenthesis: the record does not end"
        if fields[0].startswith("$"):
            return self._directive(number, fields)
        owner = fields[0] or self.owner
        self.owner = owner
        rest = fields[1:]
        while rest and (rest[0][0].isdigit() or rest[0].upper() in _CLASSES):
            rest = rest[1:]  # the TTL and class, in either order
        if not rest:
            return number, "no record type"
        kind, data = rest[0].upper(), rest[1:]
        if kind == "SOA" and self.origin is None and owner.endswith("."):
            self.origin = owner
        if kind in _STRUCTURE and owner in ("@", self.origin):
            return None
        trigger = self._relative(owner)
        if trigger is None:
            return number, f"owner {owner!r} is outside the zone {self.origin or '(unknown)'}"
        return self._policy(number, trigger, kind, data)

    def _directive(self, number: int, fields: list[str]) -> Item | None:
        keyword = fields[0].upper()
        if keyword == "$TTL":
            return None
        if keyword == "$ORIGIN" and len(fields) == 2:
            origin = fields[1]
            self.origin = origin if origin.endswith(".") else f"{origin}.{self.origin or ''}"
            return None
        return number, f"{fields[0]} is not supported here (only $ORIGIN and $TTL)"

    def _relative(self, owner: str) -> str | None:
        """The trigger name of an owner: relative to the origin; None when outside it."""
        if owner == "@":
            return ""
        if not owner.endswith("."):
            return owner
        if self.origin is None:
            return None
        if self.origin == ".":
            return owner[:-1]
        if owner == self.origin:
            return ""
        suffix = "." + self.origin
        return owner[: -len(suffix)] if owner.lower().endswith(suffix.lower()) else None

    def _policy(self, number: int, trigger: str, kind: str, data: list[str]) -> Item | None:
        labels = trigger.lower().rsplit(".", 1)
        what = _TRIGGER_LABELS.get(labels[-1])
        if what is not None:
            return number, f"{what}: only names (QNAME triggers) can be used"
        if kind != "CNAME":
            return number, (f"{kind} record: local data answers with records of its own; "
                            "only CNAME policies (. *. rpz-drop. rpz-passthru.) can be used")
        target = data[0].lower() if len(data) == 1 else ""
        if target in _ALLOW_TARGETS:
            allow = True
        elif target in _BLOCK_TARGETS:
            allow = False
        else:
            return number, (f"CNAME {' '.join(data)!r} rewrites the name; only . *. "
                            "rpz-drop. and rpz-passthru. can be used")
        if not trigger:
            return number, "a policy for the zone apex itself"
        if trigger.startswith(_WILDCARD):
            trigger = trigger[2:]
        try:
            name = normalize(trigger)
        except ValueError as error:
            return number, str(error)
        if (name, allow) == self.last:
            return None  # `*.name` after `name`: one rule covers both
        self.last = (name, allow)
        return number, name, allow


_PARSERS = {DOMAINS: parse_domains, HOSTS: parse_hosts, ADBLOCK: parse_adblock, RPZ: parse_rpz}
