"""The Prometheus endpoint of a running server, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import asyncio
import platform
import struct

import dns.rcode

from resolver.server.pipeline import TIME_EVERY
from resolver.server.supervisor import free_port
from tests.conftest import METRICS_ON
from tests.e2e import (
    ask,
    make_query,
    metric,
    promtool_check,
    raw_udp_exchange,
    samples,
    scrape,
)
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
    assert metric(text, queries, protocol="udp", outcome="blocked", qtype="A",
                  rcode="NXDOMAIN") == 1
    assert metric(text, queries, protocol="udp", outcome="blocked", qtype="A",
                  rcode="NOERROR") == 1  # the sinkhole's address
    assert metric(text, queries, protocol="tcp", outcome="blocked", rcode="NXDOMAIN") == 1
    assert metric(text, queries, protocol="tcp", outcome="forwarded", qtype="A",
                  rcode="NOERROR") == 1
    assert metric(text, queries, protocol="udp", outcome="cached", qtype="A",
                  rcode="NOERROR") == 1
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
        ("resolver_queries_total", {"protocol": "udp", "outcome": "servfail", "qtype": "A",
                                    "rcode": "SERVFAIL"}),
        ("resolver_queries_total", {"protocol": "tcp", "outcome": "dropped",
                                    "qtype": "other", "rcode": "none"}),
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


# What each query below is counted under: protocol, outcome, qtype, rcode.
LABELLED = [
    ("udp", ZONE.www, "AAAA", ("udp", "forwarded", "AAAA", "NOERROR")),
    ("udp", ZONE.www, "AAAA", ("udp", "cached", "AAAA", "NOERROR")),
    ("tcp", ZONE.mixed, "TXT", ("tcp", "forwarded", "TXT", "NOERROR")),
    ("udp", "nothere.example.test", "A", ("udp", "forwarded", "A", "NXDOMAIN")),
    ("udp", "1.2.0.192.in-addr.arpa", "PTR", ("udp", "forwarded", "PTR", "REFUSED")),  # NSD's
    ("udp", "x.blocked.test", "MX", ("udp", "blocked", "MX", "NXDOMAIN")),
    ("tcp", "www.example.org", "HTTPS", ("tcp", "blocked", "HTTPS", "NXDOMAIN")),
    ("udp", "refused.test", "A", ("udp", "blocked", "A", "REFUSED")),
    ("udp", ZONE.www, "NAPTR", ("udp", "forwarded", "other", "NOERROR")),
]
FORMERR_PACKET = struct.pack("!HHHHHH", 0x5151, 0x0100, 2, 0, 0, 0)  # two questions: none


async def test_queries_by_type_and_rcode_and_how_long_they_took(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    for protocol, name, rdtype, _ in LABELLED:
        await ask(server, protocol, make_query(name, rdtype))
    await raw_udp_exchange(server, FORMERR_PACKET)
    text = await scrape(server)

    queries = "resolver_queries_total"
    expected = [key for *_, key in LABELLED] + [("udp", "formerr", "other", "FORMERR")]
    for key in set(expected):
        labels = dict(zip(("protocol", "outcome", "qtype", "rcode"), key, strict=True))
        assert metric(text, queries, **labels) == expected.count(key), key
    assert metric(text, queries) == len(expected)
    # the request histogram: every forwarded query timed (none slower than the test); of the
    # ones answered at once, the TCP ones only: these are fewer than pipeline.TIME_EVERY UDP
    # queries, so the packet cache picked none of them for timing
    assert sum(1 for key in expected if key[0] == "udp") < TIME_EVERY
    duration = "resolver_request_duration_seconds"
    for outcome in ("forwarded", "cached", "blocked", "formerr"):
        timed = sum(1 for key in expected
                    if key[1] == outcome and (outcome == "forwarded" or key[0] == "tcp"))
        assert metric(text, f"{duration}_count", outcome=outcome) == timed, outcome
        assert metric(text, f"{duration}_bucket", outcome=outcome, le="+Inf") == timed
        assert metric(text, f"{duration}_bucket", outcome=outcome, le="2.5") == timed
    forwarded = sum(1 for key in expected if key[1] == "forwarded")
    assert 0 < metric(text, f"{duration}_sum", outcome="forwarded") < 3 * forwarded
    assert 0 < metric(text, f"{duration}_sum", outcome="blocked") < 1, "the TCP one, timed"
    # every attempt sent upstream got a reply (REFUSED makes the PTR one try twice)
    upstream = {"upstream": nsd_upstream.address}
    sent = metric(text, "resolver_upstream_queries_total", **upstream)
    assert sent == 6
    assert metric(text, "resolver_upstream_duration_seconds_count", **upstream) == sent
    assert 0 < metric(text, "resolver_upstream_duration_seconds_sum", **upstream) < sent


async def test_the_build_and_the_process_are_described(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    text = await scrape(server)
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # this test's loop
    assert metric(text, "resolver_build_info", python=platform.python_version(),
                  loop="uvloop" if loop == "uvloop" else "asyncio") == 1
    main = {"process": "main"}
    assert metric(text, "resolver_process_resident_memory_bytes", **main) > 1e6
    assert metric(text, "resolver_process_open_fds", **main) >= 5  # sockets, listeners...
    assert metric(text, "resolver_process_start_time_seconds", **main) > 1.6e9
    assert metric(text, "resolver_process_cpu_seconds_total", **main) > 0


async def test_promtool_finds_nothing_to_say_of_a_live_scrape(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    for protocol, name, rdtype, _ in LABELLED:
        await ask(server, protocol, make_query(name, rdtype))
    text = await scrape(server)
    assert "resolver_request_duration_seconds_bucket" in text
    assert await asyncio.to_thread(promtool_check, text) == ""
