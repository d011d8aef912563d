"""Command line: `resolver serve` and its flags, which override the config file.

Startup problems (config, rules, a port already taken) print one line each and exit with
status 2, so a broken deployment fails loudly instead of serving half a policy.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop

from .app import running_server
from .config import Config, Overrides, load_config
from .errors import ConfigError
from .rules import RuleSet, load_rules

log = logging.getLogger("resolver")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resolver", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the DNS server")
    serve.add_argument("-c", "--config", metavar="FILE", help="YAML config file")
    serve.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                       help="address to serve UDP and TCP on (repeatable)")
    serve.add_argument("--upstream", action="append", default=[], metavar="HOST[:PORT]",
                       help="upstream resolver to forward to (repeatable)")
    serve.add_argument("--rules", action="append", default=[], metavar="PATH",
                       help="rule file or directory (repeatable)")
    serve.add_argument("--metrics", metavar="HOST:PORT|off", help="Prometheus endpoint")
    serve.set_defaults(run=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    overrides = Overrides(listen=tuple(args.listen), upstreams=tuple(args.upstream),
                          rules=tuple(args.rules), metrics=args.metrics)
    try:
        config = load_config(args.config, overrides)
        rules = load_rules(config.blocking.rules)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"resolver: {problem}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(_run(config, rules))
        except OSError as exc:
            print(f"resolver: cannot listen: {exc}", file=sys.stderr)
            return 2
    return 0


async def _run(config: Config, rules: RuleSet) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(config, rules) as server:
        print(_banner(config, rules, server.addresses), flush=True)
        await stop.wait()
    log.info("stopped")


def _banner(config: Config, rules: RuleSet, addresses: list[tuple[str, int]]) -> str:
    """The one startup line: where we listen, what we block, and a query to try."""
    where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
    upstreams = ", ".join(f"{s.host}:{s.port}" for s in config.upstream.servers)
    lists = len([lst for lst in rules.lists if lst.action != "allow"])
    line = (f"resolver: listening on {where} (UDP and TCP), blocking {rules.domain_count} "
            f"domains from {lists} list{'s' if lists != 1 else ''}, forwarding to {upstreams}")
    example = getattr(rules, "example_domain", lambda: None)()
    if example:
        host, port = addresses[0]
        line += f"; try: dig @{host} -p {port} www.{example}"
    return line
