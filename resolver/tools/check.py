"""`resolver rules check`: would the server load these rules, and would a reload take them?

Loads the files exactly as `serve` and a reload do (and the config file's `blocking`
section with -c), prints every problem as `file:line: message`, or the rule set's version
and each list's count. `--guard OLD...` also runs the reload guard (blocking.guard of the
config, or its defaults) with OLD as the rules in force, as server/reload.py does.
"""

from __future__ import annotations

import argparse
import time

from resolver.ops.config import Config
from resolver.ops.errors import ConfigError
from resolver.rules.matcher import RuleSet
from resolver.rules.model import ALLOW, ENFORCE, RuleList
from resolver.server.reload import guard_problems
from resolver.tools.common import (
    CHANGES,
    OK,
    REFUSED,
    Loaded,
    config_or_default,
    plural,
    scope_parts,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "check", help="validate rule files (and a config's blocking section)",
        description="Load rule files as the server does: print every problem as "
        "file:line: message (exit 1), or the rule set's version and per-list counts (exit 0).")
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="rule files or directories (default: the config's blocking.rules)")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="also check this config file; its blocking.guard is the guard")
    parser.add_argument("--guard", nargs="+", action="extend", metavar="OLD",
                        help="the rules in force: exit 3 if the reload guard would refuse PATH "
                        "in their place")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    config = Config()
    try:
        config = config_or_default(args.config)
    except ConfigError as error:
        problems += error.problems
    paths = tuple(args.paths) or config.blocking.rules
    loaded: Loaded | None = None
    try:
        loaded = Loaded.read(paths)
    except ConfigError as error:
        problems += error.problems
    for problem in problems:
        print(problem)
    if problems or loaded is None:
        print(f"{plural(len(problems), 'problem')}; the server would not load these rules")
        return CHANGES
    print(summary(loaded.rules))
    for rule_list in loaded.rules.lists:
        print(f"  {list_line(rule_list, loaded.rules.counts.get(rule_list.name, 0))}")
    if args.guard is None:
        return OK
    return _guard(Loaded.read(args.guard).rules, loaded.rules, config)


def _guard(old: RuleSet, new: RuleSet, config: Config) -> int:
    """The reload guard with old in force; the wall clock decides which windows are over."""
    refusals = guard_problems(old, new, config.blocking.guard, time.time())
    for refusal in refusals:
        print(f"guard: {refusal}")
    if refusals:
        print(f"guard: a reload from rules {old.version} would be refused")
        return REFUSED
    print(f"guard: a reload from rules {old.version} would pass")
    return OK


def summary(rules: RuleSet) -> str:
    return (f"rules {rules.version}: {plural(rules.domain_count, 'domain')} blocked from "
            f"{plural(len(rules.lists), 'list')}")


def list_line(rule_list: RuleList, count: int) -> str:
    """One list: name, action, mode, domains, and to whom and when it applies."""
    mode = rule_list.mode if rule_list.action != ALLOW else ENFORCE
    return f"{rule_list.name}: {rule_list.action}, {mode}, {plural(count, 'domain')}" + "".join(
        f", {part}" for part in scope_parts(rule_list))
