"""Reloading a running server: under load, guarded, over HTTP, on a file change, with its config.

The server runs in-process on 127.0.0.1 port 0 and is queried with dnspython over UDP and TCP;
POST /-/reload goes over real HTTP to its metrics listener. Nothing here bounds wall-clock
time except generous waits for something that must happen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dns.rcode
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from resolver.ops import http
from resolver.ops.config import GuardConfig, load_config
from resolver.ops.watch import Watcher
from resolver.rules.loader import load_rules
from resolver.server.app import RunningServer, running_server
from resolver.server.reload import FAILED, OK, REFUSED, UNCHANGED, watched
from tests.clock import FakeClock
from tests.conftest import METRICS_ON, RULES_YAML, resolver_config
from tests.e2e import ask, ede, make_query, metric, scrape
from tests.servers import ZONE

WAIT = 15.0  # seconds for something that must happen; reached only by a failing test
GOOD_RELOADS = 30  # each followed by a broken one: 60 reloads

# www.example.test (in NSD's zone) is blocked by BLOCKS and answered by NSD under ELSEWHERE;
# both have one domain in list flip, so the guard lets every flip through.
BLOCKS = "lists:\n  - name: flip\n    domains: [www.example.test]\n"
ELSEWHERE = "lists:\n  - name: flip\n    domains: [mixed.example.test]\n"
BROKEN = "lists:\n  - name: flip\n    domains: [www.example.test, bad..test]\n"
# Ten domains in list tracking, so a guard test can shrink it past max_change.
TEN = ("lists:\n  - name: tracking\n    domains: ["
       + ", ".join(["example.org", *(f"d{i}.test" for i in range(9))]) + "]\n")


def post(server: RunningServer, path: str, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, object]]:
    """POST to the metrics listener: (status, JSON body), whatever the status."""
    assert server.metrics_address is not None
    host, port = server.metrics_address
    request = urllib.request.Request(f"http://{host}:{port}{path}", method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server: RunningServer, path: str) -> tuple[int, str, bytes]:
    assert server.metrics_address is not None
    host, port = server.metrics_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=WAIT) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def rcode(server: RunningServer, name: str, protocol: str = "udp") -> int:
    return (await ask(server, protocol, make_query(name, "A"))).rcode()


async def test_answers_switch_exactly_once_per_good_reload_under_load(start_server,
                                                                     nsd_upstream):
    """Two clients (UDP, TCP) ask for one name without pause while the rules are reloaded,
    good and broken alternating; each good reload flips the name between blocked and
    answered. Every query is answered; each answer is that of a rule set in force while
    it was asked (good reloads begun by then, from those finished when it was sent), and
    each client's answers change exactly once per good reload, never back."""
    server = await start_server(nsd_upstream, rules=BLOCKS, blocking={"watch_interval": 0})
    path = Path(server.config.blocking.rules[0])
    begun = finished = reloads = 0  # good reloads begun and finished; all reloads finished
    # per client: (good reloads finished when sent, begun when answered, reloads finished
    # when sent, blocked)
    answers: dict[str, list[tuple[int, int, int, bool]]] = {"udp": [], "tcp": []}
    stop = False

    async def client(protocol: str) -> None:
        while not stop:
            low, sent_after = finished, reloads
            response = await ask(server, protocol, make_query(ZONE.www, "A"))
            assert response.rcode() in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR)
            answers[protocol].append((low, begun, sent_after,
                                      response.rcode() == dns.rcode.NXDOMAIN))

    async def answered_since(count: int) -> None:
        """Until both clients got an answer to a query sent after `count` reloads."""
        deadline = time.monotonic() + WAIT
        while not all(any(sent >= count for _, _, sent, _ in seen)
                      for seen in answers.values()):
            assert time.monotonic() < deadline, "the clients stopped getting answers"
            await asyncio.sleep(0.001)

    clients = [asyncio.create_task(client(protocol)) for protocol in answers]
    try:
        await answered_since(0)  # the startup rules seen by both
        for _ in range(GOOD_RELOADS):
            path.write_text(ELSEWHERE if begun % 2 == 0 else BLOCKS)
            begun += 1
            assert (await server.reload(trigger="test")).result == OK
            finished += 1
            reloads += 1
            await answered_since(reloads)
            path.write_text(BROKEN)
            assert (await server.reload(trigger="test")).result == FAILED
            reloads += 1
            await answered_since(reloads)
    finally:
        stop = True
        await asyncio.gather(*clients)

    for protocol, seen in answers.items():
        for low, high, _, blocked in seen:  # rule set e blocks the name when e is even
            assert any((e % 2 == 0) == blocked for e in range(low, high + 1)), (protocol, low)
        runs = [blocked for i, (_, _, _, blocked) in enumerate(seen)
                if i == 0 or seen[i - 1][3] != blocked]
        assert runs == [i % 2 == 0 for i in range(GOOD_RELOADS + 1)], (protocol, runs)
    assert server.metrics.reloads.counts == {("ok",): GOOD_RELOADS, ("failed",): GOOD_RELOADS}


