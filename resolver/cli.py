"""Command line: `resolver serve` and its flags, which override the config file.

Startup problems (config, rules, a port already taken) print one line each and exit with
status 2, so a broken deployment fails loudly instead of serving half a policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import logging
import resource
import signal
import sys

import uvloop

from resolver.ops.config import TLS_SCHEME, Config, Overrides, load_config
from resolver.ops.errors import ConfigError
from resolver.ops.watch import Watcher
from resolver.rules.matcher import RuleSet
from resolver.rules.model import ALLOW, DRY_RUN, ENFORCE
from resolver.rules.sources import Feeds
from resolver.server.app import serve_until_signalled
from resolver.server.privileges import warn_if_root
from resolver.server.reload import load_at_start, watched
from resolver.server.supervisor import Supervisor, default_workers
from resolver.stages.access import Networks
from resolver.tools import add_rules_command
from resolver.tools.common import positive
from resolver.upstream.pool import address_label

log = logging.getLogger("resolver")

GC_THRESHOLD = 50_000  # allocations between young-generation collections (default 700)
FILES_BESIDES_TCP = 100  # descriptors for listeners, upstream sockets, TLS, logs


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    status: int = args.run(args)  # the command's function (set_defaults)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resolver", description="A DNS filtering resolver: answers the names on its block "
        "lists itself and forwards everything else upstream, with a cache.")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version="%(prog)s "
                        + importlib.metadata.version("dns-filter-resolver"))  # pyproject's name
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the DNS server")
    serve.add_argument("-c", "--config", metavar="FILE", help="YAML config file")
    serve.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                       help="address to serve UDP and TCP on (repeatable)")
    serve.add_argument("--upstream", action="append", default=[],
                       metavar="HOST[:PORT]|tls://HOST[:PORT]#NAME",
                       help="upstream resolver to forward to (repeatable)")
    serve.add_argument("--rules", action="append", default=[], metavar="PATH",
                       help="rule file or directory (repeatable)")
    serve.add_argument("--metrics", metavar="HOST:PORT|off", help="Prometheus endpoint")
    serve.add_argument("--query-log", metavar="PATH|-",
                       help="log answered queries as JSON lines to a file, or - for stdout")
    serve.add_argument("--workers", type=positive, default=None, metavar="N",
                       help="worker processes sharing the ports (default: one per core)")
    serve.add_argument("--user", metavar="NAME",
                       help="drop to this user once the ports are bound (started as root)")
    serve.add_argument("--group", metavar="NAME",
                       help="the group to drop to with --user (default: the user's)")
    serve.set_defaults(run=_serve)
    _rules(commands)
    return parser


def _rules(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`resolver rules ...`: the rule tools (resolver/tools/, docs/tools.md), each with
    its own arguments and exit codes."""
    add_rules_command(commands)


def _serve(args: argparse.Namespace) -> int:
    # A reload asked for while the rules load would otherwise kill the process: SIGHUP's
    # default action. The event loop (or the supervisor) installs the real handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    overrides = Overrides(listen=tuple(args.listen), upstreams=tuple(args.upstream),
                          rules=tuple(args.rules), metrics=args.metrics,
                          query_log=args.query_log, user=args.user, group=args.group)
    try:
        config = load_config(args.config, overrides)
        # what the files hold before they are read: a change made while the rules load (or
        # the workers start) is then seen by the first look, and reloads
        watcher = Watcher(watched(config))
        feeds = Feeds(config.blocking.state_dir)
        rules = load_at_start(config, feeds)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"resolver: {problem}", file=sys.stderr)
        return 2
    settle_memory()
    warn_if_root(config.server.user)
    raise_open_files(config.server.tcp_max_connections)
    workers = args.workers or default_workers()
    # Once the server holds the rules, this frame must not (nor the banner): a reload is
    # to free the set it replaces, and a large one costs tens of MiB in every process.
    try:
        if workers > 1:
            supervisor = Supervisor(config, rules, workers, overrides, watcher=watcher,
                                    feeds=feeds)
            del rules
            supervisor.run(lambda addresses, _: print(
                banner(config, supervisor.rules, addresses, workers), flush=True))
        else:
            serving = serve_until_signalled(
                config, rules,
                lambda server: print(banner(config, server.rules, server.addresses, 1),
                                     flush=True), overrides=overrides,
                watcher=watcher, feeds=feeds)
            del rules
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(serving)
    except (OSError, RuntimeError) as exc:
        print(f"resolver: cannot serve: {exc}", file=sys.stderr)
        return 2
    log.info("stopped")
    return 0


def settle_memory() -> None:
    """Move everything loaded so far (rules, config) out of the garbage collector's sight,
    collect young objects less often, and after each collection, move its survivors out of
    sight too.

    The query path allocates many short-lived, acyclic objects; with the default threshold
    the collector runs every 700 allocations and walks the survivors, a few per cent of the
    forwarding path. Frozen objects are never walked again (a million-domain rule set would
    otherwise be), and freezing before the workers fork keeps their pages shared.

    What survives a young collection is mostly cache entries. Left in the older generations
    they are walked again and again: under cold traffic a middle-generation pass took 170 ms
    and a full one longer, with every query stalled meanwhile. Frozen they cost nothing, and
    refcounting still frees them when they are evicted. The query paths make no reference
    cycles (tests/test_gc.py checks it); a cycle that dies young is still collected, one
    that outlives a collection would stay, which is why the paths are kept free of them.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)
    gc.callbacks.append(_freeze_survivors)


def raise_open_files(tcp_connections: int) -> None:
    """Lift the soft limit on open files to the hard one, as Unbound and nginx do: the
    common soft limit of 1024 is about the default tcp_max_connections, and upstream sockets,
    TLS connections and the TCP retries of truncated replies need descriptors too. Running
    out only shows as connections closed without a word, so a limit still too low is said."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < tcp_connections + FILES_BESIDES_TCP:
        log.warning("open files are limited to %d, fewer than server.tcp_max_connections "
                    "(%d) needs; raise the limit (ulimit -n, LimitNOFILE=)", soft,
                    tcp_connections)


def _freeze_survivors(phase: str, info: dict[str, int]) -> None:
    if phase == "stop":
        gc.freeze()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def banner(config: Config, rules: RuleSet, addresses: list[tuple[str, int]],
            workers: int) -> str:
    """The one startup line: where we listen, what we block (and the rules' version, as
    reload lines, the metrics and blocked answers' EDE text name it), and a query to try."""
    where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
    upstreams = ", ".join(f"{TLS_SCHEME}{address_label(s)}#{s.tls_name}" if s.protocol == "tls"
                          else address_label(s) for s in config.upstream.servers)
    lists = len([lst for lst in rules.lists if lst.action != ALLOW and lst.mode == ENFORCE])
    dry = len([lst for lst in rules.lists if lst.mode == DRY_RUN])
    processes = f", {workers} workers" if workers > 1 else ""
    line = (f"resolver: listening on {where} (UDP and TCP{processes}), blocking "
            f"{_count(rules.domain_count, 'domain')} from {_count(lists, 'list')}"
            f"{f' (and {dry} dry-run)' if dry else ''} (rules {rules.version}), "
            f"forwarding to {upstreams}")
    open_to = Networks(config.server.allow).open
    if open_to:
        line += (f"; WARNING: open to every client ({', '.join(open_to)} in server.allow): "
                 "an open resolver is a DDoS amplifier, see docs/hardening.md")
    example = rules.example_domain()
    if example:
        host, port = addresses[0]
        line += f"; try: dig @{host} -p {port} www.{example}"
    return line
