"""Table tests of staged lists (rules/scope.py, RuleSet.decide, the Blocker's staged path):
precedence, client scope, rollout stability, modes, time windows on an injected clock, the
per-client contract with the packet cache, and the loader's messages for the new keys."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import logging
import pickle
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from prometheus_client import CollectorRegistry

from resolver.message import wire
from resolver.message.constants import NEVER
from resolver.message.names import to_wire
from resolver.ops.config import BlockingConfig
from resolver.ops.errors import ConfigError
from resolver.ops.metrics import Metrics
from resolver.ops.yamlnodes import YamlLoader
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.rules.model import Network, Rule, RuleList
from resolver.rules.scope import (
    Scope,
    Staging,
    bucket,
    client_address,
    in_rollout,
    rollout_key,
)
from resolver.stages.blocking import WINDOW_RECHECK, WOULD_BLOCK_LOG_EVERY, Blocker
from resolver.stages.contract import PASS, PASS_PER_CLIENT, Answered
from tests.clock import FakeClock
from tests.dnsmsg import query_packet, summary

IN, OUT = "192.0.2.10", "198.51.100.10"  # inside and outside SCOPE
T0, T1 = 1_800_000_000.0, 1_800_003_600.0  # a window of one hour, in epoch seconds
NOW = T0 + 60  # inside it


def nets(*texts: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


SCOPE = nets("192.0.2.0/24")
PLAIN = RuleList("plain")
B_PLAIN = RuleList("b-plain", "refused")  # before "plain" in name order
ALLOW = RuleList("allow", "allow")
SCOPED = RuleList("scoped", clients=SCOPE)  # after "plain" in name order
A_SCOPED = RuleList("a-scoped", "refused", clients=SCOPE)  # before it
SCOPED_ALLOW = RuleList("scoped-allow", "allow", clients=SCOPE)
DRY = RuleList("dry", mode="dry-run")
DRY2 = RuleList("dry2", "refused", mode="dry-run")
DRY_SCOPED = RuleList("dry-scoped", mode="dry-run", clients=SCOPE)
WINDOW = RuleList("window", starts=T0, expires=T1)

Pairs = list[tuple[RuleList, str]]


def ruleset(pairs: Pairs) -> RuleSet:
    lists = list({rule_list.name: rule_list for rule_list, _ in pairs}.values())
    return RuleSet(lists, [(to_wire(domain), Rule(rule_list)) for rule_list, domain in pairs])


def outcome(rules: RuleSet, name: str, client: str, now: float
            ) -> tuple[tuple[str, str] | None, tuple[str, ...], bool]:
    """(answering list and the domain it matched, dry-run lists that would block, per_client)"""
    decision = rules.judge(name, client, now)
    wire_name = to_wire(name)
    block = None
    if decision.block is not None:
        rule, offset = decision.block
        block = (rule.list.name, wire_name[offset:].decode("latin-1"))
    return block, tuple(sorted(rule.list.name for rule, _ in decision.dry_runs)), \
        decision.per_client


def at(domain: str) -> str:
    """A domain as outcome() shows the matched suffix: its wire form."""
    return to_wire(domain).decode("latin-1")


# (lists and their domains, query name, client, time) -> (answer, dry runs, per client)
PRECEDENCE = [
    pytest.param([(PLAIN, "ads.test")], "www.ads.test", IN, NOW,
                 (("plain", at("ads.test")), (), False), id="plain-blocks"),
    pytest.param([(PLAIN, "ads.test"), (B_PLAIN, "ads.test")], "ads.test", IN, NOW,
                 (("b-plain", at("ads.test")), (), False), id="same-domain-first-by-name"),
    pytest.param([(B_PLAIN, "ads.test"), (PLAIN, "ads.test")], "ads.test", IN, NOW,
                 (("b-plain", at("ads.test")), (), False), id="same-domain-file-order-moot"),
    pytest.param([(B_PLAIN, "ads.test"), (PLAIN, "www.ads.test")], "x.www.ads.test", IN, NOW,
                 (("plain", at("www.ads.test")), (), False), id="most-specific-answers"),
    pytest.param([(PLAIN, "www.ads.test"), (ALLOW, "ads.test")], "www.ads.test", IN, NOW,
                 (None, (), False), id="allow-above-wins"),
    pytest.param([(PLAIN, "ads.test"), (ALLOW, "www.ads.test")], "a.www.ads.test", IN, NOW,
                 (None, (), False), id="allow-below-wins-under-it"),
    pytest.param([(PLAIN, "ads.test"), (ALLOW, "www.ads.test")], "ads.test", IN, NOW,
                 (("plain", at("ads.test")), (), False), id="allow-below-not-above"),
    pytest.param([(SCOPED, "ads.test")], "ads.test", IN, NOW,
                 (("scoped", at("ads.test")), (), True), id="scoped-in"),
    pytest.param([(SCOPED, "ads.test")], "ads.test", OUT, NOW,
                 (None, (), True), id="scoped-out"),
    pytest.param([(PLAIN, "ads.test"), (SCOPED, "www.ads.test")], "www.ads.test", IN, NOW,
                 (("scoped", at("www.ads.test")), (), True), id="scoped-more-specific-in"),
    pytest.param([(PLAIN, "ads.test"), (SCOPED, "www.ads.test")], "www.ads.test", OUT, NOW,
                 (("plain", at("ads.test")), (), True), id="scoped-more-specific-out"),
    pytest.param([(PLAIN, "ads.test"), (A_SCOPED, "ads.test")], "ads.test", IN, NOW,
                 (("a-scoped", at("ads.test")), (), True), id="scoped-same-domain-by-name"),
    pytest.param([(PLAIN, "ads.test"), (A_SCOPED, "ads.test")], "ads.test", OUT, NOW,
                 (("plain", at("ads.test")), (), True), id="scoped-same-domain-out"),
    pytest.param([(PLAIN, "ads.test"), (SCOPED, "ads.test")], "ads.test", IN, NOW,
                 (("plain", at("ads.test")), (), True), id="plain-first-by-name"),
    pytest.param([(PLAIN, "www.ads.test"), (SCOPED_ALLOW, "ads.test")], "www.ads.test", IN,
                 NOW, (None, (), True), id="scoped-allow-in"),
    pytest.param([(PLAIN, "www.ads.test"), (SCOPED_ALLOW, "ads.test")], "www.ads.test", OUT,
                 NOW, (("plain", at("www.ads.test")), (), True), id="scoped-allow-out"),
    pytest.param([(DRY, "ads.test")], "www.ads.test", IN, NOW,
                 (None, ("dry",), True), id="dry-run-changes-nothing"),
    pytest.param([(DRY, "ads.test"), (PLAIN, "www.ads.test")], "www.ads.test", IN, NOW,
                 (("plain", at("www.ads.test")), ("dry",), True), id="dry-run-and-enforcing"),
    pytest.param([(DRY, "www.ads.test"), (PLAIN, "ads.test")], "www.ads.test", IN, NOW,
                 (("plain", at("ads.test")), ("dry",), True), id="dry-run-more-specific"),
    pytest.param([(DRY, "ads.test"), (DRY2, "www.ads.test")], "www.ads.test", IN, NOW,
                 (None, ("dry", "dry2"), True), id="every-dry-run-counted"),
    pytest.param([(DRY, "ads.test"), (DRY, "www.ads.test")], "www.ads.test", IN, NOW,
                 (None, ("dry",), True), id="a-dry-run-counted-once"),
    pytest.param([(DRY, "ads.test"), (ALLOW, "ads.test")], "ads.test", IN, NOW,
                 (None, (), False), id="dry-run-under-allow"),
    pytest.param([(DRY, "ads.test"), (SCOPED_ALLOW, "ads.test")], "ads.test", IN, NOW,
                 (None, (), True), id="dry-run-under-scoped-allow-in"),
    pytest.param([(DRY, "ads.test"), (SCOPED_ALLOW, "ads.test")], "ads.test", OUT, NOW,
                 (None, ("dry",), True), id="dry-run-under-scoped-allow-out"),
    pytest.param([(DRY_SCOPED, "ads.test")], "ads.test", IN, NOW,
                 (None, ("dry-scoped",), True), id="dry-run-scoped-in"),
    pytest.param([(DRY_SCOPED, "ads.test")], "ads.test", OUT, NOW,
                 (None, (), True), id="dry-run-scoped-out"),
    pytest.param([(WINDOW, "ads.test")], "ads.test", IN, T0 - 1,
                 (None, (), True), id="window-before"),
    pytest.param([(WINDOW, "ads.test")], "ads.test", IN, T0,
                 (("window", at("ads.test")), (), True), id="window-starts-inclusive"),
    pytest.param([(WINDOW, "ads.test")], "ads.test", IN, T1 - 0.001,
                 (("window", at("ads.test")), (), True), id="window-last-instant"),
    pytest.param([(WINDOW, "ads.test")], "ads.test", IN, T1,
                 (None, (), True), id="window-expires-exclusive"),
    pytest.param([(PLAIN, "ads.test"), (SCOPED, "other.test")], "www.ads.test", OUT, NOW,
                 (("plain", at("ads.test")), (), False), id="staged-elsewhere-not-per-client"),
    pytest.param([(SCOPED, "other.test")], "www.ads.test", IN, NOW,
                 (None, (), False), id="no-match-not-per-client"),
]


@pytest.mark.parametrize(("pairs", "name", "client", "now", "expected"), PRECEDENCE)
def test_precedence(pairs: Pairs, name: str, client: str, now: float,
                    expected: tuple[tuple[str, str] | None, tuple[str, ...], bool]) -> None:
    assert outcome(ruleset(pairs), name, client, now) == expected


@pytest.mark.parametrize(("pairs", "name", "client", "now", "expected"), PRECEDENCE)
def test_precedence_survives_pickling(pairs: Pairs, name: str, client: str, now: float,
                                      expected: tuple[tuple[str, str] | None,
                                                      tuple[str, ...], bool]) -> None:
    """Workers receive compiled sets pickled: they must decide alike."""
    rules = pickle.loads(pickle.dumps(ruleset(pairs)))
    assert outcome(rules, name, client, now) == expected


def test_a_pickled_set_keeps_what_it_says() -> None:
    rules = ruleset([(PLAIN, "ads.test"), (SCOPED, "www.ads.test"), (ALLOW, "ok.ads.test")])
    again = pickle.loads(pickle.dumps(rules))
    assert (again.version, again.counts, again.lists, again.domain_count, again.staged) == (
        rules.version, rules.counts, rules.lists, rules.domain_count, rules.staged)
    assert again.match("x.ads.test") == rules.match("x.ads.test")
    assert again.would_block("www.ads.test") == rules.would_block("www.ads.test")
    assert again.example_domain() == rules.example_domain()


@pytest.mark.parametrize(("pairs", "name", "expected"), [
    ([(PLAIN, "ads.test")], "www.ads.test", ("plain", "ads.test")),
    ([(SCOPED, "ads.test")], "www.ads.test", ("scoped", "ads.test")),
    ([(WINDOW, "ads.test")], "ads.test", ("window", "ads.test")),
    ([(RuleList("none", rollout=0), "ads.test")], "ads.test", ("none", "ads.test")),
    ([(DRY, "ads.test")], "ads.test", None),  # a dry run never blocks
    ([(SCOPED, "ads.test"), (ALLOW, "ads.test")], "ads.test", None),  # allowed for everyone
    ([(PLAIN, "www.ads.test"), (ALLOW, "ads.test")], "www.ads.test", None),
    ([(PLAIN, "ads.test"), (SCOPED_ALLOW, "ads.test")], "ads.test", ("plain", "ads.test")),
    ([(PLAIN, "ads.test"), (A_SCOPED, "www.ads.test")], "www.ads.test",
     ("a-scoped", "www.ads.test")),
    ([(PLAIN, "ads.test"), (A_SCOPED, "ads.test")], "ads.test", ("a-scoped", "ads.test")),
    ([(PLAIN, "ads.test")], "other.test", None),
])
def test_would_block(pairs: Pairs, name: str, expected: tuple[str, str] | None) -> None:
    """What the reload guard's must_resolve asks: blocked for somebody, some time?"""
    found = ruleset(pairs).would_block(name)
    assert (None if found is None else (found[0].list.name, found[1])) == expected


