"""Rule sets compiled in a short-lived child process, so the server never holds a build.

Reading a list of a million names and compiling it needs about 50 MiB on the way (the
names and their hashes as read, the sort behind the version, the table's arrays before
they reach their memory file), and a process that did it keeps much of that: the
allocator returns freed heap to the system only from its top, so a server that compiled in
its own heap would peak at twice its steady size on every reload and stay larger after.
Instead the server forks; the child (same hash key, same files) loads and compiles, writes
the compact table into a memory file (rules/table.py), and sends back the set pickled with
its tables by reference and their descriptors, then exits, its memory going back whole. The
server's peak during a reload is then its steady size plus the new set's own objects (the
table's pages only as queries touch them), and the old set is freed once it is replaced.

The load asks for the copies of URL sources (Feeds.copies, which marks a pending copy as
read, and Feeds.reject) through the pipe, answered by the parent's Feeds: the same calls,
made at the same moments, as a load in the parent would make, and nothing in the child
takes a lock another thread of the parent may have held when it forked. The child logs
nothing (its notes come back in the Loaded), and ends with os._exit whatever happens.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from resolver.ops.errors import ConfigError
from resolver.ops.process import die_with_parent
from resolver.rules import table
from resolver.rules.loader import FAST_LOADER, FeedCopies, Loaded, load_rule_set
from resolver.rules.sources import Source

log = logging.getLogger(__name__)

COMPILE_TIMEOUT = 900.0  # seconds without a word from the child before it is given up


def load_apart(paths: Sequence[str], feeds: FeedCopies | None = None) -> Loaded:
    """load_rule_set, run in a forked child (see the module's docstring): the same Loaded,
    or ConfigError with the same problems. RuntimeError when the child fails otherwise
    (killed, out of memory, silent for COMPILE_TIMEOUT). When no process can be forked
    (out of memory or processes), the load runs here, as it did before."""
    ours, theirs = multiprocessing.Pipe()
    started = time.monotonic()
    try:
        pid = os.fork()
    except OSError as exc:
        ours.close()
        theirs.close()
        log.warning("cannot fork to compile the rules (%s); compiling them in this process",
                    exc)
        return load_rule_set(paths, yaml_loader=FAST_LOADER, feeds=feeds)
    if pid == 0:  # pragma: no cover (the child: coverage does not follow it)
        ours.close()
        _child(theirs, paths)
    theirs.close()
    try:
        loaded = _answer(ours, feeds, pid)
    finally:
        ours.close()
        _, _, usage = os.wait4(pid, 0)
    log.info("rules %s compiled in %.2f s by process %d (peak RSS %.0f MiB)",
             loaded.rules.version, time.monotonic() - started, pid, usage.ru_maxrss / 1024)
    return loaded


def _answer(conn: Connection, feeds: FeedCopies | None, pid: int) -> Loaded:
    """Serve the child's questions until it sends its result."""
    while True:
        if not conn.poll(COMPILE_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"compiling the rules: process {pid} said nothing for "
                               f"{COMPILE_TIMEOUT:g} s; killed")
        try:
            message = conn.recv()
        except EOFError:
            raise RuntimeError(f"compiling the rules: process {pid} ended without a "
                               "result") from None
        kind = message[0]
        if kind == "copies":
            conn.send(feeds.copies(message[1]) if feeds is not None else [])
        elif kind == "reject":
            if feeds is not None:
                feeds.reject(message[1], message[2])
        elif kind == "problems":
            raise ConfigError(message[1])
        elif kind == "crash":
            raise RuntimeError(f"compiling the rules failed in process {pid}:\n{message[1]}")
        else:
            data = conn.recv_bytes()
            loaded = table.loads(data, table.receive_fds(conn, message[1]))
            assert isinstance(loaded, Loaded)
            return loaded


class _ParentFeeds:
    """The child's view of its parent's Feeds (loader.FeedCopies), over the pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def copies(self, source: Source) -> list[Path]:
        self.conn.send(("copies", source))
        paths: list[Path] = self.conn.recv()
        return paths

    def reject(self, source: Source, why: str) -> None:
        self.conn.send(("reject", source, why))


def _child(conn: Connection, paths: Sequence[str]) -> None:  # pragma: no cover
    """Load, compile, send the result, exit: never returns."""
    status = 1
    try:
        _quiet()
        try:
            loaded = load_rule_set(paths, yaml_loader=FAST_LOADER, feeds=_ParentFeeds(conn))
        except ConfigError as exc:
            conn.send(("problems", exc.problems))
        else:
            data, fds = table.dumps(loaded)
            conn.send(("loaded", len(fds)))
            conn.send_bytes(data)
            table.send_fds(conn, fds)
        status = 0
    except BaseException:
        try:
            conn.send(("crash", traceback.format_exc()))
        except BaseException:
            pass
    finally:
        os._exit(status)


def _quiet() -> None:  # pragma: no cover (the child)
    """The child stops at signals the parent's handlers would have taken (a handler of the
    parent's event loop would write to the loop's wakeup descriptor, which the two share),
    and dies with its parent."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
