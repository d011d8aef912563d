"""`resolver rules replay`: a generated log whose answers are known by construction."""

from __future__ import annotations

import argparse
import json

import pytest

from resolver.ops.config import Config
from resolver.ops.shipped import SHIPPED_RULES
from resolver.tools import replay as replay_module
from resolver.tools.common import Loaded, ToolError
from resolver.tools.replay import LogFiles, Replay, choose_baseline, replay

OLD = """\
lists:
  - name: ads
    entries:
      - id: acme
        domains: [acme.test]
      - gone.test
  - name: windowed
    starts: 2026-06-01T00:00:00Z
    domains: [summer.test]
"""
NEW = """\
lists:
  - name: ads
    entries:
      - id: acme
        domains: [acme.test]
      - fresh.test
  - name: corp
    clients: [10.0.0.0/8]
    domains: [social.test]
  - name: moved
    domains: [summer.test]
  - name: watch
    mode: dry-run
    domains: [game.test]
"""
WINTER, SUMMER = "2026-01-15T12:00:00.000Z", "2026-07-15T12:00:00.000Z"
PLAIN_AT = 1_760_000_000.0  # 2025-10: before the windowed list starts


def record(client, qname, when=SUMMER, version="0123456789ab", **extra):
    fields = {"schema": 1, "time": when, "client": client, "qname": qname, "qtype": "A",
              "protocol": "udp", "outcome": "forwarded", "rcode": "NOERROR", "list": None,
              "entry": None, "mode": None, "upstream": "127.0.0.1:53", "duration_ms": 0.2,
              "rules_version": version, **extra}
    return json.dumps(fields)


def generated_log():
    """Lines, and the counts they must give (by construction, not by running the code)."""
    lines = ["# a comment", ""]
    for n in range(40):  # unchanged blocked: 40 queries
        lines.append(record(f"192.0.2.{n % 4}", "www.acme.test"))
    for n in range(30):  # newly allowed (gone.test): 30 queries from 3 clients
        lines.append(f"198.51.100.{n % 3} gone.test AAAA")
    for n in range(25):  # newly blocked (fresh.test): 25 queries from 5 clients
        lines.append(record(f"203.0.113.{n % 5}", "a.fresh.test", future_key=n))
    for n in range(12):  # corp's clients only: 6 newly blocked (4 clients), 6 unchanged allowed
        client = f"10.0.0.{n % 4}" if n < 6 else "192.0.2.100"
        lines.append(f"{client} social.test")
    for _ in range(7):  # in summer, windowed -> moved: another rule; in winter, newly blocked
        lines.append(record("192.0.2.50", "summer.test", SUMMER))
    for _ in range(3):
        lines.append(record("192.0.2.51", "summer.test", WINTER))
    for _ in range(5):  # dry run only: unchanged allowed, counted for watch
        lines.append(record("192.0.2.60", "game.test"))
    lines += ["one-field", "{broken json", '{"schema": 1, "client": 7, "qname": "x.test"}',
              "192.0.2.1 bad..name", "no-ip example.test A"]
    expected = {
        "queries": 40 + 30 + 25 + 12 + 7 + 3 + 5, "bad": 5,
        "newly_blocked": (25 + 6 + 3, 5 + 4 + 1), "newly_allowed": (30, 3), "changed": (7, 1),
        "unchanged_blocked": 40, "unchanged_allowed": 6 + 5,
        "by_new_rule": {("ads", "", "nxdomain"): 25, ("corp", "", "nxdomain"): 6,
                        ("moved", "", "nxdomain"): 3},
        "dry_run": {("watch", "", "nxdomain"): 5},
    }
    return lines, expected


@pytest.fixture
def rules(tmp_path):
    (tmp_path / "old.yaml").write_text(OLD)
    (tmp_path / "new.yaml").write_text(NEW)
    return (Loaded.read([str(tmp_path / "old.yaml")]), Loaded.read([str(tmp_path / "new.yaml")]))


def run_replay(tmp_path, lines, old, new):
    log = tmp_path / "queries.log"
    log.write_text("\n".join(lines) + "\n")
    return replay(LogFiles([str(log)]), Replay(old.rules, new.rules), PLAIN_AT, progress=False)