# -- client scope ---------------------------------------------------------------------------

@pytest.mark.parametrize(("clients", "excepted", "host", "applies"), [
    (("192.0.2.0/24",), (), "192.0.2.1", True),
    (("192.0.2.0/24",), (), "192.0.2.255", True),
    (("192.0.2.0/24",), (), "192.0.3.0", False),
    (("192.0.2.0/24",), (), "::ffff:192.0.2.5", True),  # a mapped address is its IPv4 one
    (("192.0.2.0/24",), (), "2001:db8::1", False),
    (("192.0.2.0/24",), (), "not-an-address", False),
    (("192.0.2.7/32",), (), "192.0.2.7", True),
    (("192.0.2.7/32",), (), "192.0.2.6", False),
    (("2001:db8::/32",), (), "2001:db8:1::5", True),
    (("2001:db8::/32",), (), "2001:DB8::1", True),
    (("2001:db8::/32",), (), "2001:db9::1", False),
    (("2001:db8::/32",), (), "2001:db8::1%eth0", True),  # a zone index is not the address
    (("2001:db8::/32",), (), "192.0.2.1", False),
    (("0.0.0.0/0",), (), "203.0.113.9", True),
    (("0.0.0.0/0",), (), "2001:db8::1", False),
    (("192.0.2.0/24", "2001:db8::/32"), ("192.0.2.128/25", "2001:db8:bad::/48"),
     "192.0.2.1", True),
    (("192.0.2.0/24", "2001:db8::/32"), ("192.0.2.128/25", "2001:db8:bad::/48"),
     "192.0.2.200", False),
    (("192.0.2.0/24", "2001:db8::/32"), ("192.0.2.128/25", "2001:db8:bad::/48"),
     "2001:db8:bad::1", False),
    (("192.0.2.0/24", "2001:db8::/32"), ("192.0.2.128/25", "2001:db8:bad::/48"),
     "2001:db8:bad0::1", True),
    ((), ("192.0.2.7/32",), "192.0.2.7", False),  # except_clients alone: all but these
    ((), ("192.0.2.7/32",), "192.0.2.8", True),
    ((), ("192.0.2.7/32",), "not-an-address", True),
])
def test_scope(clients: tuple[str, ...], excepted: tuple[str, ...], host: str,
               applies: bool) -> None:
    staging = Staging(RuleList("l", clients=nets(*clients), except_clients=nets(*excepted)))
    assert staging.applies(client_address(host), NOW) is applies


