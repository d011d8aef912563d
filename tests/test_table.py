"""Table tests for rules/table.py: the compact plain table gives the dict's answers, finds
every name through probe runs, keeps label boundaries and allow precedence, enumerates what
the lists name, and survives pickling by value and sharing by reference."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver.message.names import to_wire
from resolver.rules import table
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.rules.model import Rule, RuleList
from resolver.rules.table import Domains, Table
from tests.test_rules import MATCHER_RULES, write

BLOCK, OTHER = RuleList("block"), RuleList("other", action="refused")
ALLOW = RuleList("allow", action="allow")


@pytest.fixture
def compact(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every set built in the test gets a compact table, however small."""
    monkeypatch.setattr(table, "COMPACT_FROM", 0)
    yield


def build(pairs: list[tuple[str, Rule]], lists: tuple[RuleList, ...] = (BLOCK, OTHER, ALLOW)
          ) -> RuleSet:
    return RuleSet(list(lists), [(to_wire(name), rule) for name, rule in pairs])


QUERIES = ["example.org", "a.b.c.example.org", "notexample.org", "org", "Mail.EXAMPLE.org",
           "www.bücher.example", "example.com", "deep.example.com", "x.deep.example.com",
           "dup.test", "www.example.org", "a.www.example.org", "www.allowed.test",
           "a.www.allowed.test", "blocked.example.net", "example.net", "other.test"]


def test_compact_answers_as_the_dict_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    path = str(write(tmp_path, "rules.yaml", MATCHER_RULES))
    small = load_rules([path])
    monkeypatch.setattr(table, "COMPACT_FROM", 0)
    big = load_rules([path])
    assert isinstance(big._table, Table) and isinstance(small._table, dict)
    assert [big.match(name) for name in QUERIES] == [small.match(name) for name in QUERIES]
    assert (big.version, big.domain_count, big.counts, big.example_domain()) == (
        small.version, small.domain_count, small.counts, small.example_domain())
    assert [big.would_block(name) for name in QUERIES] == [
        small.would_block(name) for name in QUERIES]


@pytest.mark.usefixtures("compact")
def test_every_name_is_found_through_probe_runs() -> None:
    """5,000 names in 16,384 slots: many share a first slot, and every one is found."""
    rules = build([(f"n{i}.test", Rule(BLOCK, str(i % 7))) for i in range(5000)])
    assert isinstance(rules._table, Table)
    keys, _, mask, _ = rules._table.probe()
    displaced = sum(1 for slot, key in enumerate(keys) if key and key & mask != slot)
    assert displaced > 100  # the probe runs were exercised
    assert all(rules.match(f"www.n{i}.test") == (Rule(BLOCK, str(i % 7)), f"n{i}.test")
               for i in range(5000))
    assert not any(rules.match(f"m{i}.test") for i in range(5000))
    assert len(rules._table) == 5000


@pytest.mark.usefixtures("compact")
@pytest.mark.parametrize(("query", "expected"), [
    ("ads.example", "ads.example"),
    ("x.ads.example", "ads.example"),
    ("badads.example", None),  # a label boundary, not a substring
    ("ads.example.org", None),
    ("example", None),
    ("keep.ads.example", None),  # an allow below a block
    ("x.keep.ads.example", None),
    ("shadowed.keep.ads.example", None),  # a block below an allow answers as the allow
    ("both.test", None),  # allowed and blocked at the same name: the allow wins
])
def test_label_boundaries_and_allows(query: str, expected: str | None) -> None:
    rules = build([("ads.example", Rule(BLOCK)), ("keep.ads.example", Rule(ALLOW)),
                   ("shadowed.keep.ads.example", Rule(OTHER)), ("both.test", Rule(OTHER)),
                   ("both.test", Rule(ALLOW))])
    assert rules.match(query) == (None if expected is None else (Rule(BLOCK), expected))
    assert rules.domain_count == 3  # distinct block names, as the dict counts them


@pytest.mark.usefixtures("compact")
def test_the_first_list_by_name_wins_a_name_in_two() -> None:
    rules = build([("dup.test", Rule(OTHER)), ("dup.test", Rule(BLOCK, "z")),
                   ("dup.test", Rule(BLOCK, "a"))])
    assert rules.match("dup.test") == (Rule(BLOCK, "a"), "dup.test")


@pytest.mark.usefixtures("compact")
def test_enumeration_gives_what_the_lists_name() -> None:
    pairs = [("b.test", Rule(BLOCK)), ("a.test", Rule(OTHER)), ("c.test", Rule(BLOCK)),
             ("b.test", Rule(BLOCK)), ("x.a.test", Rule(ALLOW))]
    domains = Domains((to_wire(name), rule) for name, rule in pairs)
    expected = sorted((to_wire(name), rule.list.name) for name, rule in pairs)
    assert sorted((wire, rule.list.name) for wire, rule in domains) == expected
    rules = RuleSet([BLOCK, OTHER, ALLOW], domains)
    assert isinstance(rules._table, Table)
    assert sorted((wire, rule.list.name) for wire, rule in rules._table.listed()) == expected


def test_split_reads_long_runs_in_blocks() -> None:
    names = [to_wire(f"{'a' * (i % 60 + 1)}.n{i}.test") for i in range(20_000)]
    assert list(table.split(b"".join(names))) == names


@pytest.mark.usefixtures("compact")
def test_pickled_by_value_and_shared_by_reference() -> None:
    rules = build([(f"n{i}.test", Rule(BLOCK)) for i in range(100)] + [
        ("ok.n1.test", Rule(ALLOW))])
    copy = pickle.loads(pickle.dumps(rules))
    data, fds = table.dumps(rules)
    assert len(fds) == 1 and len(data) < 2000  # the buffers stay behind
    shared = table.loads(data, [os.dup(fd) for fd in fds])
    for other in (copy, shared):
        assert isinstance(other, RuleSet)
        assert other.version == rules.version
        assert other.match("www.n42.test") == (Rule(BLOCK), "n42.test")
        assert other.match("ok.n1.test") is None and other.match("n100.test") is None
    assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("/memfd:resolver-rules")


@pytest.mark.usefixtures("compact")
def test_a_process_with_another_hash_key_rebuilds_the_table(tmp_path: Path) -> None:
    """Hashes are keyed per process: pickled by value into another, the table is rebuilt
    from its names (by reference it is refused: only forked workers share the key)."""
    rules = build([(f"n{i}.test", Rule(BLOCK)) for i in range(300)])
    (tmp_path / "set.pickle").write_bytes(pickle.dumps(rules))
    check = ("import pickle, sys; rules = pickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(rules.match('x.n299.test')[1], rules.match('n300.test'))")
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path / "set.pickle")],
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["n299.test", "None"]