def test_generated_log_gives_exact_counts(tmp_path, rules, capsys):
    lines, expected = generated_log()
    report = run_replay(tmp_path, lines, *rules)
    assert report.queries == expected["queries"]
    assert report.bad == expected["bad"]
    nb, na, ch = report.newly_blocked, report.newly_allowed, report.changed_rule
    assert (nb.total.queries, len(nb.total.clients.seen)) == expected["newly_blocked"]
    assert (na.total.queries, len(na.total.clients.seen)) == expected["newly_allowed"]
    assert (ch.total.queries, len(ch.total.clients.seen)) == expected["changed"]
    assert report.unchanged_blocked == expected["unchanged_blocked"]
    assert report.unchanged_allowed == expected["unchanged_allowed"]
    assert {k: t.queries for k, t in nb.by_rule.items()} == expected["by_new_rule"]
    assert {k: t.queries for k, t in na.by_rule.items()} == {("ads", "", "nxdomain"): 30}
    assert {k: t.queries for k, t in report.dry_run.items()} == expected["dry_run"]
    assert nb.names.top(2) == [("a.fresh.test", 25), ("social.test", 6)]
    assert not nb.total.clients.capped and not nb.names.pruned
    shown = capsys.readouterr().err.splitlines()
    assert len(shown) == 5 and shown[0].endswith(
        f"queries.log:{len(lines) - 4}: skipped: expected 'client qname [qtype]', got 1 field")
    assert "not a valid name" in shown[3] and "not a client IP address" in shown[4]


def test_unknown_schema_stops_with_file_and_line(tmp_path, rules):
    lines = [record("192.0.2.1", "a.test"), record("192.0.2.1", "a.test", schema=2)]
    with pytest.raises(ToolError) as caught:
        run_replay(tmp_path, lines, *rules)
    assert caught.value.problems[0].endswith(
        "queries.log:2: query log schema 2 is not known (this resolver reads schema 1); "
        "replay stopped")


def test_clients_past_the_cap_are_at_least(tmp_path, rules, monkeypatch):
    monkeypatch.setattr(replay_module, "CLIENT_CAP", 3)
    report = run_replay(tmp_path, [f"192.0.2.{n} fresh.test" for n in range(6)], *rules)
    clients = report.newly_blocked.total.clients
    assert (len(clients.seen), clients.capped, str(clients)) == (3, True, "at least 3 clients")


def test_top_names_table_stays_bounded(tmp_path, rules, monkeypatch):
    monkeypatch.setattr(replay_module, "NAME_SLOTS", 8)
    lines = ["192.0.2.1 heavy.fresh.test"] * 20 + [
        f"192.0.2.1 n{n}.fresh.test" for n in range(30)]
    report = run_replay(tmp_path, lines, *rules)
    names = report.newly_blocked.names
    assert len(names.counts) < 8 and names.pruned
    assert names.top(1) == [("heavy.fresh.test", 20)]


def baseline_args(**given):
    return argparse.Namespace(**{"baseline": None, "config": None, **given})


def test_baseline_is_the_log_version_found_in_the_config(tmp_path, rules):
    old, _ = rules
    config = Config()
    config = config.__class__(blocking=config.blocking.__class__(
        rules=(str(tmp_path / "old.yaml"),)))
    chosen, why = choose_baseline(baseline_args(config="given"), config, old.rules.version)
    assert chosen.rules.version == old.rules.version
    assert why == (f"rules {old.rules.version} (the config's blocking.rules: the log's "
                   "rules_version)")


def test_baseline_falls_back_to_the_shipped_rules_and_says_why(rules):
    shipped = Loaded.read([SHIPPED_RULES]).rules.version
    chosen, why = choose_baseline(baseline_args(), Config(), "ffffffffffff")
    assert chosen.rules.version == shipped
    assert why == (f"rules {shipped} (the shipped rules; the log's rules_version ffffffffffff "
                   f"was not found: the shipped rules are {shipped})")
    assert choose_baseline(baseline_args(), Config(), None)[1].endswith(
        "the log names no rules_version)")