def test_a_scope_of_many_networks() -> None:
    """Networks are grouped by prefix length: many /32s and a few wider ones still match
    exactly."""
    hosts = [ipaddress.ip_address("198.18.0.0") + 2 * i for i in range(1000)]
    scope = Scope(nets(*(f"{host}/32" for host in hosts), "203.0.113.0/25", "2001:db8::/48"))
    def inside(host: object) -> bool:
        address = client_address(str(host))
        assert address is not None
        return address in scope

    for host in hosts:
        assert inside(host) and not inside(host + 1)
    assert inside("203.0.113.127") and not inside("203.0.113.128")
    assert inside("2001:db8:0:ffff::1") and not inside("2001:db8:1::1")


# -- rollout ---------------------------------------------------------------------------------

CLIENTS = [str(ipaddress.ip_address("198.18.0.0") + i) for i in range(10_000)]
PERCENTS = (0, 0.5, 1, 5, 10, 12.5, 25, 50, 75, 99.9, 100)


def rollout_members(name: str, percent: float) -> set[str]:
    return {host for host in CLIENTS if in_rollout(name, percent, host)}


def test_rollout_buckets_are_stable_across_processes() -> None:
    """The buckets of 10,000 clients, digested and pinned: the same in every process and
    after every restart (Python's salted hash would fail this in the next run)."""
    key = rollout_key("canary")
    digest = hashlib.sha256()
    for host in CLIENTS:
        address = client_address(host)
        assert address is not None
        digest.update(bucket(key, address).to_bytes(8, "big"))
    assert digest.hexdigest()[:16] == "71f9ebdd80eedb44"


