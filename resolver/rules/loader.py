"""Rule files (YAML lists, or plain domain lists) loaded into one compiled RuleSet.

Loading is strict and all-or-nothing: every problem in every file is collected with its file,
line and key path, and one ConfigError is raised, so a broken edit never half-loads and the
operator sees everything to fix in one run. The compiled RuleSet is never mutated; a reload
builds a new one and the server swaps one reference.
"""

import datetime
import ipaddress
import logging
import math
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from resolver.message.constants import MAX_TTL
from resolver.message.names import normalize, to_wire
from resolver.ops.errors import ConfigError
from resolver.ops.yamlnodes import (
    INT,
    NULL,
    STR,
    YamlLoader,
    compose,
    dotted,
    kind_of,
    known_keys,
    line_of,
    problem_text,
)
from resolver.rules.formats import FORMATS, parse
from resolver.rules.matcher import RuleSet
from resolver.rules.model import (
    ACTIONS,
    ALLOW,
    DEFAULT_ACTION,
    DEFAULT_SINKHOLE_V4,
    DEFAULT_SINKHOLE_V6,
    DRY_RUN,
    ENFORCE,
    EVERYONE,
    MODES,
    Network,
    Rule,
    RuleList,
)
from resolver.rules.scope import utc
from resolver.rules.sources import DEFAULT_MAX_BYTES, DEFAULT_REFRESH, YAML, Feeds, Source, is_url
from resolver.rules.table import Domains

log = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
TEXT_SUFFIXES = (".txt", ".list")

# List names and entry ids end up in logs and metric labels, so keep them plain tokens.
_TOKEN = re.compile(r"[a-z0-9_.-]+")
_TOKEN_RULE = "use only a-z 0-9 _ . -"
# libyaml parses big lists several times faster; the pure-Python loader gives the same nodes
# and so the same messages (tests/test_rules.py loads its error table through both).
FAST_LOADER: YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TOP_KEYS = frozenset({"lists"})
_SOURCE_KEYS = frozenset({"source", "format", "refresh", "sha256", "max_bytes"})
_LIST_KEYS = frozenset({"name", "action", "ttl", "sinkhole", "description", "entries", "domains",
                        "mode", "clients", "except_clients", "rollout", "starts", "expires",
                        *_SOURCE_KEYS})
_SOURCE_BODY_KEYS = frozenset({"domains", "entries"})  # a `format: yaml` source's keys
SOURCE_FORMATS = (*FORMATS, YAML)
ALLOW_SUFFIX = "-allow"  # the allow list of an AdBlock or RPZ source's exceptions
NOTES_PER_SOURCE = 20  # unusable lines reported one by one; the rest are counted
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"([0-9]+) ?(B|KiB|MiB|GiB)")
_SIZES = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = frozenset({"id", "name", "domains"})
_FLOAT = "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"  # what YAML makes of an unquoted 2026-01-01T00:00Z
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?%")
# RFC 3339 section 5.6 (with its note's lowercase t and z, and a space for T)
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2}(?:\.\d+)?)([Zz]|[+-]\d{2}:\d{2})?")
_TIME_EXAMPLE = "2026-03-01T06:00:00Z"
_Texts = tuple[str, ...]
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def load_rules(paths: Sequence[str], *, yaml_loader: YamlLoader = FAST_LOADER,
               feeds: Feeds | None = None) -> RuleSet:
    """Load rule files and directories into one RuleSet, or raise ConfigError with all problems.

    A directory contributes its *.yaml, *.yml, *.txt and *.list files in sorted order (list
    names must be unique across them; which list answers a domain two lists name does not
    depend on the order: see matcher.RuleSet). A .yaml/.yml file holds lists (see _YamlFile); any
    other file is a plain list of domains named after the file. yaml_loader: the YAML loader
    class, libyaml's where PyYAML has it. feeds: the copies of URL sources (without it, a
    list with a URL source is empty). The notes (unusable lines of sources) are logged.
    """
    loaded = load_rule_set(paths, yaml_loader=yaml_loader, feeds=feeds)
    for note in loaded.notes:
        log.warning("%s", note)
    return loaded.rules


