"""`resolver rules diff`: every kind of change is found, and nothing else is."""

from __future__ import annotations

import pytest

from resolver.tools.common import Loaded
from resolver.tools.diff import compare, summary, summary_line

BASE = """\
lists:
  - name: ads
    ttl: 60
    clients: [10.0.0.0/8, 192.0.2.0/24]
    rollout: 50%
    starts: 2027-03-01T06:00:00Z
    entries:
      - id: acme
        name: Acme
        domains: [acme.test]
      - plain.test
"""


def load(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return Loaded.read([str(path)])


@pytest.mark.parametrize(("edit", "settings", "added", "removed"), [
    (("ttl: 60", "ttl: 30"), {"ttl": ("60", "30")}, [], []),
    (("rollout: 50%", "rollout: 12.5"), {"rollout": ("50%", "12.5%")}, [], []),
    (("clients: [10.0.0.0/8, 192.0.2.0/24]", "clients: [192.0.2.0/24]"),
     {"clients": ("10.0.0.0/8, 192.0.2.0/24", "192.0.2.0/24")}, [], []),
    (("starts: 2027-03-01T06:00:00Z", "starts: 2027-03-01T07:00:00+01:00"), {}, [], []),
    (("starts: 2027-03-01T06:00:00Z", "expires: 2027-03-01T06:00:00Z"),
     {"starts": ("2027-03-01T06:00:00Z", "(none)"), "expires": ("(none)",
                                                               "2027-03-01T06:00:00Z")}, [], []),
    (("    ttl: 60\n", "    ttl: 60\n    mode: dry-run\n"), {"mode": ("enforce", "dry-run")},
     [], []),
    (("[acme.test]", "[acme.test, acme.example]"), {}, [("acme.example", "acme")], []),
    (("      - plain.test\n", ""), {}, [], [("plain.test", "")]),
    (("Comment", "Comment"), {}, [], []),
    (("ads\n", "ads\n    # a comment\n"), {}, [], []),
])
def test_changes_of_one_list(tmp_path, edit, settings, added, removed):
    old = load(tmp_path, "old", BASE)
    new = load(tmp_path, "new", BASE.replace(*edit))
    changes = compare(old, new)
    if not (settings or added or removed):
        assert changes == []
        assert summary_line(summary(old, new, changes)).endswith(": no change")
        return
    [change] = changes
    assert (change.name, change.change) == ("ads", "changed")
    assert (change.settings, change.added, change.removed) == (settings, added, removed)


def test_entries_added_removed_renamed_and_lists_added_removed(tmp_path):
    old = load(tmp_path, "old", BASE)
    new = load(tmp_path, "new", BASE.replace("name: Acme", "name: Acme Corp").replace(
        "      - plain.test\n", "      - id: beta\n        domains: [beta.test]\n").replace(
        "name: ads", "name: ads2"))
    changes = {change.name: change for change in compare(old, new)}
    assert (changes["ads"].change, changes["ads2"].change) == ("removed", "added")
    assert changes["ads2"].entries_added == [("acme", "Acme Corp"), ("beta", "")]
    assert changes["ads"].removed == [("acme.test", "acme"), ("plain.test", "")]
    renamed = load(tmp_path, "renamed", BASE.replace("name: Acme", "name: Acme Corp"))
    [change] = compare(old, renamed)
    assert change.entries_renamed == [("acme", "Acme", "Acme Corp")]
    counts = summary(old, new, list(changes.values()))
    assert (counts["lists_added"], counts["lists_removed"], counts["domains_added"],
            counts["domains_removed"], counts["entries_added"]) == (1, 1, 2, 2, 2)