def test_raising_the_rollout_only_adds_clients() -> None:
    members = [rollout_members("canary", percent) for percent in PERCENTS]
    for smaller, larger in itertools.pairwise(members):
        assert smaller <= larger
    assert members[0] == set() and members[-1] == set(CLIENTS)


@pytest.mark.parametrize("percent", PERCENTS)
def test_about_n_percent_are_in(percent: float) -> None:
    count = len(rollout_members("canary", percent))
    expected = percent / 100 * len(CLIENTS)
    spread = 4 * (len(CLIENTS) * percent / 100 * (1 - percent / 100)) ** 0.5  # 4 sigma
    assert abs(count - expected) <= spread + 1


def test_each_list_draws_its_own_slice() -> None:
    first, second = rollout_members("canary", 50), rollout_members("canary2", 50)
    assert 0.4 < len(first & second) / len(first) < 0.6  # independent, not the same half


def test_ipv6_clients_are_bucketed_by_their_64() -> None:
    """Privacy addresses change within a /64; the client must not flap in and out."""
    for network in range(200):
        prefix = f"2001:db8:{network:x}:1"
        key = rollout_key("canary")
        buckets = {bucket(key, address) for host in (f"{prefix}::1", f"{prefix}:ffff:1:2:3",
                                                     f"{prefix}:a1b2:c3d4:e5f6:789")
                   if (address := client_address(host)) is not None}
        assert len(buckets) == 1
    members = {network for network in range(200)
               if in_rollout("canary", 50, f"2001:db8:{network:x}:1::1")}
    assert 60 < len(members) < 140  # the /64s themselves are spread


def test_a_client_that_is_no_address_is_in_no_partial_rollout() -> None:
    assert not in_rollout("canary", 99.9, "not-an-address")
    assert in_rollout("canary", 100, "not-an-address")


# -- the blocking stage ---------------------------------------------------------------------

CONFIG = BlockingConfig(rules=())


T = TypeVar("T")


class Timers:
    """A recording schedule (what loop.call_later is in the server)."""

    def __init__(self) -> None:
        self.armed: list[Timer] = []

    def __call__(self, delay: float, callback: Callable[[T], object], arg: T, /) -> Timer:
        timer = Timer(delay, lambda: callback(arg))
        self.armed.append(timer)
        return timer

    def live(self) -> list[Timer]:
        return [timer for timer in self.armed if not timer.cancelled]


class Timer:
    def __init__(self, delay: float, run: Callable[[], object]):
        self.delay, self.run, self.cancelled = delay, run, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        self.run()


def ask(blocker: Blocker, name: str, client: str = IN, *, edns: bool = False
        ) -> Answered | object:
    packet = query_packet(name, edns=edns)
    return blocker.answer(wire.parse_query(packet, (client, 5353), "udp"))