class FeedCopies(Protocol):
    """What a load asks of the URL sources' copies: sources.Feeds, or in a process that
    compiles for another, that one's Feeds over their pipe (rules/apart.py)."""

    def copies(self, source: Source) -> list[Path]: ...

    def reject(self, source: Source, why: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Loaded:
    """A load's rule set, the sources its lists name, and what was noted without failing it:
    the lines of sources that could not be used, a URL source with no copy yet."""

    rules: RuleSet
    sources: tuple[Source, ...]
    notes: tuple[str, ...]


def load_rule_set(paths: Sequence[str], *, yaml_loader: YamlLoader = FAST_LOADER,
                  feeds: FeedCopies | None = None) -> Loaded:
    """load_rules, with the sources and notes (for the reloads, which schedule the sources,
    and for tools, which show the notes)."""
    loader = _load(paths, yaml_loader, feeds)
    return Loaded(RuleSet(loader.lists, loader.domains), tuple(loader.sources),
                  tuple(loader.notes))


def read_rules(paths: Sequence[str], *, yaml_loader: YamlLoader = FAST_LOADER,
               feeds: Feeds | None = None
               ) -> tuple[list[RuleList], Domains, tuple[str, ...]]:
    """What load_rule_set compiles: the lists and every (wire name, rule) pair as the files
    give them (a Domains, which iterates as such pairs), and the notes; or ConfigError with
    all problems. For the rule tools (resolver/tools/), which compare, explain and export the
    domains as written, where a compiled RuleSet keeps only what answers."""
    loader = _load(paths, yaml_loader, feeds)
    return loader.lists, loader.domains, tuple(loader.notes)


def _load(paths: Sequence[str], yaml_loader: YamlLoader, feeds: FeedCopies | None
          ) -> "_Loader":
    loader = _Loader(yaml_loader, feeds)
    for path in _rule_files(paths, loader.problems):
        if path.suffix in YAML_SUFFIXES:
            loader.load_yaml(path)
        else:
            loader.load_text(path)
    if loader.problems:
        raise ConfigError(loader.problems)
    return loader


def _rule_files(paths: Sequence[str], problems: list[str]) -> list[Path]:
    """Expand directories; a missing path is a problem rather than an empty list."""
    files = []
    for text in paths:
        path = Path(text)
        try:
            if path.is_dir():
                suffixes = YAML_SUFFIXES + TEXT_SUFFIXES
                files += sorted(p for p in path.iterdir() if p.suffix in suffixes and p.is_file())
            elif path.is_file():
                files.append(path)
            else:
                problems.append(f"{path}: no such file or directory")
        except OSError as error:  # unreadable directory, name too long, ...
            problems.append(f"{path}: cannot read: {error.strerror}")
    return files


class _Loader:
    """Accumulates lists, (wire, rule) pairs and problems across all files of one load."""

    def __init__(self, yaml_loader: YamlLoader, feeds: FeedCopies | None = None) -> None:
        self._yaml_loader = yaml_loader
        self._feeds = feeds
        self.problems: list[str] = []
        self.sources: list[Source] = []
        self.notes: list[str] = []
        self.lists: list[RuleList] = []
        self.domains = Domains()  # (wire, rule) pairs, kept flat: a list may hold millions
        self._first: dict[str, str] = {}  # list name -> where it was first defined

    def load_text(self, path: Path) -> None:
        """One domain per line, '#' starts a comment; the list is named after the file.

        Read line by line, so a million-line file never becomes a million strings at once."""
        rule = Rule(RuleList(name=path.stem, source=str(path)))
        problems = [self.add_list(rule.list, str(path), "")]
        add = self.add_domain
        read = 0  # bytes before the line, to say where a byte that is not UTF-8 is
        try:
            with path.open("rb") as lines:
                for number, raw in enumerate(lines, 1):
                    line = raw.decode()
                    read += len(raw)
                    if "#" in line:
                        line = line.split("#", 1)[0]
                    domain = line.strip()
                    if domain:
                        problem = add(domain, rule, path, number)
                        if problem:
                            problems.append(problem)
        except UnicodeDecodeError as error:
            problems = [f"{path}: not UTF-8 text (byte {read + error.start})"]
        except OSError as error:
            problems = [f"{path}: cannot read: {error.strerror}"]
        self.problems += filter(None, problems)

    def load_yaml(self, path: Path) -> None:
        """Parse with yaml.compose so every node keeps its line for messages."""
        text = self._read(path)
        if text is None:
            return
        root, problem = compose(str(path), text, self._yaml_loader)
        if problem is not None:
            self.problems.append(problem)
            return
        if root is not None:
            self.problems += _YamlFile(self, path).parse(root)

    def add_list(self, rule_list: RuleList, location: str, where: str) -> str | None:
        """Record a list; its name must be a plain token and unique across all files.

        Returns the problem, if any, for the caller to file in its own order.
        """
        name = rule_list.name
        if not _TOKEN.fullmatch(name):
            problem = f"{name!r} is not a valid list name ({_TOKEN_RULE})"
        elif name in self._first:
            problem = f"duplicate list name {name!r} (first at {self._first[name]})"
        else:
            self._first[name] = location
            problem = None
        self.lists.append(rule_list)
        return problem and problem_text(location, where, problem)

    def add_domain(self, text: str, rule: Rule, location: str | Path, line: int = 0
                   ) -> str | None:
        """Normalize one rule domain; returns the problem, showing the name as written.
        location: 'file:line', or the file with its line apart (not formatted unless used)."""
        try:
            name = normalize(text)
        except ValueError as error:
            return f"{location}:{line}: {error}" if line else f"{location}: {error}"
        self.domains.add(to_wire(name), rule, name.count(".") + 1)
        return None

    def add_source(self, source: Source, rule: Rule) -> None:
        """Read a list's source. A local one that cannot be read, or holds nothing usable, is
        a problem like a broken rule file; a URL source's newest copy that is broken is
        rejected (its reload then reads the previous copy); with no copy, the list is empty
        until a fetch succeeds."""
        self.sources.append(source)
        allow = self._allow_rule(source, rule)
        if not source.is_url:
            problem = self._read_source(source, Path(source.location), rule, allow)
            if problem is not None:
                self.problems.append(problem)
            return
        copies = self._feeds.copies(source) if self._feeds is not None else []
        for path in copies:
            problem = self._read_source(source, path, rule, allow)
            if problem is None:
                return
            self.notes.append(problem)
            if self._feeds is not None:
                self._feeds.reject(source, problem)
        self.notes.append(f"{source.declared}: source {source.location}: no usable copy yet; "
                          f"list {source.list_name!r} is empty until a fetch succeeds")

    def _allow_rule(self, source: Source, rule: Rule) -> Rule | None:
        """Where a source's exception lines go: the list itself when it is an allow list,
        else its `-allow` list (made for every AdBlock and RPZ source, so the set of lists
        does not depend on what a feed holds today); None in a dry-run list, which an allow
        list cannot be."""
        rule_list = rule.list
        if rule_list.action == ALLOW:
            return rule
        if source.format not in ("adblock", "rpz") or rule_list.mode != ENFORCE:
            return None
        allow_list = RuleList(rule_list.name + ALLOW_SUFFIX, ALLOW, source=rule_list.source,
                              clients=rule_list.clients, except_clients=rule_list.except_clients,
                              rollout=rule_list.rollout, starts=rule_list.starts,
                              expires=rule_list.expires)
        problem = self.add_list(allow_list, source.declared, "")
        if problem is not None:
            self.problems.append(problem)
        return Rule(allow_list)

    def _read_source(self, source: Source, path: Path, rule: Rule, allow: Rule | None
                     ) -> str | None:
        """Add a source file's names (all or none); the problem that kept them out."""
        shown = source.location if source.is_url else str(path)
        if source.format == YAML:
            return self._read_yaml_source(shown, path, rule)
        found = Domains()  # kept apart: a source is taken whole or not at all
        unusable = 0
        notes: list[str] = []
        try:
            with path.open(encoding="utf-8") as lines:
                for item in parse(source.format, lines):
                    if len(item) == 3:  # usable (formats.is_usable, which mypy cannot see into)
                        _, name, is_allow = item
                        target = (allow if is_allow else rule)
                        if target is not None:
                            found.add(to_wire(name), target, name.count(".") + 1)
                            continue
                        item = (item[0], "an exception (allow) in a dry-run list: not used")
                    unusable += 1
                    if unusable <= NOTES_PER_SOURCE:
                        notes.append(f"{shown}:{item[0]}: {item[1]}")
        except UnicodeDecodeError as error:
            return f"{shown}: not UTF-8 text (byte {error.start} of a read)"
        except OSError as error:
            return f"{shown}: cannot read: {error.strerror}"
        if unusable and not found:
            return f"{shown}: no usable line ({unusable} unusable; format {source.format})"
        if unusable > NOTES_PER_SOURCE:
            notes.append(f"{shown}: {unusable - NOTES_PER_SOURCE} more unusable lines "
                         f"({unusable} in all, {len(found)} names taken)")
        self.notes += notes
        self.domains.absorb(found)
        return None

    def _read_yaml_source(self, shown: str, path: Path, rule: Rule) -> str | None:
        """A `format: yaml` source: a list's `domains:` and `entries:`, as in a rule file."""
        text = self._read(path)
        if text is None:
            return self.problems.pop()
        root, problem = compose(shown, text, self._yaml_loader)
        if problem is not None:
            return problem
        kept, self.domains = self.domains, Domains()  # the source's names apart, as above
        try:
            problems = _YamlFile(self, Path(shown)).parse_source(root, rule)
            found = self.domains
        finally:
            self.domains = kept
        if problems:
            return "; ".join(problems[:NOTES_PER_SOURCE])
        self.domains.absorb(found)
        return None

    def _read(self, path: Path) -> str | None:
        """Read UTF-8 text, turning I/O and decoding failures into problems."""
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            self.problems.append(f"{path}: not UTF-8 text (byte {error.start})")
        except OSError as error:
            self.problems.append(f"{path}: cannot read: {error.strerror}")
        return None


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4-mapped IPv6 addresses


class _YamlFile:
    """Walks one file's node tree; every problem names file:line and the dotted key path.

    Format:
        lists:
          - name: exchanges            # required, unique, a-z 0-9 _ . -
            action: nxdomain           # nxdomain (default) | sinkhole | nodata | refused | allow
            ttl: 300                   # optional, whole seconds >= 0; not with allow
            sinkhole: [0.0.0.0, "::"]  # optional, only with sinkhole; one address or a list
            description: free text     # optional, for readers of the file
            entries:                   # plain domains or {id, name, domains}
              - id: binance            # required in a mapping, unique in the list
                name: Binance          # optional
                domains: [binance.com] # required, at least one
              - example.org
            domains: [a.test]          # optional shorthand for plain entries
            mode: enforce              # or dry-run: count and log, change no answer
            clients: [192.0.2.0/24]    # optional: only these client networks
            except_clients: [192.0.2.7] # optional: never these
            rollout: 10%               # optional: a stable share of clients, 0-100
            starts: 2026-03-01T06:00:00Z   # optional window, RFC 3339 with an offset
            expires: 2026-03-08T06:00:00+01:00
    """

    def __init__(self, loader: _Loader, path: Path):
        self.loader = loader
        self.path = path
        self.problems: list[tuple[int, str]] = []

    def parse(self, root: Node) -> list[str]:
        """Read the file into the loader; return its problems in line order, for the reader."""
        top = self._mapping(root, "", _TOP_KEYS, required=("lists",))
        for index, node in enumerate(self._sequence(top.get("lists"), "lists")):
            self._parse_list(node, f"lists[{index}]")
        return [problem for _, problem in sorted(self.problems, key=lambda item: item[0])]

    def parse_source(self, root: Node | None, rule: Rule) -> list[str]:
        """A `format: yaml` source's body into rule's list; its problems in line order."""
        if root is not None:
            keys = self._mapping(root, "", _SOURCE_BODY_KEYS, required=())
            self._parse_names(keys, "", rule)
        return [problem for _, problem in sorted(self.problems, key=lambda item: item[0])]

    def _parse_list(self, node: Node, where: str) -> None:
        """One list: settings first, so that entries can share the finished RuleList."""
        keys = self._mapping(node, where, _LIST_KEYS, required=("name",))
        action = self._action(keys.get("action"), f"{where}.action")
        ttl = self._ttl(keys.get("ttl"), f"{where}.ttl", action)
        v4, v6 = self._sinkhole(keys.get("sinkhole"), f"{where}.sinkhole", action)
        if "description" in keys:
            self._string(keys["description"], f"{where}.description")
        mode = self._mode(keys.get("mode"), f"{where}.mode", action)
        clients = self._networks(keys.get("clients"), f"{where}.clients", needed=True)
        excepted = self._networks(keys.get("except_clients"), f"{where}.except_clients")
        rollout = self._rollout(keys.get("rollout"), f"{where}.rollout")
        starts = self._instant(keys.get("starts"), f"{where}.starts")
        expires = self._instant(keys.get("expires"), f"{where}.expires")
        if starts is not None and expires is not None and expires <= starts:
            self._error(keys["expires"], f"{where}.expires",
                        f"{utc(expires)} is not after starts ({utc(starts)})")
            expires = None
        name = self._string(keys["name"], f"{where}.name") if "name" in keys else None
        rule_list = RuleList(name or "", action or DEFAULT_ACTION, v4, v6, ttl, str(self.path),
                             mode, clients, excepted, rollout, starts, expires)
        if name is not None:  # else already a problem; the entries are still checked
            location = self._location(keys["name"])
            self._file(keys["name"], self.loader.add_list(rule_list, location, f"{where}.name"))
        plain = Rule(rule_list)
        source = self._source(keys, where, name or "")
        if source is not None and name is not None:
            self.loader.add_source(source, plain)
        self._parse_names(keys, where, plain)

    def _parse_names(self, keys: dict[str, Node], where: str, plain: Rule) -> None:
        """A list's `entries:` and `domains:`."""
        ids: dict[str, int] = {}
        entries = dotted(where, "entries")
        for index, item in enumerate(self._sequence(keys.get("entries"), entries)):
            self._parse_entry(item, f"{entries}[{index}]", plain, ids)
        domains = dotted(where, "domains")
        for index, item in enumerate(self._sequence(keys.get("domains"), domains)):
            self._domain(item, f"{domains}[{index}]", plain)

    def _source(self, keys: dict[str, Node], where: str, list_name: str) -> Source | None:
        """A list's `source:` and the keys that go with it (docs/rules.md, lists from files
        and URLs); None when the list has none, or after reporting a problem."""
        node = keys.get("source")
        if node is None:
            for key in sorted(_SOURCE_KEYS & keys.keys()):
                self._error(keys[key], f"{where}.{key}", "only with source")
            return None
        for key in ("domains", "entries"):
            if key in keys:
                self._error(keys[key], f"{where}.{key}", "a list takes its names from source "
                            "or from domains and entries, not both")
        location = self._string(node, f"{where}.source")
        if location is None:
            return None
        if is_url(location):
            parts = urllib.parse.urlsplit(location)
            if not parts.hostname:
                self._error(node, f"{where}.source", f"{location!r} is not a URL with a host")
                return None
        elif "://" in location:
            self._error(node, f"{where}.source", f"{location!r}: only http:// and https:// "
                        "URLs, or a path relative to this file")
            return None
        else:
            location = str((self.path.parent / location).resolve())
        fmt = "domains"
        if "format" in keys:
            fmt = self._one_of(keys["format"], f"{where}.format", SOURCE_FORMATS) or fmt
        refresh = self._refresh(keys.get("refresh"), f"{where}.refresh", is_url(location))
        sha256 = self._sha256(keys.get("sha256"), f"{where}.sha256")
        max_bytes = self._max_bytes(keys.get("max_bytes"), f"{where}.max_bytes")
        return Source(list_name, location, fmt, refresh, sha256, max_bytes,
                      self._location(node))

    def _refresh(self, node: Node | None, where: str, url: bool) -> float:
        """Seconds (a number, or '30m', '6h', '1d'); URL sources only, since a local source
        is watched like the rule files."""
        if node is None:
            return DEFAULT_REFRESH
        if not url:
            self._error(node, where, "only for URL sources (a local source is watched for "
                        "changes like the rule files)")
            return DEFAULT_REFRESH
        value: float | None = None
        if isinstance(node, ScalarNode) and node.tag in (INT, _FLOAT):
            try:
                value = float(node.value.replace("_", ""))
            except ValueError:
                value = None
        elif isinstance(node, ScalarNode) and node.tag == STR:
            match = _DURATION.fullmatch(node.value.strip())
            if match is not None:
                value = float(match.group(1)) * _UNITS[match.group(2)]
        if value is None or not 1 <= value <= 366 * 86400:  # NaN too
            self._error(node, where, "expected seconds from 1 to a year, or a duration like "
                        f"30m, 6h or 1d, got {kind_of(node)}")
            return DEFAULT_REFRESH
        return value

    def _sha256(self, node: Node | None, where: str) -> str | None:
        if node is None:
            return None
        value = self._string(node, where)
        if value is not None and not _SHA256.fullmatch(value.lower()):
            self._error(node, where, f"{value!r} is not a SHA-256 digest (64 hex digits)")
            return None
        return value.lower() if value is not None else None

    def _max_bytes(self, node: Node | None, where: str) -> int:
        """Bytes: a whole number, or '64 MiB' (B, KiB, MiB, GiB)."""
        if node is None:
            return DEFAULT_MAX_BYTES
        if isinstance(node, ScalarNode) and node.tag == INT and node.value.isdigit():
            value = int(node.value)
        elif isinstance(node, ScalarNode) and node.tag == STR and (
                match := _SIZE.fullmatch(node.value.strip())):
            value = int(match.group(1)) * _SIZES[match.group(2)]
        else:
            value = 0
        if value < 1:
            self._error(node, where, f"expected bytes > 0, or a size like 64 MiB, got "
                        f"{kind_of(node)}")
            return DEFAULT_MAX_BYTES
        return value

    def _parse_entry(self, node: Node, where: str, plain: Rule, ids: dict[str, int]) -> None:
        """A plain domain string, or a mapping naming a group of domains (an exchange)."""
        if isinstance(node, ScalarNode) and node.tag == STR:
            self._domain(node, where, plain)
            return
        if not isinstance(node, MappingNode):
            expected = "expected a domain name or a mapping with id and domains"
            self._error(node, where, f"{expected}, got {kind_of(node)}")
            return
        keys = self._mapping(node, where, _ENTRY_KEYS, required=("id", "domains"))
        entry_id = self._entry_id(keys.get("id"), f"{where}.id", ids)
        entry_name = self._string(keys["name"], f"{where}.name") if "name" in keys else ""
        listed = keys.get("domains")
        domains = self._sequence(listed, f"{where}.domains")
        if listed is not None and not domains and (isinstance(listed, SequenceNode)
                                                   or listed.tag == NULL):
            # (a value that is no list at all was reported as such already)
            self._error(listed, f"{where}.domains", "expected at least one domain")
        rule = Rule(plain.list, entry_id or "", entry_name or "")
        for index, item in enumerate(domains):
            self._domain(item, f"{where}.domains[{index}]", rule)

    def _entry_id(self, node: Node | None, where: str, ids: dict[str, int]) -> str | None:
        """An entry id names the entry in logs, so it is a plain token unique in its list."""
        if node is None:
            return None
        entry_id = self._string(node, where)
        if entry_id is None:
            return None
        if not _TOKEN.fullmatch(entry_id):
            self._error(node, where, f"{entry_id!r} is not a valid id ({_TOKEN_RULE})")
        elif entry_id in ids:
            self._error(node, where, f"duplicate id {entry_id!r} (first at line {ids[entry_id]})")
        else:
            ids[entry_id] = line_of(node)
        return entry_id

    def _domain(self, node: Node, where: str, rule: Rule) -> None:
        """Bad names are reported like 'x.yaml:14: 'a..test' is not a valid name: empty label'."""
        if isinstance(node, ScalarNode) and node.tag == STR:
            self._file(node, self.loader.add_domain(node.value, rule, self._location(node)))
        else:
            self._error(node, where, f"expected a domain name, got {kind_of(node)}")

    def _action(self, node: Node | None, where: str) -> str | None:
        """The action; None after an error, so that the keys that depend on the action are
        checked for themselves only, not against an action the file does not say."""
        return DEFAULT_ACTION if node is None else self._one_of(node, where, ACTIONS)

    def _ttl(self, node: Node | None, where: str, action: str | None) -> int | None:
        """Whole seconds that fit a TTL field (RFC 2181 section 8), so answers always pack."""
        if node is None:
            return None
        if action == ALLOW:
            self._error(node, where, "not used with action allow")
        elif node.tag == INT and node.value.isdigit() and int(node.value) <= MAX_TTL:
            return int(node.value)
        else:
            self._error(node, where, f"expected whole seconds 0 to {MAX_TTL}, got {kind_of(node)}")
        return None

    def _sinkhole(self, node: Node | None, where: str, action: str | None
                  ) -> tuple[_Texts, _Texts]:
        """Split addresses into A and AAAA answers; a family not given keeps its default."""
        v4, v6 = DEFAULT_SINKHOLE_V4, DEFAULT_SINKHOLE_V6
        if node is None:
            return v4, v6
        if action not in ("sinkhole", None):
            self._error(node, where, "only allowed with action sinkhole")
            return v4, v6
        items = [(node, where)] if isinstance(node, ScalarNode) else [
            (item, f"{where}[{index}]") for index, item in enumerate(self._sequence(node, where))
        ]
        if isinstance(node, SequenceNode) and not items:
            self._error(node, where, "expected at least one address")
        addresses = [address for item in items if (address := self._address(*item)) is not None]
        found_v4 = tuple(str(a) for a in addresses if a.version == 4)
        found_v6 = tuple(str(a) for a in addresses if a.version == 6)
        return found_v4 or v4, found_v6 or v6

    def _address(self, node: Node, where: str) -> _Address | None:
        """One sinkhole address; parsed, so that the text stored is the canonical form."""
        value = self._string(node, where)
        if value is None:
            return None
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            self._error(node, where, f"{value!r} is not an IP address")
            return None

    def _mode(self, node: Node | None, where: str, action: str | None) -> str:
        """enforce or dry-run; a dry-run allow list is refused, since allowing changes nothing
        until something blocks, and there would be nothing to count."""
        if node is None:
            return ENFORCE
        value = self._one_of(node, where, MODES)
        if value is None:
            return ENFORCE
        if value == DRY_RUN and action == ALLOW:
            self._error(node, where, "dry-run is not allowed with action allow")
            return ENFORCE
        return value

    def _one_of(self, node: Node, where: str, choices: tuple[str, ...]) -> str | None:
        """A string among choices; None after reporting anything else."""
        value = self._string(node, where)
        if value is not None and value not in choices:
            self._error(node, where, f"{value!r} is not one of {', '.join(choices)}")
            return None
        return value

    def _networks(self, node: Node | None, where: str, needed: bool = False
                  ) -> tuple[Network, ...]:
        """Client networks in CIDR form; a bare address is its /32 or /128. One network may
        be written without a list. needed: an empty list is an error (a list for no client
        at all is more likely a mistake than a wish; leaving the key out means everyone)."""
        if node is None:
            return ()
        items = [(node, where)] if isinstance(node, ScalarNode) and node.tag != NULL else [
            (item, f"{where}[{index}]") for index, item in enumerate(self._sequence(node, where))
        ]
        if needed and not items and (isinstance(node, SequenceNode) or node.tag == NULL):
            key = where.rsplit(".", 1)[-1]
            self._error(node, where, f"expected at least one network (leave {key} out to "
                        "apply the list to every client)")
        found: dict[Network, None] = {}
        for item, item_where in items:
            network = self._network(item, item_where)
            if network is not None:
                found[network] = None
        return tuple(found)

    def _network(self, node: Node, where: str) -> Network | None:
        """One network; host bits set is an error that names the network probably meant."""
        if not (isinstance(node, ScalarNode) and node.tag == STR):
            self._error(node, where, f"expected a network like 192.0.2.0/24, got {kind_of(node)}")
            return None
        text: str = node.value
        if "%" in text:  # ipaddress takes a scoped address; a client network has no scope
            self._error(node, where, f"{text!r}: a zone index (%...) has no place in a "
                        "client network")
            return None
        try:
            network = ipaddress.ip_network(text)
        except ValueError as error:
            if "host bits set" in str(error):
                meant = ipaddress.ip_network(text, strict=False)
                self._error(node, where, f"{text!r} has host bits set (the network is {meant})")
            else:
                self._error(node, where, f"{text!r} is not a network (CIDR) or an IP address")
            return None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            # clients arriving as ::ffff:a.b.c.d are matched as the IPv4 address they carry
            mapped = ipaddress.ip_network(
                f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
            self._error(node, where, f"{text!r} is an IPv4-mapped network: write {mapped}, "
                        "which IPv4 clients and mapped ones both match")
            return None
        return network

    def _rollout(self, node: Node | None, where: str) -> float:
        """A percentage: a number (25, 12.5) or a string with a percent sign ("25%"), 0 to 100."""
        if node is None:
            return EVERYONE
        expected = "expected a percentage like 25% or 12.5%"
        text: str | None = None
        shown = ""
        if isinstance(node, ScalarNode) and node.tag in (INT, _FLOAT):
            text = node.value
            shown = f"{node.value}"
        elif isinstance(node, ScalarNode) and node.tag == STR:
            match = _PERCENT.fullmatch(node.value.strip())
            if match is None:
                self._error(node, where, f"{expected}, got {kind_of(node)}")
                return EVERYONE
            text, shown = match.group(1), node.value.strip()
        if text is None:
            self._error(node, where, f"{expected}, got {kind_of(node)}")
            return EVERYONE
        try:
            value = float(text.replace("_", ""))
        except ValueError:
            value = math.nan
        if not 0 <= value <= EVERYONE:  # also NaN, .inf
            self._error(node, where, f"{shown} is not a percentage from 0% to 100%")
            return EVERYONE
        return value + 0.0  # -0 is 0: one meaning, one version

    def _instant(self, node: Node | None, where: str) -> float | None:
        """An RFC 3339 time with its UTC offset, as epoch seconds. YAML reads an unquoted time
        as a timestamp: taken as written. A time without an offset is refused, since whose
        midnight it means would depend on where the server runs."""
        if node is None:
            return None
        if not (isinstance(node, ScalarNode) and node.tag in (STR, _TIMESTAMP)):
            self._error(node, where, f"expected an RFC 3339 time like {_TIME_EXAMPLE}, "
                        f"got {kind_of(node)}")
            return None
        text = node.value.strip()
        match = _RFC3339.fullmatch(text)
        if match is None:
            self._error(node, where, f"{text!r} is not an RFC 3339 time like {_TIME_EXAMPLE}")
            return None
        date, clock, offset = match.groups()
        if offset is None:
            self._error(node, where, f"{text!r} has no UTC offset (add Z or +HH:MM)")
            return None
        offset = "+00:00" if offset in ("Z", "z") else offset
        try:
            moment = datetime.datetime.fromisoformat(f"{date}T{clock}{offset}")
        except ValueError as error:
            self._error(node, where, f"{text!r} is not a valid time: {error}")
            return None
        try:
            moment.astimezone(datetime.UTC)
        except (ValueError, OverflowError):  # its offset moves it out of the calendar
            self._error(node, where, f"{text!r} is outside the years 1 to 9999 in UTC")
            return None
        return moment.timestamp()

    def _mapping(
        self, node: Node, where: str, allowed: frozenset[str], required: tuple[str, ...]
    ) -> dict[str, Node]:
        """Key -> value node, reporting unknown, duplicate and missing keys by dotted path.

        Returns what could be read (possibly empty) so the caller can go on checking.
        """
        if not isinstance(node, MappingNode):
            self._error(node, where, f"expected a mapping, got {kind_of(node)}")
            return {}
        keys = {
            key: value_node
            for key, _, value_node in known_keys(node, where, allowed, self._error)
        }
        for key in required:
            if key not in keys:
                self._error(node, dotted(where, key), "required key is missing")
        return keys

    def _sequence(self, node: Node | None, where: str) -> list[Node]:
        """Items of a list; an absent or empty value is an empty list."""
        if node is None or (isinstance(node, ScalarNode) and node.tag == NULL):
            return []
        if isinstance(node, SequenceNode):
            items: list[Node] = node.value
            return items
        self._error(node, where, f"expected a list, got {kind_of(node)}")
        return []

    def _string(self, node: Node, where: str) -> str | None:
        """A string scalar; a quoted 'yes' or '300' is a string, a bare one is not."""
        if isinstance(node, ScalarNode) and node.tag == STR:
            value: str = node.value
            return value
        self._error(node, where, f"expected a string, got {kind_of(node)}")
        return None

    def _location(self, node: Node) -> str:
        """'file:line' of a node, the prefix editors and terminals turn into a link."""
        return f"{self.path}:{line_of(node)}"

    def _error(self, node: Node, where: str, message: str) -> None:
        """Record a problem and carry on, so one run reports every problem in the file."""
        self._file(node, problem_text(self._location(node), where, message))

    def _file(self, node: Node, problem: str | None) -> None:
        """Keep a problem with its line, so parse can report them in file order."""
        if problem:
            self.problems.append((line_of(node), problem))
