"""`resolver rules ...` as an operator runs it: a process per command, its exit code, its
text and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resolver.ops.shipped import SHIPPED_RULES
from resolver.rules.loader import load_rules

pytestmark = pytest.mark.e2e  # every test runs the command in a process of its own

ROOT = Path(__file__).resolve().parent.parent
OLD = """\
lists:
  - name: ads
    entries:
      - id: acme
        name: Acme Ads
        domains: [acme.test, acme-cdn.test]
      - gone.test
      - stays.test
  - name: ok
    action: allow
    domains: [ok.acme.test]
"""
NEW = """\
lists:
  - name: ads
    action: sinkhole
    entries:
      - id: acme
        name: Acme Ads
        domains: [acme.test, acme-cdn.test]
      - stays.test
  - name: corp
    clients: [10.0.0.0/8]
    rollout: 25%
    domains: [social.test]
"""


def rules(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resolver", "rules", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("old", OLD), ("new", NEW)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize("tool", ["check", "explain", "diff", "replay", "export", "import"])
def test_help_documents_exit_codes(tool):
    result = rules(tool, "--help")
    assert result.returncode == 0
    assert "exit codes: 0 ok / no change, 1 problems / changes, 2 usage" in result.stdout


def test_no_tool_is_a_usage_error():
    assert rules().returncode == 2


def test_check_valid_rules(files):
    result = rules("check", files["old"])
    version = load_rules([files["old"]]).version
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"rules {version}: 4 domains blocked from 2 lists",
        "  ads: nxdomain, enforce, 4 domains", "  ok: allow, enforce, 1 domain"]


def test_check_reports_every_problem_with_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("lists:\n  - name: x\n    actoin: nxdomain\n    domains: [a..test]\n")
    result = rules("check", str(broken))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{broken}:3: lists[0].actoin: unknown key",
        f"{broken}:4: 'a..test' is not a valid name: empty label",
        "2 problems; the server would not load these rules"]


def test_check_guard_refuses_with_3(files, tmp_path):
    config = tmp_path / "resolver.yaml"
    config.write_text("blocking:\n  guard:\n    max_change: 0.2\n    must_resolve: [stays.test]\n")
    result = rules("check", files["new"], "-c", str(config), "--guard", files["old"])
    assert result.returncode == 3
    lines = result.stdout.splitlines()
    assert "guard: list 'ads' would go from 4 to 3 domains (-1, -25%): more than " \
           "blocking.guard.max_change (20%)" in lines
    assert "guard: blocking.guard.must_resolve name 'stays.test' would be blocked by list " \
           "'ads' (domain 'stays.test')" in lines
    assert lines[-1].startswith("guard: a reload from rules ") and "would be refused" in lines[-1]


def test_check_guard_passes_with_defaults(files):
    result = rules("check", files["old"], "--guard", files["old"])
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1].endswith("would pass")


def test_check_unreadable_old_rules_is_2(files, tmp_path):
    result = rules("check", files["new"], "--guard", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml: no such file or directory" in result.stderr


def test_explain_text_and_json(files):
    text = rules("explain", "www.acme.test", "--rules", files["new"], "--qtype", "AAAA")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[1] == ("blocked by list ads, entry acme (Acme Ads), domain acme.test: action "
                        "sinkhole, mode enforce")
    assert lines[2:4] == ["answer: NOERROR", "  www.acme.test. 300 IN AAAA ::"]
    data = json.loads(rules("explain", "social.test", "--rules", files["new"], "--client",
                            "192.0.2.1", "--json").stdout)
    assert (data["verdict"], data["answer"]) == ("allowed", None)
    assert data["rules"][0]["reason"] == ("does not apply: client 192.0.2.1 is not in its "
                                          "clients (10.0.0.0/8)")


def test_explain_shipped_rules_by_default():
    data = json.loads(rules("explain", "WWW.Binance.COM.", "--json").stdout)
    assert data["rules_version"] == load_rules([SHIPPED_RULES]).version
    assert data["decision"]["entry"] == "binance" and data["answer"]["rcode"] == "NXDOMAIN"


@pytest.mark.parametrize(("args", "message"), [
    (["bad..name"], "'bad..name' is not a valid name"),
    (["a.test", "--client", "nobody"], "'nobody' is not an IP address"),
    (["a.test", "--at", "2027-01-01T00:00:00"], "has no UTC offset"),
    (["a.test", "--qtype", "NOPE"], "'NOPE' is not a query type"),
])
def test_explain_bad_input_is_2(args, message):
    result = rules("explain", *args)
    assert result.returncode == 2 and message in result.stderr


def test_diff_text_json_and_exit_codes(files):
    same = rules("diff", files["old"], "--to", files["old"])
    assert same.returncode == 0 and same.stdout.endswith(": no change\n")
    result = rules("diff", files["old"], "--to", files["new"])
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].endswith(": 1 list added, 1 removed, 1 changed; 1 domain added, 2 removed; "
                             "0 entries added, 0 removed")
    assert lines[1:] == [
        "list ads changed:", "  action: nxdomain -> sinkhole", "  - gone.test",
        "list corp added: nxdomain, enforce", "  + social.test",
        "list ok removed:", "  - ok.acme.test"]
    data = json.loads(rules("diff", files["old"], "--to", files["new"], "--json").stdout)
    assert data["summary"]["lists_added"] == 1
    corp = next(item for item in data["lists"] if item["name"] == "corp")
    assert corp["domains_added"] == [{"domain": "social.test", "entry": ""}]


def test_replay_text_json_and_stdin(files, tmp_path):
    log = tmp_path / "queries.log"
    log.write_text("192.0.2.1 www.gone.test\n192.0.2.2 www.gone.test\n192.0.2.1 stays.test\n"
                   '{"schema": 1, "client": "192.0.2.3", "qname": "ok.acme.test", '
                   '"qtype": "A", "extra": true}\n')
    result = rules("replay", str(log), "--rules", files["new"], "--baseline", files["old"])
    assert result.returncode == 1 and result.stderr == ""  # no progress bar when piped
    assert "newly allowed: 2 queries, 2 clients" in result.stdout
    assert "newly blocked: 1 query, 1 client" in result.stdout  # ok.acme.test lost its allow
    assert "blocked by another rule: 1 query, 1 client" in result.stdout  # sinkhole now
    data = json.loads(rules("replay", "-", "--rules", files["new"], "--baseline", files["old"],
                            "--json", stdin=log.read_text()).stdout)
    assert data["newly_allowed"]["by_rule"] == [{"list": "ads", "entry": "", "action": "nxdomain",
                                                 "queries": 2, "clients": {"count": 2,
                                                                           "at_least": False}}]
    assert data["newly_allowed"]["top_names"] == [{"name": "www.gone.test", "queries": 2}]
    unchanged = rules("replay", str(log), "--rules", files["old"], "--baseline", files["old"])
    assert unchanged.returncode == 0


def test_replay_unknown_schema_is_2(files, tmp_path):
    log = tmp_path / "queries.log"
    log.write_text('{"schema": 9, "client": "192.0.2.1", "qname": "a.test"}\n')
    result = rules("replay", str(log), "--rules", files["new"])
    assert result.returncode == 2
    assert f"{log}:1: query log schema 9 is not known" in result.stderr


def test_export_to_a_file(files, tmp_path):
    out = tmp_path / "zone.rpz"
    result = rules("export", "--format", "rpz", "--rules", files["old"], "--origin",
                   "policy.test", "-o", str(out))
    assert (result.returncode, result.stdout) == (0, "")
    lines = out.read_text().splitlines()
    assert next(line for line in lines if not line.startswith(";")) == "$ORIGIN policy.test."
    assert "ok.acme.test 300 IN CNAME rpz-passthru." in lines


def test_import_reports_unusable_lines_and_exit_1(tmp_path):
    feed = tmp_path / "easylist.txt"
    feed.write_text("||ads.test^\n##.banner\n@@||ok.ads.test^\n")
    result = rules("import", "--format", "adblock", str(feed))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{feed}:2: cosmetic filter (hides page elements): not a DNS rule",
        "imported 2 names (1 to nxdomain, 1 to allow) from 3 lines of 1 file; 1 line could "
        "not be used, 0 repeated names taken once"]
    out = tmp_path / "out.yaml"
    out.write_text(result.stdout)
    assert load_rules([str(out)]).counts == {"easylist": 1, "easylist-allow": 1}


def test_import_clean_feed_is_0_and_writes_the_file(tmp_path):
    feed = tmp_path / "feed.hosts"
    feed.write_text("0.0.0.0 a.test\n0.0.0.0 b.test\n")
    out = tmp_path / "out.yaml"
    result = rules("import", "--format", "hosts", str(feed), "-o", str(out), "--list", "mine",
                   "--action", "refused")
    assert (result.returncode, result.stdout) == (0, "")
    loaded = load_rules([str(out)])
    assert [(lst.name, lst.action) for lst in loaded.lists] == [("mine", "refused")]
    assert rules("import", "--format", "hosts", str(feed), "--list", "Bad Name").returncode == 2