def test_blocks_of_a_plain_set_are_replayed() -> None:
    blocker = Blocker(ruleset([(PLAIN, "ads.test")]), CONFIG, Metrics())
    result = ask(blocker, "ads.test")
    assert isinstance(result, Answered) and result.replay is not None
    assert result.replay[0] == NEVER
    assert ask(blocker, "other.test") is PASS


@pytest.mark.parametrize(("name", "client", "kind"), [
    ("www.scoped.test", IN, "answered-per-client"),  # this client's block
    ("www.scoped.test", OUT, PASS_PER_CLIENT),  # this client's pass: not for the next one
    ("www.plain.test", IN, "answered-replayed"),  # no staged rule in sight: as before
    ("www.plain.test", OUT, "answered-replayed"),
    ("other.test", OUT, PASS),
    ("x.both.test", OUT, "answered-per-client"),  # plain answers, but a staged rule matched
])
def test_what_depends_on_the_client_is_never_replayed(name: str, client: str,
                                                       kind: object) -> None:
    rules = ruleset([(SCOPED, "scoped.test"), (PLAIN, "plain.test"), (PLAIN, "both.test"),
                     (SCOPED, "x.both.test")])
    result = ask(Blocker(rules, CONFIG, Metrics()), name, client)
    if kind == "answered-per-client":
        assert isinstance(result, Answered) and result.replay is None
    elif kind == "answered-replayed":
        assert isinstance(result, Answered) and result.replay is not None
    else:
        assert result is kind


def test_the_ede_text_names_the_rules_version() -> None:
    rules = ruleset([(PLAIN, "ads.test"), (SCOPED, "scoped.test")])
    blocker = Blocker(rules, CONFIG, Metrics())
    for name in ("ads.test", "scoped.test"):
        result = ask(blocker, name, edns=True)
        assert isinstance(result, Answered)
        got = summary(result.data)
        assert got.edns is not None
        list_name = "plain" if name == "ads.test" else "scoped"
        text = f"blocked by list {list_name} (rules {rules.version})".encode()
        assert got.edns[3] == ((15, b"\x00\x0f" + text),)


def test_dry_runs_are_counted_and_change_no_answer() -> None:
    metrics = Metrics()
    dry = RuleList("dry", "refused", mode="dry-run")
    rules = RuleSet([PLAIN, dry], [(to_wire("ads.test"), Rule(dry, "acme")),
                                   (to_wire("www.ads.test"), Rule(PLAIN))])
    blocker = Blocker(rules, CONFIG, metrics)
    assert ask(blocker, "ads.test") is PASS_PER_CLIENT
    answered = ask(blocker, "www.ads.test")  # the enforcing list answers, the dry run counts
    assert isinstance(answered, Answered) and answered.replay is None
    assert summary(answered.data).rcode == 3  # the plain list's NXDOMAIN, not REFUSED
    would = next(s for s in metrics.snapshot() if s.name == "would_block_total")
    assert would.values == {("dry", "acme", "refused"): 2}
    assert metrics.blocked.counts == {("plain", "", "nxdomain"): 1}


def test_would_block_lines_are_rate_limited_per_list(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    other = RuleList("other-dry", mode="dry-run")
    blocker = Blocker(ruleset([(DRY, "ads.test"), (other, "else.test")]), CONFIG, Metrics(),
                      clock=clock)
    caplog.set_level(logging.INFO, logger="resolver.stages.blocking")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "would block" in r.getMessage()]

    for _ in range(5):
        ask(blocker, "www.ads.test", "192.0.2.7")
    ask(blocker, "else.test")  # another list has its own allowance
    assert lines() == [
        "would block www.ads.test for 192.0.2.7: dry-run list dry, domain ads.test, "
        "action nxdomain",
        f"would block else.test for {IN}: dry-run list other-dry, domain else.test, "
        "action nxdomain"]
    clock.advance(WOULD_BLOCK_LOG_EVERY - 1)
    ask(blocker, "ads.test")
    assert len(lines()) == 2
    clock.advance(1)
    ask(blocker, "ads.test")
    assert lines()[-1] == (f"would block ads.test for {IN}: dry-run list dry, domain ads.test,"
                           " action nxdomain (5 more not logged since the last line)")


def test_rules_domains_per_list_and_mode() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    Blocker(ruleset([(PLAIN, "a.test"), (PLAIN, "b.test"), (DRY, "c.test"),
                     (ALLOW, "ok.a.test")]), CONFIG, metrics)
    get = registry.get_sample_value
    assert get("resolver_rules_domains", {"list": "plain", "mode": "enforce"}) == 2
    assert get("resolver_rules_domains", {"list": "dry", "mode": "dry-run"}) == 1
    assert get("resolver_rules_domains", {"list": "allow", "mode": "enforce"}) == 1
    sample = next(s for s in metrics.snapshot() if s.name == "rules_domains")
    assert sample.merge == "max"  # every worker serves the same rules


