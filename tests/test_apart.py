"""Rule sets compiled in a forked child (rules/apart.py) are the sets a load in the process
gives, problems and URL-source bookkeeping included; a child that fails fails the load; and
a server frees the set a reload replaces."""

from __future__ import annotations

import os
import signal
import weakref
from pathlib import Path

import pytest

from resolver.ops.errors import ConfigError
from resolver.rules import apart, table
from resolver.rules.apart import load_apart
from resolver.rules.loader import load_rule_set, load_rules
from resolver.rules.sources import Source
from resolver.server.app import running_server
from tests.conftest import resolver_config
from tests.servers import NsdServer

BIG = table.COMPACT_FROM + 10


def _big(path: Path, prefix: str = "d") -> Path:
    path.write_text("".join(f"{prefix}{i}.big.test\n" for i in range(BIG)))
    return path


def test_a_compact_set_compiled_apart_is_the_set_compiled_here(tmp_path: Path) -> None:
    paths = [str(_big(tmp_path / "big.txt")), "rules/exchanges.yaml"]
    here, there = load_rule_set(paths), load_apart(paths)
    got, want = there.rules._table, here.rules._table
    assert isinstance(got, table.Table) and isinstance(want, table.Table)
    assert (there.rules.version, there.rules.counts, there.rules.domain_count) == (
        here.rules.version, here.rules.counts, here.rules.domain_count)
    for name in ("www.d7.big.test", f"d{BIG - 1}.big.test", "www.binance.com", "d7.big.tes"):
        assert there.rules.match(name) == here.rules.match(name)
    assert sorted(got.listed(), key=repr) == sorted(want.listed(), key=repr)


def test_sources_and_notes_come_back(tmp_path: Path) -> None:
    (tmp_path / "feed.txt").write_text("||a.example^\nexample.org##.ad\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("lists:\n  - name: feed\n    source: feed.txt\n    format: adblock\n")
    here, there = load_rule_set([str(rules)]), load_apart([str(rules)])
    assert (there.sources, there.notes, there.rules.version) == (
        here.sources, here.notes, here.rules.version)
    assert there.notes and there.sources


def test_problems_are_the_same(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("lists:\n  - name: x\n    domains: [a..b, ok.test]\n  - name: x\n")
    with pytest.raises(ConfigError) as here:
        load_rule_set([str(rules)])
    with pytest.raises(ConfigError) as there:
        load_apart([str(rules)])
    assert there.value.problems == here.value.problems
    assert f"{rules}:3:" in there.value.problems[0]


class _Feeds:
    """Records what the child asks of its parent's Feeds."""

    def __init__(self, copies: list[Path]) -> None:
        self.given = copies
        self.calls: list[tuple[str, ...]] = []

    def copies(self, source: Source) -> list[Path]:
        self.calls.append(("copies", source.location))
        return self.given

    def reject(self, source: Source, why: str) -> None:
        self.calls.append(("reject", source.location, why))


def test_url_source_copies_are_asked_of_the_parent(tmp_path: Path) -> None:
    """The pending copy is broken, the good one is read: the parent's Feeds is asked for the
    copies and told of the rejection, as a load in the parent would."""
    pending = tmp_path / "pending"
    pending.write_bytes(b"\xff\xfe\n")
    good = tmp_path / "good"
    good.write_text("a.example\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("lists:\n  - name: feed\n    source: https://feeds.example/x\n")
    feeds = _Feeds([pending, good])
    loaded = load_apart([str(rules)], feeds)
    assert loaded.rules.counts == {"feed": 1}
    assert feeds.calls == [
        ("copies", "https://feeds.example/x"),
        ("reject", "https://feeds.example/x",
         "https://feeds.example/x: not UTF-8 text (byte 0 of a read)")]


def _crash(*args: object, **kwargs: object) -> None:
    raise ValueError("a bug in the loader")


def _die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize(("fault", "said"), [
    (_crash, "ValueError: a bug in the loader"),
    (_die, "ended without a result"),
])
def test_a_failing_child_fails_the_load(monkeypatch: pytest.MonkeyPatch, fault: object,
                                        said: str) -> None:
    monkeypatch.setattr(apart, "load_rule_set", fault)  # the child is forked with it
    with pytest.raises(RuntimeError, match=said):
        load_apart(["rules/exchanges.yaml"])


def test_without_a_fork_the_load_runs_here(monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    def refuse() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refuse)
    loaded = load_apart(["rules/exchanges.yaml"])
    assert loaded.rules.version == load_rules(["rules/exchanges.yaml"]).version
    assert "cannot fork to compile the rules" in caplog.text


async def test_a_reload_frees_the_set_it_replaces(tmp_path: Path,
                                                  nsd_upstream: NsdServer) -> None:
    """Nothing that started the server keeps the first set: once replaced, it and its
    table are gone (refcounting alone: no cycle keeps them)."""
    big = _big(tmp_path / "big.txt")
    config = resolver_config([nsd_upstream], [str(big)])
    async with running_server(config, load_rules([str(big)])) as server:
        first = weakref.ref(server.rules._table)  # the set holds it: gone, so is the set
        _big(big, "e")
        assert await server.reload_rules()
        assert first() is None
        assert server.rules.match("www.e7.big.test") is not None