async def test_reloads_run_one_at_a_time_in_the_order_asked(start_server, nsd_upstream,
                                                           monkeypatch):
    """A reload whose read is slow is not overtaken: the next one waits, reads the files as
    they are then, and its rules are the ones left in force (overlapping, the older read
    would have been installed last, over the newer)."""
    server = await start_server(nsd_upstream, rules=BLOCKS, blocking={"watch_interval": 0})
    path = Path(server.config.blocking.rules[0])
    reloads = server.reloads
    assert reloads is not None
    read, reads, gate = reloads.read, [], threading.Event()
    loop, started = asyncio.get_running_loop(), asyncio.Event()

    def slow_first_read():  # stands for Reloads.read
        found = read()
        reads.append(found)
        loop.call_soon_threadsafe(started.set)
        if len(reads) == 1:
            assert gate.wait(WAIT), "the test never let the first read finish"
        return found

    monkeypatch.setattr(reloads, "read", slow_first_read)
    path.write_text(ELSEWHERE)
    first = asyncio.ensure_future(server.reload())
    await asyncio.wait_for(started.wait(), WAIT)
    path.write_text(BLOCKS + "  - name: more\n    domains: [more.example.test]\n")
    newest = load_rules(server.config.blocking.rules).version
    second = asyncio.ensure_future(server.reload())
    await asyncio.sleep(0.2)  # time enough for an overlapping second reload to finish first
    gate.set()
    assert [(await first).result, (await second).result] == [OK, OK]
    assert server.rules.version == newest


async def test_an_unchanged_reload_swaps_nothing(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON,
                                blocking={"watch_interval": 0})
    before = server.rules
    path = Path(server.config.blocking.rules[0])
    path.write_text("# the same lists, written otherwise\n" + RULES_YAML.replace("[", "[ "))
    status, body = await asyncio.to_thread(post, server, "/-/reload")
    assert (status, body) == (200, {"result": UNCHANGED, "version": before.version,
                                    "problems": []})
    assert server.rules is before
    assert await rcode(server, "www.example.org") == dns.rcode.NXDOMAIN
    assert metric(await scrape(server), "resolver_reloads_total", result=UNCHANGED) == 1


async def test_the_guard_refuses_over_http_and_force_overrides(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, rules=TEN, metrics=METRICS_ON,
                                blocking={"watch_interval": 0})
    old = server.rules.version
    Path(server.config.blocking.rules[0]).write_text(
        "lists:\n  - name: tracking\n    domains: [d0.test]\n")
    new = load_rules(server.config.blocking.rules).version

    status, body = await asyncio.to_thread(post, server, "/-/reload")
    assert status == 409
    assert body == {"result": REFUSED, "version": old, "problems": [
        "list 'tracking' would go from 10 to 1 domains (-9, -90%): more than "
        "blocking.guard.max_change (50%)",
        f"refused {new}; POST /-/reload?force=1 overrides the guard"]}
    assert await rcode(server, "www.example.org") == dns.rcode.NXDOMAIN  # old rules stay

    # a web page's POST (a browser on this host) may not force it
    status, body = await asyncio.to_thread(post, server, "/-/reload?force=1",
                                           {"Origin": "http://evil.example"})
    assert status == 403 and body["version"] == ""
    assert await rcode(server, "www.example.org") == dns.rcode.NXDOMAIN

    status, body = await asyncio.to_thread(post, server, "/-/reload?force=1")
    assert (status, body) == (200, {"result": OK, "version": new, "problems": []})
    assert await rcode(server, "www.example.org") != dns.rcode.NXDOMAIN
    text = await scrape(server)
    assert metric(text, "resolver_reloads_total", result=REFUSED) == 1
    assert metric(text, "resolver_reloads_total", result=OK) == 1
    assert metric(text, "resolver_rules_info", version=new) == 1
    assert metric(text, "resolver_rules_info", version=old) == 0


