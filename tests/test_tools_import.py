"""`resolver rules import`: feeds into rule files the loader takes, and round trips
import -> export -> import giving the same rules for every format that can express them."""

from __future__ import annotations

import pytest

from resolver.ops.config import BlockingConfig
from resolver.rules.loader import load_rules
from resolver.tools.common import Loaded
from resolver.tools.export import hosts, rpz
from resolver.tools.importer import Imported, collect, default_name, rule_file

FEEDS = {
    "hosts": "# a hosts feed\n127.0.0.1 localhost\n0.0.0.0 ads.example tracker.example\n"
             ":: ads.example\n0.0.0.0 xn--bcher-kva.example\n",
    "domains": "# plain\nads.example\n*.wild.example\nBücher.example\n",
    "adblock": "[Adblock Plus 2.0]\n! title\n||ads.example^\n||track.example^$important\n"
               "@@||ok.ads.example^\n",
    "rpz": "$ORIGIN rpz.example.\n@ SOA ns. host. 1 2 3 4 5\n@ NS ns.\n"
           "ads.example CNAME .\n*.ads.example CNAME .\nok.ads.example CNAME rpz-passthru.\n"
           "*.ok.ads.example CNAME rpz-passthru.\nnodata.example CNAME *.\n",
}
# import format -> the export formats that can say what that feed says
ROUND_TRIPS = [("hosts", "hosts"), ("hosts", "rpz"), ("domains", "hosts"), ("domains", "rpz"),
               ("adblock", "rpz"), ("rpz", "rpz")]
EXPORTERS = {"hosts": lambda loaded: hosts(loaded, BlockingConfig()),
             "rpz": lambda loaded: rpz(loaded, BlockingConfig(), "rpz.local.", None)}


def import_text(tmp_path, fmt, text, name="feed"):
    """(rule file text, Imported, unusable lines) for a feed given as text."""
    path = tmp_path / f"{name}.{fmt}"
    path.write_text(text)
    found = Imported()
    problems = list(collect(fmt, [str(path)], found))
    return rule_file(found, "feed", "nxdomain", fmt, [str(path)]), found, problems


def load_text(tmp_path, text, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return Loaded.read([str(path)])


@pytest.mark.parametrize(("source", "target"), ROUND_TRIPS)
def test_round_trip_gives_the_same_rules(tmp_path, source, target):
    first, found, _ = import_text(tmp_path, source, FEEDS[source])
    assert found.taken > 0
    rules = load_text(tmp_path, first, "first")
    exported = "".join(f"{line}\n" for line in EXPORTERS[target](rules))
    second, _, problems = import_text(tmp_path, target, exported, "exported")
    assert problems == []
    again = load_text(tmp_path, second, "second")
    assert again.rules.version == rules.rules.version


def test_exceptions_become_an_allow_list(tmp_path):
    text, found, _ = import_text(tmp_path, "adblock", FEEDS["adblock"])
    rules = load_text(tmp_path, text, "ab")
    assert [(lst.name, lst.action) for lst in rules.lists] == [("feed", "nxdomain"),
                                                               ("feed-allow", "allow")]
    assert rules.rules.match("www.ads.example") is not None
    assert rules.rules.match("www.ok.ads.example") is None  # allow wins
    assert (list(found.blocks), list(found.allows)) == (["ads.example", "track.example"],
                                                        ["ok.ads.example"])


def test_every_unusable_line_is_reported_with_its_number(tmp_path):
    feed = ("||ads.example^\n##.banner\n/ads[0-9]+/\n||x.example^$third-party\n"
            "||y.example/path^\n||ads.example^\n")
    _, found, problems = import_text(tmp_path, "adblock", feed)
    numbers = [line.split(":")[1] for line in problems]
    assert numbers == ["2", "3", "4", "5"]
    assert "cosmetic" in problems[0] and "regular expression" in problems[1]
    assert (found.taken, found.unusable, found.repeated, found.lines) == (1, 4, 1, 6)


def test_rpz_ip_triggers_are_refused(tmp_path):
    feed = "$ORIGIN rpz.example.\n32.1.2.0.192.rpz-ip CNAME .\nlocal.example A 192.0.2.1\n"
    _, found, problems = import_text(tmp_path, "rpz", feed)
    assert found.taken == 0 and len(problems) == 2
    assert problems[0].endswith(":2: IP (response address) trigger: only names (QNAME "
                                "triggers) can be used")


def test_names_yaml_would_misread_are_quoted(tmp_path):
    feed = "on\nnull\n2001-12-14\n123\n1.5\nplain.example\n"
    text, _, _ = import_text(tmp_path, "domains", feed)
    assert '      - "on"' in text and "      - plain.example" in text
    path = tmp_path / "quoted.yaml"
    path.write_text(text)
    assert load_rules([str(path)]).counts == {"feed": 6}


@pytest.mark.parametrize(("path", "name"), [("/x/EasyList.txt", "easylist"),
                                            ("hosts", "hosts"), ("My Feed (2).txt", "my-feed-2"),
                                            ("!!!.txt", "imported")])
def test_default_list_name_is_a_valid_token(path, name):
    assert default_name(path) == name
