"""Rule-set versions: the same rules give the same version however the files say them."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.rules.loader import load_rules

ROOT = Path(__file__).resolve().parent.parent

A = """\
lists:
  - name: ads
    entries:
      - id: acme
        domains: [acme.example, cdn.acme.example]
      - tracker.example
  - name: sinks
    action: sinkhole
    sinkhole: [192.0.2.1]
    domains: [sink.example]
"""
# The same lists in the other order, their domains reordered, with comments and blank lines.
A_REORDERED = """\
# sinks first this time
lists:

  - name: sinks
    sinkhole: [192.0.2.1]   # the sinkhole address
    action: sinkhole
    domains: [SINK.example.]
  - name: ads
    entries:
      - tracker.example
      - id: acme
        domains: [cdn.acme.example, acme.example]
"""


def version(tmp_path: Path, *texts: str) -> str:
    paths = []
    for index, text in enumerate(texts):
        path = tmp_path / f"{index}.yaml"
        path.write_text(text)
        paths.append(str(path))
    return load_rules(paths).version


def test_a_version_is_twelve_hex_digits(tmp_path: Path) -> None:
    found = version(tmp_path, A)
    assert len(found) == 12 and int(found, 16) >= 0


def test_order_comments_whitespace_and_case_do_not_change_it(tmp_path: Path) -> None:
    assert version(tmp_path, A) == version(tmp_path, A_REORDERED)


def test_the_order_of_files_does_not_change_it(tmp_path: Path) -> None:
    ads, sinks = A.split("  - name: sinks")
    sinks = "lists:\n  - name: sinks" + sinks
    assert version(tmp_path, ads, sinks) == version(tmp_path, sinks, ads) == version(tmp_path, A)


@pytest.mark.parametrize("change", [
    ("tracker.example", "tracker2.example"),  # a domain
    ("id: acme", "id: acme2"),  # an entry id
    ("192.0.2.1", "192.0.2.2"),  # a setting
    ("- name: ads\n", "- name: ads\n    action: nodata\n"),  # an action
    ("name: ads", "name: ads2"),  # a list's name
])
def test_any_change_in_what_the_rules_say_changes_it(tmp_path: Path,
                                                     change: tuple[str, str]) -> None:
    before, after = change
    assert before in A
    assert version(tmp_path, A.replace(before, after)) != version(tmp_path, A)


def test_counts_are_per_list(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(A)
    assert load_rules([str(path)]).counts == {"ads": 3, "sinks": 1}


STAGED = """\
lists:
  - name: canary
    clients: [192.0.2.0/24, "2001:db8::/32"]
    except_clients: [192.0.2.7]
    rollout: 50%
    starts: 2027-01-15T08:00:00Z
    expires: 2027-01-15T09:00:00Z
    domains: [canary.example]
  - name: watch
    mode: dry-run
    domains: [watch.example]
"""
# The same settings written otherwise: networks reordered and in other forms, the rollout a
# number, the times with other UTC offsets, the keys in another order.
STAGED_REWRITTEN = """\
lists:
  - name: watch
    domains: [watch.example]
    mode: dry-run
  - name: canary
    expires: "2027-01-15T10:00:00+01:00"
    starts: 2027-01-15T03:00:00-05:00
    rollout: 50.0
    except_clients: 192.0.2.7/32
    clients: ["2001:DB8:0::/32", 192.0.2.0/24]
    domains: [canary.example]
"""


def test_staging_settings_written_otherwise_give_the_same_version(tmp_path: Path) -> None:
    assert version(tmp_path, STAGED) == version(tmp_path, STAGED_REWRITTEN)


@pytest.mark.parametrize("change", [
    ("mode: dry-run", "mode: enforce"),
    ("192.0.2.0/24", "192.0.2.0/25"),
    ("except_clients: [192.0.2.7]", "except_clients: [192.0.2.8]"),
    ("rollout: 50%", "rollout: 50.5%"),
    ("starts: 2027-01-15T08:00:00Z", "starts: 2027-01-15T08:00:01Z"),
    ("expires: 2027-01-15T09:00:00Z", "expires: 2027-01-15T09:00:00+00:30"),
])
def test_any_change_in_staging_changes_it(tmp_path: Path, change: tuple[str, str]) -> None:
    before, after = change
    assert before in STAGED
    assert version(tmp_path, STAGED.replace(before, after)) != version(tmp_path, STAGED)


def test_the_default_staging_keeps_a_plain_set_s_version(tmp_path: Path) -> None:
    """Writing the defaults out changes nothing, and a set without staged lists keeps the
    version it had before lists could be staged (pinned: the shipped list's)."""
    defaults = A.replace("  - name: ads\n", "  - name: ads\n    mode: enforce\n    rollout: 100%\n")
    assert version(tmp_path, defaults) == version(tmp_path, A)
    assert load_rules([str(ROOT / "rules" / "exchanges.yaml")]).version == "d9cb8c5b85fb"