def test_windows_open_and_close_at_their_instants(caplog: pytest.LogCaptureFixture) -> None:
    """The answer follows the wall clock exactly; the timer only logs, at each edge, and is
    re-armed for the next."""
    caplog.set_level(logging.INFO, logger="resolver.stages.blocking")
    wall, timers = FakeClock(start=T0 - 10), Timers()
    blocker = Blocker(ruleset([(WINDOW, "ads.test")]), CONFIG, Metrics(), wall=wall,
                      schedule=timers)
    assert ask(blocker, "ads.test") is PASS_PER_CLIENT
    [first] = timers.live()
    assert first.delay == 10
    wall.now = T0
    assert isinstance(ask(blocker, "ads.test"), Answered)  # on at once, whatever the timer
    first.fire()
    assert caplog.records[-1].getMessage() == (
        "list window is now active: its window started at 2027-01-15T08:00:00Z")
    second = timers.armed[-1]
    assert second.delay == T1 - T0 and second is not first
    wall.now = T1
    assert ask(blocker, "ads.test") is PASS_PER_CLIENT
    second.fire()
    assert caplog.records[-1].getMessage() == (
        "list window is no longer active: its window ended at 2027-01-15T09:00:00Z")
    assert timers.armed[-1] is second  # nothing left to arm


def test_a_window_timer_fired_early_waits_again() -> None:
    wall, timers = FakeClock(start=T0 - 10), Timers()
    Blocker(ruleset([(WINDOW, "ads.test")]), CONFIG, Metrics(), wall=wall, schedule=timers)
    wall.now = T0 - 4  # the wall clock was stepped back by NTP while the timer ran
    timers.armed[-1].fire()
    assert timers.armed[-1].delay == 4


def test_far_windows_are_rechecked_within_the_hour() -> None:
    wall, timers = FakeClock(start=T0 - 30 * 86400), Timers()
    Blocker(ruleset([(WINDOW, "ads.test")]), CONFIG, Metrics(), wall=wall, schedule=timers)
    assert timers.armed[-1].delay == WINDOW_RECHECK


def test_an_install_rearms_the_window_timer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resolver.stages.blocking")
    wall, timers = FakeClock(start=T0 - 10), Timers()
    blocker = Blocker(ruleset([(WINDOW, "ads.test")]), CONFIG, Metrics(), wall=wall,
                      schedule=timers)
    old = timers.armed[-1]
    later = RuleList("window", starts=T0 + 100, expires=T1)
    new_rules = ruleset([(later, "ads.test")])
    blocker.install(new_rules)
    assert old.cancelled and timers.live()[-1].delay == 110
    assert caplog.records[-1].getMessage() == (
        f"rules {new_rules.version}: list window is not active yet: its window starts at "
        "2027-01-15T08:01:40Z until 2027-01-15T09:00:00Z")
    count = len(caplog.records)
    old.fire()  # a timer of the replaced rules that fires anyway logs nothing
    assert len(caplog.records) == count
    blocker.install(ruleset([(PLAIN, "ads.test")]))
    assert not timers.live()  # no windows, no timer


# -- the loader ------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.parametrize(("settings", "expected"), [
    ("", ("enforce", (), (), 100.0, None, None)),
    ("mode: dry-run", ("dry-run", (), (), 100.0, None, None)),
    ("clients: [192.0.2.0/24, '2001:DB8::/32', 192.0.2.7]",
     ("enforce", nets("192.0.2.0/24", "2001:db8::/32", "192.0.2.7/32"), (), 100.0, None, None)),
    ("clients: 192.0.2.0/24\nexcept_clients: ['2001:db8::1']",
     ("enforce", nets("192.0.2.0/24"), nets("2001:db8::1/128"), 100.0, None, None)),
    ("except_clients: []", ("enforce", (), (), 100.0, None, None)),
    ("rollout: 25%", ("enforce", (), (), 25.0, None, None)),
    ("rollout: 12.5", ("enforce", (), (), 12.5, None, None)),
    ("rollout: '0.5 %'", ("enforce", (), (), 0.5, None, None)),
    ("rollout: 0", ("enforce", (), (), 0.0, None, None)),
    ("rollout: 100%", ("enforce", (), (), 100.0, None, None)),
    ("starts: 2027-01-15T08:00:00Z", ("enforce", (), (), 100.0, T0, None)),
    ("starts: '2027-01-15T09:00:00+01:00'", ("enforce", (), (), 100.0, T0, None)),
    ("starts: 2027-01-15 08:00:00.5z\nexpires: 2027-01-15t09:00:00-00:00",
     ("enforce", (), (), 100.0, T0 + 0.5, T1)),
])
@pytest.mark.parametrize("loader", [yaml.SafeLoader, yaml.CSafeLoader], ids=["python", "libyaml"])
def test_staging_keys(tmp_path: Path, loader: YamlLoader, settings: str,
                      expected: tuple[object, ...]) -> None:
    indented = textwrap.indent(settings, "    ")
    path = write(tmp_path, f"lists:\n  - name: l\n{indented}\n    domains: [a.test]\n")
    got = load_rules([str(path)], yaml_loader=loader).lists[0]
    assert (got.mode, got.clients, got.except_clients, got.rollout, got.starts,
            got.expires) == expected


