"""Lists from files (rules/loader.py `source:`) and the refresh schedule of URL sources
(rules/sources.py Schedule): table tests, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.ops.errors import ConfigError
from resolver.rules.loader import load_rule_set, load_rules
from resolver.rules.sources import RETRY_FIRST, Schedule

pytestmark = pytest.mark.unit

DAY = 86400.0
NOW = 1_000_000.0


@pytest.mark.parametrize(("fetched_at", "refresh", "due"), [
    (None, DAY, NOW),  # no copy: fetched at once
    (NOW - 10, DAY, NOW - 10 + DAY),  # a fresh copy: due when it is a refresh old
    (NOW - 2 * DAY, DAY, NOW),  # a stale copy: at once
    (NOW + 3 * DAY, DAY, NOW + DAY),  # a copy from the future (clock stepped back): one refresh
])
def test_first_schedule(fetched_at: float | None, refresh: float, due: float) -> None:
    assert Schedule.first(NOW, refresh, fetched_at) == Schedule(due)


@pytest.mark.parametrize(("refresh", "failures", "waits"), [
    (DAY, 4, [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST, 8 * RETRY_FIRST]),
    (150.0, 3, [RETRY_FIRST, 2 * RETRY_FIRST, 150.0]),  # never longer than the refresh
    (1.0, 2, [1.0, 1.0]),  # a short refresh retries at its own pace
])
def test_retries_back_off_up_to_the_refresh(refresh: float, failures: int,
                                            waits: list[float]) -> None:
    schedule = Schedule(NOW)
    now = NOW
    for number, wait in enumerate(waits, 1):
        schedule = schedule.failed(now, refresh)
        assert schedule == Schedule(now + wait, number)
        now = schedule.due
    assert schedule.succeeded(now, refresh) == Schedule(now + refresh)  # the streak ends


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def rule_file(directory: Path, body: str) -> str:
    return str(write(directory, "rules.yaml", f"lists:\n  - name: feed\n{body}"))


@pytest.mark.parametrize(("fmt", "text", "counts"), [
    ("domains", "a.example\n# c\nb.example\n", {"feed": 2}),
    ("hosts", "127.0.0.1 localhost\n0.0.0.0 a.example b.example\n", {"feed": 2}),
    ("adblock", "||a.example^\n@@||ok.a.example^\n", {"feed": 1, "feed-allow": 1}),
    ("rpz", "$ORIGIN rpz.test.\na.example CNAME .\nok.a.example CNAME rpz-passthru.\n",
     {"feed": 1, "feed-allow": 1}),
    ("yaml", "domains: [a.example]\nentries:\n  - id: x\n    domains: [b.example]\n",
     {"feed": 2}),
])
def test_local_source_formats(tmp_path: Path, fmt: str, text: str,
                              counts: dict[str, int]) -> None:
    write(tmp_path, "feed.txt", text)
    loaded = load_rule_set([rule_file(tmp_path, f"    source: feed.txt\n    format: {fmt}\n")])
    assert loaded.rules.counts == counts
    assert loaded.rules.would_block("www.a.example") is not None
    if "feed-allow" in counts:
        assert loaded.rules.would_block("ok.a.example") is None  # the exception wins
    [source] = loaded.sources
    assert (source.location, source.format) == (str(tmp_path / "feed.txt"), fmt)


def test_source_names_are_plain_entries(tmp_path: Path) -> None:
    write(tmp_path, "feed.txt", "a.example\n")
    rules = load_rules([rule_file(tmp_path, "    action: refused\n    source: feed.txt\n")])
    found = rules.would_block("a.example")
    assert found is not None
    rule, domain = found
    assert (rule.list.name, rule.entry_id, rule.list.action, domain) == (
        "feed", "", "refused", "a.example")


def test_unusable_lines_are_noted_with_file_and_line(tmp_path: Path) -> None:
    feed = write(tmp_path, "feed.txt", "||a.example^\nexample.org##.ad\n||b.example^$third-party\n")
    loaded = load_rule_set([rule_file(tmp_path, "    source: feed.txt\n    format: adblock\n")])
    assert loaded.notes == (f"{feed}:2: cosmetic filter (hides page elements): not a DNS rule",
                            f"{feed}:3: option $third-party narrows the rule to some requests, "
                            "sites or clients: a DNS answer cannot")
    assert loaded.rules.counts["feed"] == 1


def test_exceptions_of_a_dry_run_list_are_not_used(tmp_path: Path) -> None:
    feed = write(tmp_path, "feed.txt", "||a.example^\n@@||ok.a.example^\n")
    loaded = load_rule_set([rule_file(
        tmp_path, "    mode: dry-run\n    source: feed.txt\n    format: adblock\n")])
    assert loaded.rules.counts == {"feed": 1}
    assert loaded.notes == (f"{feed}:2: an exception (allow) in a dry-run list: not used",)


def test_many_unusable_lines_are_counted(tmp_path: Path) -> None:
    write(tmp_path, "feed.txt", "a.example\n" + "bad..name\n" * 30)
    loaded = load_rule_set([rule_file(tmp_path, "    source: feed.txt\n")])
    assert len(loaded.notes) == 21
    assert loaded.notes[-1].endswith("10 more unusable lines (30 in all, 1 names taken)")


@pytest.mark.parametrize(("body", "files", "problem"), [
    ("    source: missing.txt\n", {}, "missing.txt: cannot read: No such file or directory"),
    ("    source: feed.txt\n", {"feed.txt": b"\xff\xfe bad\n"}, "feed.txt: not UTF-8 text"),
    ("    source: feed.txt\n", {"feed.txt": "bad..name\nalso bad\n"},
     "feed.txt: no usable line (2 unusable; format domains)"),
    ("    source: feed.txt\n    format: yaml\n", {"feed.txt": "domains: [a..b]\n"},
     "feed.txt:1: 'a..b' is not a valid name: empty label"),
    ("    source: feed.txt\n    domains: [a.example]\n", {"feed.txt": "b.example\n"},
     "rules.yaml:4: lists[0].domains: a list takes its names from source or from domains"),
    ("    format: hosts\n    domains: [a.example]\n", {},
     "rules.yaml:3: lists[0].format: only with source"),
    ("    source: feed.txt\n    refresh: 1h\n", {"feed.txt": "a.example\n"},
     "rules.yaml:4: lists[0].refresh: only for URL sources"),
    ("    source: https://feeds.example/x\n    refresh: 0\n", {},
     "rules.yaml:4: lists[0].refresh: expected seconds from 1 to a year"),
    ("    source: https://feeds.example/x\n    refresh: soon\n", {},
     "rules.yaml:4: lists[0].refresh: expected seconds from 1 to a year, or a duration"),
    ("    source: https://feeds.example/x\n    format: csv\n", {},
     "rules.yaml:4: lists[0].format: 'csv' is not one of domains, hosts, adblock, rpz, yaml"),
    ("    source: https://feeds.example/x\n    sha256: abc\n", {},
     "rules.yaml:4: lists[0].sha256: 'abc' is not a SHA-256 digest"),
    ("    source: https://feeds.example/x\n    max_bytes: 0\n", {},
     "rules.yaml:4: lists[0].max_bytes: expected bytes > 0"),
    ("    source: ftp://feeds.example/x\n", {}, "rules.yaml:3: lists[0].source: "
     "'ftp://feeds.example/x': only http:// and https:// URLs"),
    ("    source: https:///x\n", {}, "'https:///x' is not a URL with a host"),
])
def test_source_problems(tmp_path: Path, body: str, files: dict[str, str | bytes],
                         problem: str) -> None:
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError) as raised:
        load_rules([rule_file(tmp_path, body)])
    assert any(problem in found for found in raised.value.problems), raised.value.problems


@pytest.mark.parametrize(("body", "refresh", "max_bytes", "sha256"), [
    ("", 86400.0, 256 << 20, None),
    ("    refresh: 6h\n    max_bytes: 64 MiB\n", 21600.0, 64 << 20, None),
    ("    refresh: 90\n    max_bytes: 1000\n", 90.0, 1000, None),
    (f"    sha256: {'AB' * 32}\n", 86400.0, 256 << 20, "ab" * 32),
])
def test_url_source_settings(tmp_path: Path, body: str, refresh: float, max_bytes: int,
                             sha256: str | None) -> None:
    loaded = load_rule_set([rule_file(tmp_path, f"    source: https://feeds.example/x\n{body}")])
    [source] = loaded.sources
    assert (source.refresh, source.max_bytes, source.sha256) == (refresh, max_bytes, sha256)
    assert source.declared == f"{tmp_path / 'rules.yaml'}:3"
    # no copy yet (no feeds given): the list is there, empty, and the note says why
    assert loaded.rules.counts == {"feed": 0}
    assert loaded.notes == (f"{source.declared}: source https://feeds.example/x: no usable "
                            "copy yet; list 'feed' is empty until a fetch succeeds",)
