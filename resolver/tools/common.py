"""What the rule tools share: exit codes, loading rules as the server does, argument types,
and how results are written.

Every tool reads rules through `read_rules`/`RuleSet`, the loader and compiler the server
uses (resolver/rules/loader.py), so a tool's verdict is the server's verdict.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from resolver.ops.config import Config, load_config
from resolver.ops.shipped import SHIPPED_RULES
from resolver.rules.loader import read_rules
from resolver.rules.matcher import RuleSet
from resolver.rules.model import EVERYONE, Rule, RuleList
from resolver.rules.scope import utc

# Exit codes of every `resolver rules` command (docs/tools.md#exit-codes)
OK = 0  # valid, no change
CHANGES = 1  # problems found (check), or changes (diff)
USAGE = 2  # bad arguments, or input that cannot be read (argparse exits 2 too)
REFUSED = 3  # check --guard: the reload guard would refuse the new rules


class ToolError(Exception):
    """Input a tool cannot work with: its lines are printed, and the exit code is USAGE."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Loaded:
    """Rules as the files give them (lists, every (wire name, rule) pair) and compiled."""

    lists: tuple[RuleList, ...]
    domains: list[tuple[bytes, Rule]]
    rules: RuleSet

    @classmethod
    def read(cls, paths: Sequence[str]) -> Loaded:
        """Load and compile; raises ConfigError listing every problem, as load_rules does."""
        lists, domains = read_rules(paths)
        return cls(tuple(lists), domains, RuleSet(lists, domains))


def config_or_default(path: str | None) -> Config:
    """The config file given with -c (ConfigError on problems), else the defaults. Without a
    file, resolv.conf is not read: the tools never forward."""
    return load_config(path) if path is not None else Config()


def rule_paths(given: Sequence[str], config: Config) -> tuple[str, ...]:
    """The rules a tool works on: those given, else the config's (which default to the
    shipped rules/exchanges.yaml)."""
    return tuple(given) or config.blocking.rules or (SHIPPED_RULES,)


def instant(text: str) -> float:
    """argparse type: an RFC 3339 time with its UTC offset, as epoch seconds."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 time like 2026-03-01T06:00:00Z") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (add Z or +HH:MM)")
    return moment.timestamp()


def client_ip(text: str) -> str:
    """argparse type: a client address, as the server sees it (no port, no network)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def write_json(data: object, out: TextIO = sys.stdout) -> None:
    """One JSON document, keys in the order the tool built them."""
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def plural(number: int, noun: str, nouns: str | None = None) -> str:
    return f"{number} {noun if number == 1 else nouns or noun + 's'}"


def scope_parts(rule_list: RuleList) -> list[str]:
    """The staging settings a list has, as a person reads them (none for a plain list)."""
    parts = []
    if rule_list.clients:
        parts.append("clients " + " ".join(str(net) for net in rule_list.clients))
    if rule_list.except_clients:
        parts.append("except " + " ".join(str(net) for net in rule_list.except_clients))
    if rule_list.rollout < EVERYONE:
        parts.append(f"rollout {rule_list.rollout:g}%")
    if rule_list.starts is not None:
        parts.append(f"starts {utc(rule_list.starts)}")
    if rule_list.expires is not None:
        parts.append(f"expires {utc(rule_list.expires)}")
    return parts