async def test_a_must_resolve_name_refuses_a_reload(start_server, nsd_upstream):
    guard = GuardConfig(must_resolve=("www.example.test",))
    server = await start_server(nsd_upstream, metrics=METRICS_ON,
                                blocking={"watch_interval": 0, "guard": guard})
    path = Path(server.config.blocking.rules[0])
    path.write_text(RULES_YAML + "  - name: wide\n    domains: [example.test]\n")
    new = load_rules([str(path)]).version
    status, body = await asyncio.to_thread(post, server, "/-/reload")
    assert (status, body["result"]) == (409, REFUSED)
    assert body["problems"] == [
        "blocking.guard.must_resolve name 'www.example.test' would be blocked by list "
        "'wide' (domain 'example.test')",
        f"refused {new}; POST /-/reload?force=1 overrides the guard"]
    assert await rcode(server, ZONE.www) == dns.rcode.NOERROR


async def test_a_broken_file_over_http_fails_with_its_problems(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON,
                                blocking={"watch_interval": 0})
    path = Path(server.config.blocking.rules[0])
    path.write_text("lists:\n  - name: x\n    domains: [ok.test, bad..test]\n")
    status, body = await asyncio.to_thread(post, server, "/-/reload?force=1")
    assert status == 500 and body["result"] == FAILED
    assert body["version"] == server.rules.version
    problems = body["problems"]
    assert isinstance(problems, list) and len(problems) == 1
    assert problems[0].startswith(f"{path}:3: ") and "bad..test" in problems[0]
    assert await rcode(server, "www.example.org") == dns.rcode.NXDOMAIN


