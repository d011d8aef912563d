"""`resolver serve --workers 2` with a list large enough for the compact table: a reloaded
list is blocked by every worker, and the workers map one shared copy of it."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import dns.rcode

from resolver.rules import table
from resolver.rules.loader import load_rules
from tests.test_workers import QUERIES, Served, serve  # noqa: F401  (a fixture)

SIZE = table.COMPACT_FROM + 1000


def _tables(pid: int) -> set[int]:
    """Inodes of the rule tables process pid maps."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {int(found) for found in re.findall(r" (\d+) +/memfd:resolver-rules", maps)}


def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_workers_share_a_reloaded_compact_table(serve, tmp_path: Path) -> None:  # noqa: F811
    start, rules = serve
    big = tmp_path / "big.txt"
    big.write_text("".join(f"d{i}.big.test\n" for i in range(SIZE)))
    rules.unlink()
    rules.mkdir()  # the --rules path becomes a directory holding the text list
    (rules / "big.txt").symlink_to(big)
    served: Served = start(2)
    assert served.rcode("www.d7.big.test") == dns.rcode.NXDOMAIN
    big.write_text("".join(f"e{i}.big.test\n" for i in range(SIZE)))
    new = load_rules([str(rules)]).version
    served.process.send_signal(signal.SIGHUP)
    _until(lambda: served.metrics().get(("resolver_rules_info", (("version", new),))) == 2)
    for name in (f"n{i}.e{SIZE - 1}.big.test" for i in range(QUERIES)):  # many source ports
        assert served.rcode(name) == dns.rcode.NXDOMAIN
    assert served.rcode("www.d7.big.test") != dns.rcode.NXDOMAIN  # forwarded: no longer listed
    workers = served.children()
    assert len(workers) == 2
    current = [_tables(pid) for pid in workers]
    assert current[0] & current[1], f"the workers map no table in common: {current}"
