"""`resolver rules ...`: tools for staging a rule change before it reaches anyone.

One module per subcommand (check, explain, diff, replay, export, import), each with
`add_parser(commands)` and its `run(args) -> exit code`; docs/tools.md describes them.
All of them load rules with the server's own loader and compiler, so their verdicts are the
server's. Exit codes (common.py): 0 ok or no change, 1 problems or changes, 2 bad usage or
unreadable input, 3 the reload guard would refuse (`check --guard`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from resolver.ops.errors import ConfigError
from resolver.tools import check, diff, explain, export, importer, replay
from resolver.tools.common import USAGE, ToolError

EXIT_CODES = """\
exit codes: 0 ok / no change, 1 problems / changes, 2 usage or unreadable input,
3 the reload guard would refuse (check --guard)"""

Run = Callable[[argparse.Namespace], int]


def add_rules_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `rules` and its subcommands under the resolver's command parser."""
    rules = commands.add_parser(
        "rules", help="check, explain, diff, replay, export and import rule files",
        description="Tools for rule files, built on the server's own rules compiler.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    tools = rules.add_subparsers(required=True, metavar="TOOL")
    for module in (check, explain, diff, replay, export, importer):
        parser = module.add_parser(tools)
        parser.epilog = EXIT_CODES
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.set_defaults(run=_guarded(parser.prog, parser.get_default("run")))


def _guarded(prog: str, run: Run) -> Run:
    """Turn input problems (rules or config that cannot be read) into their lines and exit
    code 2, the same shape for every tool."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ConfigError, ToolError) as error:
            for problem in error.problems:
                print(f"{prog}: {problem}", file=sys.stderr)
            return USAGE

    return guarded
