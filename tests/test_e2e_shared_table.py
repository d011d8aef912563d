"""`resolver serve --workers 2` with a list large enough for the compact table: a reloaded
list is blocked by every worker, and the workers map one shared copy of it."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import dns.rcode
import pytest

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


def _table_fds(pid: int) -> set[int]:
    """Inodes of the rule tables process pid holds descriptors of (a table's own, and the
    one its map keeps)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if "memfd:resolver-rules" in str(fd.readlink()):
                inodes.add(fd.stat().st_ino)
        except FileNotFoundError:  # closed meanwhile
            continue
    return inodes


def _serving(served: Served, version: str, processes: int) -> Callable[[], bool]:
    """Whether that many processes serve version."""
    key = ("resolver_rules_info", (("version", version),))
    return lambda: served.metrics().get(key) == processes


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_frees_the_replaced_table_in_every_process(serve, tmp_path: Path,  # noqa: F811
                                                            workers: int) -> None:
    """The set loaded at start is not kept by the frames that started serving (nor by a
    forked worker's copy of the supervisor): after two reloads every process maps one table,
    the newest, and holds descriptors of no other."""
    start, rules = serve
    rules.unlink()
    rules.mkdir()
    big = rules / "big.txt"
    big.write_text("".join(f"d{i}.big.test\n" for i in range(SIZE)))
    served: Served = start(workers)
    processes = [served.process.pid, *served.children()]
    assert len(processes) == 1 + (workers if workers > 1 else 0)
    first = set.union(*(_tables(pid) for pid in processes))
    for turn in ("e", "f"):
        big.write_text("".join(f"{turn}{i}.big.test\n" for i in range(SIZE)))
        new = load_rules([str(rules)]).version
        served.process.send_signal(signal.SIGHUP)
        _until(_serving(served, new, workers))
        assert served.rcode(f"www.{turn}7.big.test") == dns.rcode.NXDOMAIN
    for pid in processes:
        mapped = _tables(pid)
        assert len(mapped) == 1 and not mapped & first, (pid, mapped, first)
        assert _table_fds(pid) == mapped, pid
