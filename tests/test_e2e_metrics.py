"""The Prometheus endpoint of a running server, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import dns.rcode

from resolver.server.supervisor import free_port
from tests.conftest import METRICS_ON
from tests.e2e import ask, make_query, metric, samples, scrape
from tests.servers import ZONE

# Query names with a marker no list, entry or upstream label contains.
SECRET_NAMES = ("www.zzsecret.example.org", "zzsecret.blocked.test",
                "zzsecret.example.test", "www.zzsecret-sink.sink.test")


async def test_counts_blocks_queries_and_cache(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    await ask(server, "udp", make_query("www.example.org", "A"))  # blocked, entry 'example'
    await ask(server, "tcp", make_query("x.blocked.test", "A"))  # blocked, plain entry
    await ask(server, "udp", make_query("sink.test", "A"))  # sinkholed
    await ask(server, "tcp", make_query(ZONE.www, "A"))  # forwarded over TCP
    await ask(server, "udp", make_query(ZONE.www, "A"))  # cached
    text = await scrape(server)

    blocked = "resolver_blocked_total"
    assert metric(text, blocked, action="nxdomain", entry="example", list="tracking") == 1
    assert metric(text, blocked, action="nxdomain", entry="", list="tracking") == 1
    assert metric(text, blocked, action="sinkhole", entry="", list="sinks") == 1
    queries = "resolver_queries_total"
    assert metric(text, queries, protocol="udp", outcome="blocked") == 2
    assert metric(text, queries, protocol="tcp", outcome="blocked") == 1
    assert metric(text, queries, protocol="tcp", outcome="forwarded") == 1
    assert metric(text, queries, protocol="udp", outcome="cached") == 1
    assert metric(text, queries) == 5
    assert metric(text, "resolver_cache_total", result="hit") == 1
    assert metric(text, "resolver_cache_total", result="stored") == 1
    assert metric(text, "resolver_upstream_queries_total",
                  upstream=nsd_upstream.address, protocol="udp") == 1
    # the domains each list of RULES_YAML names, the allow list's too
    assert metric(text, "resolver_rules_domains", list="tracking", mode="enforce") == 2
    assert metric(text, "resolver_rules_domains", list="exceptions", mode="enforce") == 1
    assert metric(text, "resolver_rules_domains") == 7
    assert metric(text, "resolver_cache_entries") == 1


async def test_upstream_errors_are_counted_by_upstream_and_kind(start_server, fault_upstream):
    silent = fault_upstream("silent")
    failing = fault_upstream("servfail")
    closed = ("127.0.0.1", free_port())
    server = await start_server(closed, silent, failing, metrics=METRICS_ON,
                                upstream={"timeout": 0.2, "deadline": 2.0})
    response = await ask(server, "udp", make_query("www.example.test", "A"))
    text = await scrape(server)

    assert response.rcode() == dns.rcode.SERVFAIL
    errors = "resolver_upstream_errors_total"
    assert metric(text, errors, upstream=f"127.0.0.1:{closed[1]}", kind="network") >= 1
    assert metric(text, errors, upstream=silent.address, kind="timeout") >= 1
    assert metric(text, errors, upstream=failing.address, kind="rcode") >= 1
    assert metric(text, "resolver_queries_total", protocol="udp") == 1


async def test_servfail_of_our_own_is_an_outcome(start_server, fault_upstream):
    server = await start_server(fault_upstream("silent"), metrics=METRICS_ON,
                                upstream={"timeout": 0.2, "deadline": 0.5})
    response = await ask(server, "tcp", make_query("www.example.test", "A"))
    text = await scrape(server)

    assert response.rcode() == dns.rcode.SERVFAIL
    assert metric(text, "resolver_queries_total", protocol="tcp", outcome="servfail") == 1


async def test_no_query_name_in_any_label(start_server, nsd_upstream, fault_upstream):
    server = await start_server(fault_upstream("answer"), metrics=METRICS_ON)
    for name in SECRET_NAMES:
        for protocol in ("udp", "tcp"):
            await ask(server, protocol, make_query(name, "A"))
    text = await scrape(server)

    assert metric(text, "resolver_queries_total") == 2 * len(SECRET_NAMES)
    labels = {value for _, have, _ in samples(text) for value in have.values()}
    assert not [value for value in labels if "zzsecret" in value or "example.test" in value]
    assert "zzsecret" not in text


async def test_known_series_are_exported_at_zero_before_anything_is_counted(
        start_server, nsd_upstream):
    """So a dashboard's increase() and rate() see the first failure, the first reload..."""
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    zeros = {(name, tuple(sorted(labels.items())))
             for name, labels, value in samples(await scrape(server))
             if name.endswith("_total") and value == 0}
    upstream = nsd_upstream.address
    for name, labels in [
        ("resolver_queries_total", {"protocol": "udp", "outcome": "servfail"}),
        ("resolver_queries_total", {"protocol": "tcp", "outcome": "dropped"}),
        ("resolver_reloads_total", {"result": "failed"}),
        ("resolver_reloads_total", {"result": "refused"}),
        ("resolver_reloads_total", {"result": "unchanged"}),
        ("resolver_cache_total", {"result": "prefetch"}),
        ("resolver_cache_total", {"result": "evicted"}),
        ("resolver_upstream_queries_total", {"upstream": upstream, "protocol": "tcp"}),
        ("resolver_upstream_errors_total", {"upstream": upstream, "kind": "timeout"}),
    ]:
        assert (name, tuple(sorted(labels.items()))) in zeros, (name, labels)
    assert sum(1 for name, _ in zeros if name == "resolver_queries_total") == 18  # 2 x 9
