"""Staged lists over real sockets: clients who see different rules never get each other's
answers (UDP and TCP, packet cache on), dry runs are counted on every query, and a rollout
slice holds for the clients in it.

Two clients on one machine: the loopback network is all of 127.0.0.0/8, so a client socket
bound to 127.0.0.2 is another client than one on 127.0.0.1.
"""

from __future__ import annotations

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from resolver.rules.scope import in_rollout
from resolver.server.app import RunningServer
from tests.e2e import TIMEOUT, ede, make_query, rrsets, where
from tests.servers import ZONE

PROTOCOLS = ["udp", "tcp"]
IN, OUT = "127.0.0.2", "127.0.0.1"  # inside and outside the scoped list's clients

STAGED = f"""\
lists:
  - name: scoped
    clients: [{IN}/32]
    entries:
      - id: www
        domains: [{ZONE.www}]
  - name: scoped-org
    clients: [{IN}]
    domains: [{ZONE.org_www}]
  - name: watch
    mode: dry-run
    action: refused
    entries:
      - id: mixed
        domains: [{ZONE.mixed}]
  - name: plain
    domains: [blocked.test]
"""


async def ask(server: RunningServer, protocol: str, query: dns.message.Message,
              source: str) -> dns.message.Message:
    """Ask from a client address of our choosing (a loopback address other than 127.0.0.1
    is another client)."""
    host, port = where(server)
    if protocol == "udp":
        return await dns.asyncquery.udp(query, host, port=port, source=source, timeout=TIMEOUT)
    return await dns.asyncquery.tcp(query, host, port=port, source=source, timeout=TIMEOUT)


def would_block(server: RunningServer) -> dict[tuple[str, ...], float]:
    sample = next(s for s in server.metrics.snapshot() if s.name == "would_block_total")
    return sample.values


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_scoped_clients_and_others_alternate_without_leaks(start_server, nsd_upstream,
                                                                 protocol):
    """The out-of-scope client's cached answer must not be replayed to the in-scope one, nor
    the in-scope client's block to the other: several rounds each, in both orders, with the
    packet cache on (an out-of-scope cache hit would otherwise be kept and replayed)."""
    server = await start_server(nsd_upstream, rules=STAGED)
    version = server.blocker.rules.version
    query = make_query(ZONE.www, "A", edns=0)
    blocked = 0
    for source in (OUT, OUT, IN, OUT, IN, IN, OUT, OUT, IN):
        response = await ask(server, protocol, query, source)
        if source == IN:
            blocked += 1
            assert response.rcode() == dns.rcode.NXDOMAIN and response.answer == []
            assert ede(response) == [(15, f"blocked by list scoped (rules {version})")]
        else:
            assert response.rcode() == dns.rcode.NOERROR
            assert rrsets(response.answer) == {(ZONE.www, "A", frozenset({ZONE.www_a}))}
    assert server.metrics.blocked.counts == {("scoped", "www", "nxdomain"): blocked}
    assert len(server.chain.packets) == 0  # nothing of a staged name was kept for replay
    # the control: a plain list's block is still kept by the packet cache (UDP only)
    for _ in range(2):
        response = await ask(server, protocol, make_query("blocked.test", "A"), IN)
        assert response.rcode() == dns.rcode.NXDOMAIN
    assert len(server.chain.packets) == (1 if protocol == "udp" else 0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_cached_cname_verdict_ignores_scoped_lists(start_server, nsd_upstream,
                                                           protocol):
    """outside.example.test is a CNAME to www.example.org, which a scoped list blocks for IN.
    The cache keeps one verdict for everyone, so scoped lists do not take part in it: both
    clients get the chain, in either order; the target itself is blocked for IN only."""
    server = await start_server(nsd_upstream, rules=STAGED)
    chain = make_query(ZONE.outside, "A")
    target = make_query(ZONE.org_www, "A")
    for source in (IN, OUT, IN, OUT):
        response = await ask(server, protocol, chain, source)
        assert response.rcode() == dns.rcode.NOERROR
        assert (ZONE.org_www, "A", frozenset({ZONE.org_www_a})) in rrsets(response.answer)
        response = await ask(server, protocol, target, source)
        assert response.rcode() == (dns.rcode.NXDOMAIN if source == IN else dns.rcode.NOERROR)
    assert server.metrics.blocked.counts == {("scoped-org", "", "nxdomain"): 2}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_dry_runs_are_counted_on_every_query_and_change_nothing(start_server,
                                                                      nsd_upstream, protocol):
    """Every query counts, the repeated ones too (the packet cache must not swallow them)."""
    server = await start_server(nsd_upstream, rules=STAGED)
    query = make_query(ZONE.mixed, "A")
    for source in (OUT, OUT, IN, OUT, IN):
        response = await ask(server, protocol, query, source)
        assert response.rcode() == dns.rcode.NOERROR
        assert rrsets(response.answer) == {(ZONE.mixed, "A", frozenset(ZONE.mixed_a))}
    assert would_block(server) == {("watch", "mixed", "refused"): 5}
    assert server.metrics.blocked.counts == {}


def rollout_clients() -> tuple[str, str]:
    """A loopback client inside the canary's 50% and one outside it (the hash is stable, so
    this picks the same two every run)."""
    hosts = [f"127.0.0.{n}" for n in range(2, 60)]
    inside = next(host for host in hosts if in_rollout("canary", 50, host))
    outside = next(host for host in hosts if not in_rollout("canary", 50, host))
    return inside, outside


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_rollout_slice_holds_for_its_clients(start_server, nsd_upstream, protocol):
    rules = f"lists:\n  - name: canary\n    rollout: 50%\n    domains: [{ZONE.www}]\n"
    server = await start_server(nsd_upstream, rules=rules)
    inside, outside = rollout_clients()
    query = make_query(ZONE.www, "A")
    for source in (outside, inside, outside, inside, inside, outside):
        response = await ask(server, protocol, query, source)
        expected = dns.rcode.NXDOMAIN if source == inside else dns.rcode.NOERROR
        assert response.rcode() == expected, source
    assert server.metrics.blocked.counts == {("canary", "", "nxdomain"): 3}
