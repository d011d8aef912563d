"""`resolver rules import --format hosts|domains|adblock|rpz FILE...`: a feed as a rule file.

The lines are read by the feed parsers the server's list sources use
(resolver/rules/formats.py), one line at a time. Every usable name becomes a plain entry of
one list (`--list`, `--action`); exceptions (AdBlock `@@||name^`, RPZ `rpz-passthru.`) go
to a second list, `<list>-allow`, with action allow. Every line that cannot be used is
reported on stderr with its file, line number and reason, and a summary says how many names
were taken; the exit code is 1 when any line was left out, 0 when none was.
The output is checked by loading it as the server would, before it is written.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import yaml

from resolver.ops.errors import ConfigError
from resolver.rules import formats
from resolver.rules.loader import load_rules
from resolver.rules.model import ACTIONS, ALLOW, DEFAULT_ACTION
from resolver.tools.common import CHANGES, OK, ToolError, plural

# What the loader takes as a list name (rules/loader.py: they end up in metric labels)
_LIST_NAME = re.compile(r"[a-z0-9_.-]+")
_NOT_IN_NAME = re.compile(r"[^a-z0-9_.-]+")
_STR = "tag:yaml.org,2002:str"
# PyYAML's own rule for what a plain scalar means (it ships no types)
_resolve = cast("Callable[[type[yaml.Node], str, tuple[bool, bool]], str]",
                yaml.resolver.Resolver().resolve)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "import", help="turn hosts, domains, AdBlock or RPZ feeds into a rule file",
        description="Read feeds into a YAML rule file. Every unusable line is reported on "
        "stderr with its number and reason; exit 1 when some line was left out.")
    parser.add_argument("--format", required=True, choices=formats.FORMATS)
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("-o", "--output", metavar="OUT", help="write here, not to stdout")
    parser.add_argument("--list", type=list_name, metavar="NAME",
                        help="the list's name (default: the first file's name)")
    parser.add_argument("--action", default=DEFAULT_ACTION,
                        choices=[action for action in ACTIONS if action != ALLOW],
                        help=f"the blocking list's action (default {DEFAULT_ACTION})")
    parser.set_defaults(run=run)
    return parser


def list_name(text: str) -> str:
    """argparse type: a list name the loader takes."""
    if not _LIST_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid list name (use only "
                                         "a-z 0-9 _ . -)")
    return text


@dataclass(slots=True)
class Imported:
    """The names taken (in the order first seen, once each) and what was not."""

    blocks: dict[str, None] = field(default_factory=dict)
    allows: dict[str, None] = field(default_factory=dict)
    lines: int = 0  # lines that said something (usable or not)
    unusable: int = 0
    repeated: int = 0

    @property
    def taken(self) -> int:
        return len(self.blocks) + len(self.allows)


def collect(fmt: str, files: list[str], found: Imported) -> Iterator[str]:
    """Parse the files into found; yields `file:line: reason` for every unusable line."""
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as lines:
                last = 0
                for item in formats.parse(fmt, lines):
                    if item[0] != last:  # items come in line order, maybe several a line
                        last = item[0]
                        found.lines += 1
                    if formats.is_usable(item):
                        _, name, allow = item  # type: ignore[misc]
                        table = found.allows if allow else found.blocks
                        if name in table:
                            found.repeated += 1
                        table[name] = None
                    else:
                        found.unusable += 1
                        yield f"{path}:{item[0]}: {item[1]}"
        except OSError as error:
            raise ToolError([f"{path}: cannot read: {error.strerror}"]) from None


def default_name(path: str) -> str:
    stem = _NOT_IN_NAME.sub("-", Path(path).stem.lower()).strip("-.")
    return stem or "imported"


def rule_file(found: Imported, name: str, action: str, fmt: str, files: list[str]) -> str:
    """The YAML text: a header comment, the blocking list, and the allow list if any."""
    sources = ", ".join(Path(path).name for path in files)
    out = [f"# Imported by `resolver rules import --format {fmt}` from {sources}:",
           f"# {plural(len(found.blocks), 'name')} to {action}, "
           f"{plural(len(found.allows), 'name')} to allow; "
           f"{plural(found.unusable, 'line')} could not be used (reported when imported).",
           "lists:" if found.taken else "lists: []"]
    for list_name_, list_action, names in ((name, action, found.blocks),
                                           (f"{name}-allow", ALLOW, found.allows)):
        if names:
            out += [f"  - name: {list_name_}", f"    action: {list_action}", "    domains:"]
            out += [f"      - {_scalar(domain)}" for domain in names]
    return "\n".join(out) + "\n"


def _scalar(name: str) -> str:
    """A name as YAML reads it back as a string: plain, unless YAML would take it for
    something else (a single-label `null`, `on`, `2001-12-14`, `12`), then quoted."""
    if _resolve(yaml.ScalarNode, name, (True, False)) == _STR:
        return name
    return f'"{name}"'


def _verify(text: str) -> None:
    """Load the output as the server would: an import the loader refuses is a bug here."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "imported.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_rules([str(path)])
        except ConfigError as error:
            raise ToolError(["the imported rules do not load:", *error.problems]) from None


def run(args: argparse.Namespace) -> int:
    found = Imported()
    for problem in collect(args.format, args.files, found):
        print(problem, file=sys.stderr)
    name = args.list or default_name(args.files[0])
    text = rule_file(found, name, args.action, args.format, args.files)
    _verify(text)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as error:
            raise ToolError([f"{args.output}: cannot write: {error.strerror}"]) from None
    print(f"imported {plural(found.taken, 'name')} ({len(found.blocks)} to {args.action}, "
          f"{len(found.allows)} to allow) from {plural(found.lines, 'line')} of "
          f"{plural(len(args.files), 'file')}; {plural(found.unusable, 'line')} could not be "
          f"used, {plural(found.repeated, 'repeated name')} taken once", file=sys.stderr)
    return CHANGES if found.unusable else OK
