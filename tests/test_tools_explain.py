"""`resolver rules explain`: its reasons match the matcher's conditions, its verdicts and
answers match what a running server answers."""

from __future__ import annotations

import ipaddress
import itertools
import time

import dns.asyncquery
import dns.message
import pytest

from resolver.rules.explain import covering, not_applying
from resolver.rules.model import RuleList
from resolver.rules.scope import Staging, client_address, in_rollout
from resolver.tools.common import Loaded
from resolver.tools.explain import blocked_answer, explain
from tests.e2e import TIMEOUT, ede, make_query, rrsets, where
from tests.servers import ZONE

START, END = 1_900_000_000.0, 1_900_086_400.0  # a one-day window
NETS = {"ten": ipaddress.ip_network("10.0.0.0/8"), "ten5": ipaddress.ip_network("10.5.0.0/16"),
        "v6": ipaddress.ip_network("2001:db8::/32")}
LISTS = [
    RuleList("plain"),
    RuleList("scoped", clients=(NETS["ten"], NETS["v6"])),
    RuleList("excepting", except_clients=(NETS["ten5"],)),
    RuleList("both", clients=(NETS["ten"],), except_clients=(NETS["ten5"],)),
    RuleList("none", rollout=0.0),
    RuleList("third", rollout=30.0),
    RuleList("half", rollout=50.0, clients=(NETS["ten"], NETS["v6"])),
    RuleList("window", starts=START, expires=END),
    RuleList("opens", starts=START),
    RuleList("closes", expires=END),
    RuleList("dry", mode="dry-run", rollout=70.0),
]
HOSTS = ["10.1.2.3", "10.5.1.1", "10.200.0.9", "192.0.2.1", "192.0.2.77", "2001:db8::1",
         "2001:db8:0:1::1", "2001:db9::1", "::ffff:10.1.2.3", "::ffff:10.5.0.1", "not-an-ip"]
TIMES = [START - 1, START, END - 1, END, END + 1]


@pytest.mark.parametrize("rule_list", LISTS, ids=lambda lst: lst.name)
def test_not_applying_is_exactly_when_staging_does_not_apply(rule_list):
    staging = Staging(rule_list)
    for host, now in itertools.product(HOSTS, TIMES):
        reason = not_applying(rule_list, host, now)
        assert (reason is None) == staging.applies(client_address(host), now), (host, now,
                                                                                 reason)


@pytest.mark.parametrize(("rule_list", "host", "now", "reason"), [
    (LISTS[1], "192.0.2.1", START, "client 192.0.2.1 is not in its clients (10.0.0.0/8, "
     "2001:db8::/32)"),
    (LISTS[2], "10.5.1.1", START, "client 10.5.1.1 is in its except_clients (10.5.0.0/16)"),
    (LISTS[4], "10.1.2.3", START, "client 10.1.2.3 is outside its rollout slice (0% of "
     "clients)"),
    (LISTS[7], "10.1.2.3", START - 1, "outside its time window: it starts at "
     "2030-03-17T17:46:40Z"),
    (LISTS[7], "10.1.2.3", END, "outside its time window: it expired at 2030-03-18T17:46:40Z"),
    (LISTS[0], "not-an-ip", START, None),
])
def test_reasons_say_which_condition_failed(rule_list, host, now, reason):
    assert not_applying(rule_list, host, now) == reason


STAGED = """\
lists:
  - name: a-scoped
    clients: [10.0.0.0/8]
    except_clients: [10.5.0.0/16]
    domains: [ads.test]
  - name: plain
    entries:
      - id: ads
        name: Ads Inc
        domains: [ads.test, www.ads.test]
      - tracker.test
  - name: ok
    action: allow
    domains: [ok.ads.test]
  - name: watch
    mode: dry-run
    action: refused
    domains: [ads.test, bet.test]
  - name: later
    starts: 2030-01-01T00:00:00Z
    action: sinkhole
    domains: [later.test]
"""
NOW, LATER = 1_800_000_000.0, 1_900_000_000.0  # 2027, and after later's start


@pytest.fixture
def staged(tmp_path) -> Loaded:
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED)
    return Loaded.read([str(path)])


