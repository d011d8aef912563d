"""resolver/server/reload.py: the guard, restart-only keys, and one reload's steps, as tables.

No server here: a reload's steps are driven by hand, with rule files in a temporary directory,
a fake wall clock and a fresh counter, and what each step says is checked exactly.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from resolver.ops.config import Address, Config, GuardConfig, Overrides, load_config
from resolver.ops.metrics import Metrics
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.server.reload import (
    FAILED,
    OK,
    REFUSED,
    UNCHANGED,
    Install,
    Outcome,
    Reloads,
    guard_problems,
    restart_only,
)
from tests.clock import FakeClock

TEN = "lists:\n  - name: ten\n    domains: [" + ", ".join(f"d{i}.test" for i in range(10)) + "]\n"


def domains(name: str, count: int, action: str = "nxdomain") -> str:
    listed = ", ".join(f"{name}{i}.test" for i in range(count))
    return f"  - name: {name}\n    action: {action}\n    domains: [{listed}]\n"


def ruleset(tmp_path: Path, text: str, name: str = "r.yaml") -> RuleSet:
    path = tmp_path / name
    path.write_text(text)
    return load_rules([str(path)])


@pytest.mark.parametrize(("old", "new", "guard", "expected"), [
    pytest.param({"a": 10}, {"a": 15}, GuardConfig(), [], id="half-is-not-more-than-half"),
    pytest.param({"a": 10}, {"a": 5}, GuardConfig(), [], id="minus-half-passes"),
    pytest.param({"a": 10}, {"a": 4}, GuardConfig(),
                 ["list 'a' would go from 10 to 4 domains (-6, -60%): more than "
                  "blocking.guard.max_change (50%)"], id="shrink"),
    pytest.param({"a": 10}, {"a": 16}, GuardConfig(),
                 ["list 'a' would go from 10 to 16 domains (+6, +60%): more than "
                  "blocking.guard.max_change (50%)"], id="grow"),
    pytest.param({"a": 10}, {}, GuardConfig(),
                 ["list 'a' would disappear (10 domains): more than "
                  "blocking.guard.max_change (50%)"], id="gone"),
    pytest.param({"a": 10}, {}, GuardConfig(max_change=1.0), [], id="gone-within-1"),
    pytest.param({"a": 10}, {"a": 10, "b": 1000}, GuardConfig(), [], id="new-list-unguarded"),
    pytest.param({"a": 0}, {"a": 1000}, GuardConfig(), [], id="was-empty-unguarded"),
    pytest.param({"a": 10}, {"a": 1}, GuardConfig(max_change=None), [], id="check-off"),
    pytest.param({"a": 10}, {"a": 9}, GuardConfig(max_change=0.0),
                 ["list 'a' would go from 10 to 9 domains (-1, -10%): more than "
                  "blocking.guard.max_change (0%)"], id="zero-allows-none"),
    pytest.param({"a": 10, "b": 10}, {"a": 1, "b": 30}, GuardConfig(),
                 ["list 'a' would go from 10 to 1 domains (-9, -90%): more than "
                  "blocking.guard.max_change (50%)",
                  "list 'b' would go from 10 to 30 domains (+20, +200%): more than "
                  "blocking.guard.max_change (50%)"], id="every-list-said"),
])
def test_max_change(tmp_path: Path, old: dict[str, int], new: dict[str, int],
                    guard: GuardConfig, expected: list[str]) -> None:
    before = ruleset(tmp_path, "lists:\n" + "".join(domains(n, c) for n, c in old.items()))
    after = ruleset(tmp_path, "lists:\n" + "".join(domains(n, c) for n, c in new.items())
                    if new else "", "new.yaml")
    assert guard_problems(before, after, guard) == expected


@pytest.mark.parametrize(("must_resolve", "expected"), [
    pytest.param(("ok.test",), [], id="not-blocked"),
    pytest.param(("www.a1.test",), ["blocking.guard.must_resolve name 'www.a1.test' would be "
                                    "blocked by list 'a' (domain 'a1.test')"], id="below"),
    pytest.param(("e.test",), ["blocking.guard.must_resolve name 'e.test' would be blocked by "
                               "list 'entries' entry 'shop' (domain 'e.test')"], id="entry"),
    pytest.param(("x.a2.test",), [], id="allowed"),
])
def test_must_resolve(tmp_path: Path, must_resolve: tuple[str, ...], expected: list[str]
                      ) -> None:
    text = ("lists:\n" + domains("a", 3)
            + "  - name: entries\n    entries:\n      - id: shop\n        domains: [e.test]\n"
            + "  - name: ok\n    action: allow\n    domains: [x.a2.test]\n")
    rules = ruleset(tmp_path, text)
    assert guard_problems(rules, rules, GuardConfig(must_resolve=must_resolve)) == expected


def test_restart_only_names_each_key_outside_blocking() -> None:
    given = Config()
    new = replace(given,
                  server=replace(given.server, listen=(Address("127.0.0.1", 5353),),
                                 tcp_max_connections=5),
                  cache=replace(given.cache, max_entries=1),
                  blocking=replace(given.blocking, ttl=1),
                  source="elsewhere.yaml")
    assert restart_only(given, new) == ["server.listen", "server.tcp_max_connections",
                                        "cache.max_entries"]
    assert restart_only(given, given) == []


class Setup:
    """A config file and a rule file on disk, and Reloads started from them."""

    def __init__(self, tmp_path: Path, rules: str = TEN, config: str = ""):
        self.rules_path = (tmp_path / "rules.yaml").resolve()  # as the config resolves it
        self.config_path = tmp_path / "resolver.yaml"
        self.rules_path.write_text(rules)
        self.write_config(config)
        self.wall = FakeClock(start=1_700_000_000.0)
        self.metrics = Metrics()
        given = load_config(str(self.config_path), Overrides(upstreams=("192.0.2.53",)))
        self.reloads = Reloads(given, Overrides(upstreams=("192.0.2.53",)),
                               load_rules(given.blocking.rules), self.metrics.reloads,
                               self.wall)

    def write_config(self, extra: str) -> None:
        self.config_path.write_text(f"blocking:\n  rules: [rules.yaml]\n{extra}")

    def reload(self, force: bool = False) -> Outcome:
        """One reload as the server runs it, installing whatever judge says to."""
        judged = self.reloads.judge(self.reloads.read(), force, "test")
        if isinstance(judged, Install):
            judged = self.reloads.installed(judged)
        return self.reloads.report(judged, "test")

    def counts(self) -> dict[str, int]:
        return {key[0]: value for key, value in self.metrics.reloads.counts.items()}


def test_a_good_change_installs_and_is_counted(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    before = setup.reloads.version
    setup.rules_path.write_text(TEN.replace("d0.test", "new.test"))
    setup.wall.advance(60)
    outcome = setup.reload()
    assert outcome.result == OK and outcome.problems == ()
    assert outcome.version == setup.reloads.version != before
    assert setup.reloads.current.at == setup.wall()
    assert setup.reloads.current.rules.match("www.new.test") is not None
    assert setup.counts() == {"ok": 1}


def test_the_same_rules_written_differently_are_unchanged(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    before = setup.reloads.current
    setup.rules_path.write_text("# a comment\n" + TEN.replace("[", "[ "))
    outcome = setup.reload()
    assert outcome == Outcome(UNCHANGED, before.rules.version)
    assert setup.reloads.current.rules is before.rules  # nothing swapped
    assert setup.counts() == {"unchanged": 1}


def test_a_new_blocking_setting_alone_is_a_change(tmp_path: Path) -> None:
    """The same rules with another TTL give other answers: installed, not unchanged."""
    setup = Setup(tmp_path)
    setup.write_config("  ttl: 7\n")
    assert setup.reload().result == OK
    assert setup.reloads.current.blocking.ttl == 7


def test_settings_that_change_no_answer_are_taken_but_unchanged(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.write_config("  watch_interval: 0\n  guard:\n    max_change: 0.1\n")
    assert setup.reload().result == UNCHANGED
    assert setup.reloads.current.blocking.watch_interval == 0
    assert setup.reloads.current.blocking.guard.max_change == 0.1


def test_a_broken_file_fails_with_every_problem_and_keeps_the_rules(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    before = setup.reloads.current
    setup.rules_path.write_text("lists:\n  - name: ten\n    domains: [bad..test, also..bad]\n")
    outcome = setup.reload()
    assert outcome.result == FAILED and outcome.version == before.rules.version
    assert [problem.split(": ", 1)[0] for problem in outcome.problems] == [
        f"{setup.rules_path}:3", f"{setup.rules_path}:3"]
    assert setup.reloads.current is before
    assert setup.counts() == {"failed": 1}


def test_a_deleted_file_fails(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.rules_path.unlink()
    outcome = setup.reload()
    assert outcome.result == FAILED
    assert outcome.problems == (f"{setup.rules_path}: no such file or directory",)


def test_a_broken_config_file_fails_too(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.write_config("  guard:\n    max_change: lots\n")
    outcome = setup.reload()
    assert outcome.result == FAILED
    assert outcome.problems == (f"{setup.config_path}:4: blocking.guard.max_change: expected "
                                "a fraction >= 0 (0.5 is 50%), or null to turn the check off",)


def test_the_guard_refuses_and_force_overrides(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    before = setup.reloads.current
    setup.rules_path.write_text("lists:\n  - name: ten\n    domains: [d0.test]\n")
    refused = setup.reload()
    assert refused.result == REFUSED and refused.version == before.rules.version
    new_version = load_rules([str(setup.rules_path)]).version
    assert refused.problems == (
        "list 'ten' would go from 10 to 1 domains (-9, -90%): more than "
        "blocking.guard.max_change (50%)",
        f"refused {new_version}; POST /-/reload?force=1 overrides the guard")
    assert setup.reloads.current is before
    forced = setup.reload(force=True)
    assert forced == Outcome(OK, new_version)
    assert setup.counts() == {"refused": 1, "ok": 1}


def test_the_guard_of_the_config_being_loaded_applies(tmp_path: Path) -> None:
    """An operator loosens the guard in the same edit as a large change: it goes through."""
    setup = Setup(tmp_path)
    setup.rules_path.write_text("lists:\n  - name: ten\n    domains: [d0.test]\n")
    setup.write_config("  guard:\n    max_change: 0.95\n")
    assert setup.reload().result == OK


def test_must_resolve_refuses_a_reload(tmp_path: Path) -> None:
    setup = Setup(tmp_path, config="  guard:\n    must_resolve: [www.d10.test]\n")
    setup.rules_path.write_text(TEN.replace("d9.test", "d9.test, d10.test"))
    outcome = setup.reload()
    assert outcome.result == REFUSED
    assert outcome.problems[0] == ("blocking.guard.must_resolve name 'www.d10.test' would be "
                                   "blocked by list 'ten' (domain 'd10.test')")


def test_must_resolve_blocked_at_startup_is_a_warning(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        setup = Setup(tmp_path, config="  guard:\n    must_resolve: [d3.test]\n")
    assert setup.reloads.version in caplog.text
    assert "'d3.test' is blocked by list 'ten' (domain 'd3.test')" in caplog.text


def test_restart_only_keys_are_logged_and_not_taken(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup(tmp_path)
    setup.config_path.write_text("server:\n  listen: ['127.0.0.1:5300']\n"
                                 "blocking:\n  rules: [rules.yaml]\n  ttl: 9\n")
    with caplog.at_level(logging.WARNING):
        assert setup.reload().result == OK
    assert "server.listen differs from the running value; it takes effect at restart" \
        in caplog.text
    assert setup.reloads.given.server.listen == (Address("127.0.0.1", 1053),)
    assert setup.reloads.current.blocking.ttl == 9


def test_every_log_line_names_the_version(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup(tmp_path)
    old = setup.reloads.version
    with caplog.at_level(logging.INFO, logger="resolver.server.reload"):
        setup.rules_path.write_text("lists: [\n")
        setup.reload()
        setup.rules_path.write_text("lists:\n  - name: ten\n    domains: [d0.test]\n")
        setup.reload()
        setup.reload(force=True)
        setup.reload()
    new = setup.reloads.version
    lines = [record.getMessage() for record in caplog.records]
    assert all(old in line or new in line for line in lines), lines
    assert any(line.startswith("reload (test): rules") and "unchanged" in line
               for line in lines)


def test_watch_paths_follow_the_config(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    assert setup.reloads.watch_paths == (str(setup.rules_path), str(setup.config_path))
    other = (tmp_path / "other.yaml").resolve()
    other.write_text(TEN)
    setup.config_path.write_text("blocking:\n  rules: [other.yaml]\n")
    setup.reload()
    assert setup.reloads.watch_paths == (str(other), str(setup.config_path))