@pytest.mark.parametrize(("text", "problems"), [
    ("lists:\n  - name: l\n    mode: log-only\n",
     ["{path}:3: lists[0].mode: 'log-only' is not one of enforce, dry-run"]),
    ("lists:\n  - name: l\n    mode: [dry-run]\n",
     ["{path}:3: lists[0].mode: expected a string, got a list"]),
    ("lists:\n  - name: l\n    action: allow\n    mode: dry-run\n",
     ["{path}:4: lists[0].mode: dry-run is not allowed with action allow"]),
    ("lists:\n  - name: l\n    clients: [192.0.2.1/24]\n",
     ["{path}:3: lists[0].clients[0]: '192.0.2.1/24' has host bits set "
      "(the network is 192.0.2.0/24)"]),
    ("lists:\n  - name: l\n    clients:\n      - 192.0.2.0/24\n      - 2001:db8::1/32\n",
     ["{path}:5: lists[0].clients[1]: '2001:db8::1/32' has host bits set "
      "(the network is 2001:db8::/32)"]),
    ("lists:\n  - name: l\n    clients: [192.0.2.0/33, example.org, 7]\n",
     ["{path}:3: lists[0].clients[0]: '192.0.2.0/33' is not a network (CIDR) or an IP "
      "address",
      "{path}:3: lists[0].clients[1]: 'example.org' is not a network (CIDR) or an IP address",
      "{path}:3: lists[0].clients[2]: expected a network like 192.0.2.0/24, got a number (7)"]),
    ("lists:\n  - name: l\n    clients: []\n",
     ["{path}:3: lists[0].clients: expected at least one network (leave clients out to apply "
      "the list to every client)"]),
    ("lists:\n  - name: l\n    except_clients: {a: b}\n",
     ["{path}:3: lists[0].except_clients: expected a list, got a mapping"]),
    ("lists:\n  - name: l\n    rollout: 120%\n",
     ["{path}:3: lists[0].rollout: 120% is not a percentage from 0% to 100%"]),
    ("lists:\n  - name: l\n    rollout: -5\n",
     ["{path}:3: lists[0].rollout: -5 is not a percentage from 0% to 100%"]),
    ("lists:\n  - name: l\n    rollout: 100.5\n",
     ["{path}:3: lists[0].rollout: 100.5 is not a percentage from 0% to 100%"]),
    ("lists:\n  - name: l\n    rollout: .nan\n",
     ["{path}:3: lists[0].rollout: .nan is not a percentage from 0% to 100%"]),
    ("lists:\n  - name: l\n    rollout: half\n",
     ["{path}:3: lists[0].rollout: expected a percentage like 25% or 12.5%, "
      "got a string (half)"]),
    ("lists:\n  - name: l\n    rollout: '50'\n",
     ["{path}:3: lists[0].rollout: expected a percentage like 25% or 12.5%, "
      "got a string (50)"]),
    ("lists:\n  - name: l\n    rollout: yes\n",
     ["{path}:3: lists[0].rollout: expected a percentage like 25% or 12.5%, "
      "got a boolean (yes)"]),
    ("lists:\n  - name: l\n    starts: 2027-01-15T08:00:00\n",
     ["{path}:3: lists[0].starts: '2027-01-15T08:00:00' has no UTC offset (add Z or +HH:MM)"]),
    ("lists:\n  - name: l\n    starts: 2027-01-15\n",
     ["{path}:3: lists[0].starts: '2027-01-15' is not an RFC 3339 time like "
      "2026-03-01T06:00:00Z"]),
    ("lists:\n  - name: l\n    expires: 2027-02-30T00:00:00Z\n",
     ["{path}:3: lists[0].expires: '2027-02-30T00:00:00Z' is not a valid time: day is out "
      "of range for month"]),
    ("lists:\n  - name: l\n    expires: 1800000000\n",
     ["{path}:3: lists[0].expires: expected an RFC 3339 time like 2026-03-01T06:00:00Z, "
      "got a number (1800000000)"]),
    ("lists:\n  - name: l\n    starts: 2027-01-15T09:00:00Z\n    expires: 2027-01-15T08:00:00Z\n",
     ["{path}:4: lists[0].expires: 2027-01-15T08:00:00Z is not after starts "
      "(2027-01-15T09:00:00Z)"]),
    ("lists:\n  - name: l\n    starts: 2027-01-15T09:00:00+01:00\n"
     "    expires: 2027-01-15T08:00:00Z\n",
     ["{path}:4: lists[0].expires: 2027-01-15T08:00:00Z is not after starts "
      "(2027-01-15T08:00:00Z)"]),
    ("lists:\n  - name: l\n    starts: 0001-01-01T00:00:00+01:00\n"
     "    expires: 9999-12-31T23:59:59-01:00\n",  # each a year out of range in UTC
     ["{path}:3: lists[0].starts: '0001-01-01T00:00:00+01:00' is outside the years 1 to "
      "9999 in UTC",
      "{path}:4: lists[0].expires: '9999-12-31T23:59:59-01:00' is outside the years 1 to "
      "9999 in UTC"]),
    ("lists:\n  - name: l\n    clients: ['::ffff:192.0.2.0/120']\n",
     ["{path}:3: lists[0].clients[0]: '::ffff:192.0.2.0/120' is an IPv4-mapped network: "
      "write 192.0.2.0/24, which IPv4 clients and mapped ones both match"]),
    ("lists:\n  - name: l\n    except_clients: ['fe80::1%eth0']\n",
     ["{path}:3: lists[0].except_clients[0]: 'fe80::1%eth0': a zone index (%...) has no "
      "place in a client network"]),
    (  # every problem at once, in line order, unknown keys still errors
        """\
        lists:
          - name: l
            mode: dry-run
            action: allow
            rollout: 101%
            clients: [10.0.0.1/8]
            canary: yes
        """,
        ["{path}:3: lists[0].mode: dry-run is not allowed with action allow",
         "{path}:5: lists[0].rollout: 101% is not a percentage from 0% to 100%",
         "{path}:6: lists[0].clients[0]: '10.0.0.1/8' has host bits set (the network is "
         "10.0.0.0/8)",
         "{path}:7: lists[0].canary: unknown key"]),
])
@pytest.mark.parametrize("loader", [yaml.SafeLoader, yaml.CSafeLoader], ids=["python", "libyaml"])
def test_staging_errors(tmp_path: Path, loader: YamlLoader, text: str,
                        problems: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_rules([str(path)], yaml_loader=loader)
    assert raised.value.problems == [problem.format(path=path) for problem in problems]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "log"}, "'log' is not one of enforce, dry-run"),
    ({"action": "allow", "mode": "dry-run"}, "an allow list cannot be dry-run"),
    ({"rollout": 101.0}, "rollout 101.0 is not a percentage 0 to 100"),
    ({"starts": T1, "expires": T0}, "expires must be after starts"),
])
def test_rule_lists_built_in_code_are_checked_too(kwargs: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(ValueError) as raised:
        RuleList("l", **kwargs)  # type: ignore[arg-type]
    assert str(raised.value) == message


def test_rollout_minus_zero_is_zero(tmp_path: Path) -> None:
    """One meaning, one version."""
    zero = load_rules([str(write(tmp_path, "lists:\n  - name: l\n    rollout: 0%\n"))])
    minus = load_rules([str(write(tmp_path, "lists:\n  - name: l\n    rollout: -0.0\n"))])
    assert zero.version == minus.version


def test_a_list_whose_window_has_ended_blocks_no_must_resolve_name() -> None:
    rules = RuleSet([RuleList("old", expires=T1)],
                    [(to_wire("ads.test"), Rule(RuleList("old", expires=T1)))])
    assert rules.would_block("www.ads.test") is not None  # some time: before T1
    assert rules.would_block("www.ads.test", now=T1 - 1) is not None
    assert rules.would_block("www.ads.test", now=T1) is None


def test_close_stops_the_window_timer() -> None:
    wall, timers = FakeClock(start=T0 - 10), Timers()
    blocker = Blocker(ruleset([(WINDOW, "ads.test")]), CONFIG, Metrics(), wall=wall,
                      schedule=timers)
    [armed] = timers.live()
    blocker.close()
    assert timers.live() == [] and armed.cancelled


def test_an_install_runs_every_listener_even_when_one_raises(
        caplog: pytest.LogCaptureFixture) -> None:
    """The packet cache must be cleared whatever a listener before it does: a stale replay
    would answer by the old rules while TCP answers by the new."""
    blocker = Blocker(ruleset([(PLAIN, "ads.test")]), CONFIG, Metrics())
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in a listener")

    blocker.on_install(broken)
    blocker.on_install(lambda: calls.append("cleared"))
    new = ruleset([(PLAIN, "other.test")])
    blocker.install(new)
    assert calls == ["cleared"] and blocker.rules is new
    assert "unexpected error after installing rules" in caplog.text


def test_a_window_at_the_end_of_the_calendar_installs_and_logs() -> None:
    """An instant no calendar shows still installs: its log line falls back to epoch seconds."""
    far = RuleList("far", expires=253402300799.0 + 3600)  # past 9999-12-31T23:59:59Z
    timers = Timers()
    blocker = Blocker(ruleset([(far, "ads.test")]), CONFIG, Metrics(), wall=FakeClock(start=T0),
                      schedule=timers)
    assert blocker.rules.version and timers.live()