@pytest.mark.parametrize(("name", "client", "now", "verdict", "decider", "statuses"), [
    # the scoped list is first by name at ads.test, for its clients
    ("x.ads.test", "10.1.1.1", NOW, "blocked", "a-scoped",
     ["a-scoped decides", "plain shadowed", "watch would-block"]),
    ("x.ads.test", "10.5.1.1", NOW, "blocked", "plain",
     ["a-scoped not-applying", "plain decides", "watch would-block"]),
    # a more specific plain domain beats the scoped list's
    ("www.ads.test", "10.1.1.1", NOW, "blocked", "plain",
     ["plain decides", "a-scoped shadowed", "plain shadowed", "watch would-block"]),
    # allow wins at any level, dry runs are not counted
    ("www.ok.ads.test", "10.1.1.1", NOW, "allowed", None,
     ["ok allows", "a-scoped overridden", "plain overridden", "watch overridden"]),
    ("bet.test", "192.0.2.1", NOW, "allowed", None, ["watch would-block"]),
    ("later.test", "192.0.2.1", NOW, "allowed", None, ["later not-applying"]),
    ("later.test", "192.0.2.1", LATER, "blocked", "later", ["later decides"]),
    ("nothing.test", "192.0.2.1", NOW, "allowed", None, []),
])
def test_explain_table(staged, name, client, now, verdict, decider, statuses):
    result = explain(staged, name, client, now)
    assert result.verdict == verdict
    assert (result.decider.rule.list.name if result.decider else None) == decider
    assert [f"{c.rule.list.name} {c.status}" for c in result.candidates] == statuses
    decision = staged.rules.judge(name, client, now)  # the server's own verdict
    assert (decision.block is not None) == (verdict == "blocked")
    assert {c.rule.list.name for c in result.dry_runs} == {
        rule.list.name for rule, _ in decision.dry_runs}


def test_why_allowed_says_no_match(staged):
    assert explain(staged, "Nothing.Test.", "192.0.2.1", NOW).why == (
        "allowed: no list names nothing.test or a domain above it")


def test_covering_keeps_one_rule_per_list_and_domain_most_specific_first(staged):
    found = [(rule.list.name, rule.entry_id, domain)
             for rule, domain in covering(staged.domains, "www.ads.test")]
    assert found == [("plain", "ads", "www.ads.test"), ("a-scoped", "", "ads.test"),
                     ("plain", "ads", "ads.test"), ("watch", "", "ads.test")]


# --- against a running server ----------------------------------------------------------------

IN, OUT = "127.0.0.2", "127.0.0.1"
SERVED = f"""\
lists:
  - name: scoped
    clients: [{IN}/32]
    entries:
      - id: www
        name: The Web
        domains: [{ZONE.www}]
  - name: half
    rollout: 50%
    action: sinkhole
    sinkhole: [192.0.2.99, "2001:db8::99"]
    domains: [{ZONE.mixed}]
  - name: plain
    action: nodata
    domains: [blocked.test]
  - name: deny
    action: refused
    domains: [refused.test]
  - name: watch
    mode: dry-run
    domains: [{ZONE.org_www}]
  - name: ok
    action: allow
    domains: [ok.blocked.test]
"""
CLIENTS = [f"127.0.0.{n}" for n in range(1, 9)]
QUESTIONS = [(ZONE.www, "A"), (ZONE.mixed, "A"), (ZONE.mixed, "AAAA"), (ZONE.org_www, "A"),
             ("x.blocked.test", "MX"), ("ok.blocked.test", "A"), ("refused.test", "A")]


async def test_explain_agrees_with_the_running_server(start_server, nsd_upstream, tmp_path):
    """For every client and question: the same verdict, rcode, records and EDE text as the
    server's answer over UDP from that client's address."""
    server = await start_server(nsd_upstream, rules=SERVED)
    path = tmp_path / "served.yaml"
    path.write_text(SERVED)
    loaded = Loaded.read([str(path)])
    assert loaded.rules.version == server.rules.version
    # both sides of the rollout are in the table
    assert {in_rollout("half", 50.0, client) for client in CLIENTS} == {True, False}
    host, port = where(server)
    for client, (name, rdtype) in itertools.product(CLIENTS, QUESTIONS):
        result = explain(loaded, name, client, time.time())
        query = make_query(name, rdtype, edns=0)
        response = await dns.asyncquery.udp(query, host, port=port, source=client,
                                            timeout=TIMEOUT)
        case = (client, name, rdtype, result.why)
        if result.decider is None:  # forwarded: what the upstream itself answers
            direct = await dns.asyncquery.udp(query, nsd_upstream.host, port=nsd_upstream.port,
                                              timeout=TIMEOUT)
            assert not ede(response), case
            assert response.rcode() == direct.rcode(), case
            assert rrsets(response.answer) == rrsets(direct.answer), case
            continue
        answer = blocked_answer(loaded, result.decider, server.config.blocking,
                                result.name, rdtype, client)
        expected = dns.message.from_wire(answer.data)
        assert response.rcode() == expected.rcode(), case
        assert rrsets(response.answer) == rrsets(expected.answer), case
        assert rrsets(response.authority) == rrsets(expected.authority), case
        assert ede(response) == ede(expected) != [], case
    assert server.metrics.blocked.counts  # the table did block something