async def test_the_listener_serves_metrics_and_nothing_else(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    status, kind, body = await asyncio.to_thread(get, server, "/metrics")
    assert status == 200 and kind == CONTENT_TYPE_LATEST
    assert b"resolver_queries_total" in body
    assert (await asyncio.to_thread(get, server, "/"))[0] == 404
    assert (await asyncio.to_thread(get, server, "/-/reload"))[0] == 405
    status, body_json = await asyncio.to_thread(post, server, "/-/reload?force=maybe")
    assert status == 400 and body_json["result"] == FAILED
    assert server.metrics.reloads.counts == {}


async def test_the_version_agrees_in_metric_and_ede(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    version = server.rules.version
    assert version == load_rules(server.config.blocking.rules).version
    response = await ask(server, "udp", make_query("www.example.org", "A", edns=0))
    assert ede(response) == [(15, f"blocked by list tracking (rules {version})")]
    text = await scrape(server)
    assert metric(text, "resolver_rules_info", version=version) == 1
    assert metric(text, "resolver_rules_info") == 1


async def test_editing_a_rule_file_changes_answers_without_a_signal(start_server,
                                                                    nsd_upstream):
    server = await start_server(nsd_upstream, blocking={"watch_interval": 0.1})
    path = Path(server.config.blocking.rules[0])
    assert await rcode(server, ZONE.mixed) == dns.rcode.NOERROR
    replacement = path.with_suffix(".new")
    replacement.write_text(RULES_YAML + "  - name: added\n    domains: [mixed.example.test]\n")
    os.replace(replacement, path)  # as a deploy does: never a half-written file
    deadline = time.monotonic() + WAIT
    while await rcode(server, ZONE.mixed) != dns.rcode.NXDOMAIN:
        assert time.monotonic() < deadline, "the change was not picked up"
        await asyncio.sleep(0.05)
    assert server.metrics.reloads.counts == {("ok",): 1}


async def test_the_blocking_section_of_the_config_file_is_reloaded(
        tmp_path, nsd_upstream, caplog):
    """The TTL of blocked answers follows the config file; a listen address does not (it
    needs a restart), and the log says so. The install time is the wall clock's."""
    (tmp_path / "rules.yaml").write_text(RULES_YAML)
    config_file = tmp_path / "resolver.yaml"

    def write(ttl: int, port: int) -> None:
        config_file.write_text(
            f"server:\n  listen: ['127.0.0.1:{port}']\n"
            f"upstream:\n  servers: ['{nsd_upstream.address}']\n"
            "metrics:\n  listen: null\n"
            f"blocking:\n  rules: [rules.yaml]\n  ttl: {ttl}\n  watch_interval: 0\n")

    write(42, 0)
    config = load_config(str(config_file))
    wall = FakeClock(start=1_800_000_000.0)
    async with running_server(config, load_rules(config.blocking.rules), wall=wall) as server:
        before = await ask(server, "udp", make_query("www.example.org", "A"))
        assert before.authority[0].ttl == 42
        assert server.installed_at == 1_800_000_000.0
        write(7, 5353)
        wall.advance(100)
        with caplog.at_level(logging.WARNING):
            outcome = await server.reload()
        assert outcome.result == OK
        after = await ask(server, "udp", make_query("www.example.org", "A"))
        assert after.authority[0].ttl == 7
        assert "server.listen differs from the running value" in caplog.text
        assert server.addresses[0][1] != 5353
        assert server.installed_at == 1_800_000_100.0
        gauges = {sample.name: sample.values for sample in server.metrics.snapshot()}
        assert gauges["rules_last_reload_timestamp_seconds"] == {(): 1_800_000_100.0}


async def test_a_deleted_rule_file_fails_and_its_return_reloads(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, blocking={"watch_interval": 0.1})
    path = Path(server.config.blocking.rules[0])
    kept = path.read_text()
    path.unlink()
    deadline = time.monotonic() + WAIT
    while server.metrics.reloads.counts.get(("failed",), 0) < 1:
        assert time.monotonic() < deadline, "the deletion was not noticed"
        await asyncio.sleep(0.05)
    assert await rcode(server, "www.example.org") == dns.rcode.NXDOMAIN  # serves on
    path.write_text(kept + "  - name: back\n    domains: [back.test]\n")
    while await rcode(server, "www.back.test") != dns.rcode.NXDOMAIN:
        assert time.monotonic() < deadline, "the file's return was not noticed"
        await asyncio.sleep(0.05)
    assert server.metrics.reloads.counts == {("failed",): 1, ("ok",): 1}


async def test_a_change_made_while_the_rules_load_is_seen(tmp_path, nsd_upstream):
    """The CLI takes the watcher's baseline before it reads the rules: a file changed after
    that (while a large list loads, or workers start) is not mistaken for the rules served."""
    path = tmp_path / "rules.yaml"
    path.write_text(BLOCKS)
    config = resolver_config([nsd_upstream], [str(path)], blocking={"watch_interval": 0.1})
    watcher = Watcher(watched(config))  # as the CLI does, before reading
    rules = load_rules(config.blocking.rules)
    path.write_text(ELSEWHERE)  # changed while the server starts
    newer = load_rules(config.blocking.rules).version
    async with running_server(config, rules, watcher=watcher) as server:
        deadline = time.monotonic() + WAIT
        while server.rules.version != newer:
            assert time.monotonic() < deadline, "the change was never seen"
            await asyncio.sleep(0.05)
        assert await rcode(server, "mixed.example.test") == dns.rcode.NXDOMAIN


def test_connections_beyond_the_cap_are_closed_and_slots_come_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that connect and say nothing hold a thread each: past the cap the listener
    closes new connections at once, and serves again once one of them goes."""
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    endpoint = http.Endpoint("127.0.0.1", 0, CollectorRegistry())
    try:
        # one accept loop takes connections in order: both hold their slots before a third
        idle = [socket.create_connection(endpoint.address, timeout=5) for _ in range(2)]
        with socket.create_connection(endpoint.address, timeout=5) as third:
            assert third.recv(1) == b"", "closed at once, without a thread"
        idle.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the freed slot serves a scrape
            with socket.create_connection(endpoint.address, timeout=5) as client:
                client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                if client.recv(12).startswith(b"HTTP/1.0 200"):
                    break
            assert time.monotonic() < deadline, "the slot never came back"
            time.sleep(0.05)
        for sock in idle:
            sock.close()
    finally:
        endpoint.stop()
