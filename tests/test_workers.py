"""`resolver serve --workers N`: processes sharing the ports, merged metrics, reloads, shutdown.

These run the real command in a subprocess, as an operator would, and query it with dnspython
from many source ports so the kernel's SO_REUSEPORT hash spreads the queries over the workers.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from resolver.rules.loader import load_rules
from resolver.server.supervisor import free_port, send_whole
from tests.e2e import promtool_check
from tests.servers import LOOPBACK, NsdServer

RULES = "lists:\n  - name: first\n    domains: [blocked.test, b1.test, b2.test, b3.test]\n"
BROKEN = "lists:\n  - name: first\n    domains: [bad..name]\n"
QUERIES = 40
OK, FAILED, REFUSED, UNCHANGED = "ok", "failed", "refused", "unchanged"


def reloads(result: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("resolver_reloads_total", (("result", result),))


def serving(version: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("resolver_rules_info", (("version", version),))


def queries(protocol: str, outcome: str, rcode: str, qtype: str = "A"
            ) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("resolver_queries_total", (("outcome", outcome), ("protocol", protocol),
                                       ("qtype", qtype), ("rcode", rcode)))


class Served:
    """A `resolver serve` process and where it listens."""

    def __init__(self, process: subprocess.Popen[str], port: int, metrics_port: int,
                 upstream: str):
        self.process, self.port, self.metrics_port = process, port, metrics_port
        self.upstream = upstream  # its label

    def rcode(self, name: str, tcp: bool = False) -> int:
        query = dns.message.make_query(name, "A")
        ask = dns.query.tcp if tcp else dns.query.udp
        return ask(query, LOOPBACK, port=self.port, timeout=3).rcode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def reload(self, force: bool = False) -> tuple[int, dict[str, object]]:
        """POST /-/reload: (status, JSON body)."""
        url = f"http://{LOOPBACK}:{self.metrics_port}/-/reload" + ("?force=1" if force else "")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="POST"),
                                        timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def all_blocked(self, prefix: str) -> bool:
        """Many source ports, so every worker is asked."""
        return all(self.rcode(f"n{i}.{prefix}") == dns.rcode.NXDOMAIN for i in range(QUERIES))


class Start(Protocol):
    def __call__(self, workers: int, watch: float = ...) -> Served: ...


@pytest.fixture
def serve(tmp_path: Path, nsd_upstream: NsdServer) -> Iterator[tuple[Start, Path]]:
    """Factory: serve(workers, watch=0) starts the command and waits for its banner line.
    The config file sets blocking.watch_interval (0: off, so only the test's reloads run)."""
    started: list[subprocess.Popen[str]] = []
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    def start(workers: int, watch: float = 0.0) -> Served:
        port, metrics_port = free_port(), free_port()
        config = tmp_path / "resolver.yaml"
        config.write_text(f"blocking:\n  watch_interval: {watch}\n")
        process = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "-c", str(config),
             "--workers", str(workers),
             "--listen", f"{LOOPBACK}:{port}", "--upstream", nsd_upstream.address,
             "--rules", str(rules), "--metrics", f"{LOOPBACK}:{metrics_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stderr is not None
        banner = process.stdout.readline()
        assert "listening on" in banner, process.stderr.read()
        return Served(process, port, metrics_port, nsd_upstream.address)

    yield start, rules
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_two_workers_share_the_port_and_their_metrics_add_up(serve):
    start, rules = serve
    served = start(2)
    assert len(served.children()) == 2
    for _ in range(QUERIES):
        assert served.rcode("www.blocked.test") == dns.rcode.NXDOMAIN
    assert served.rcode("www.example.test") == dns.rcode.NOERROR
    assert served.rcode("www.blocked.test", tcp=True) == dns.rcode.NXDOMAIN
    values = served.metrics()
    assert values[queries("udp", "blocked", "NXDOMAIN")] == QUERIES
    assert values[queries("tcp", "blocked", "NXDOMAIN")] == 1
    assert values[queries("udp", "forwarded", "NOERROR")] == 1
    assert values[("resolver_workers", ())] == 2
    domains = [value for (name, _), value in values.items() if name == "resolver_rules_domains"]
    assert sum(domains) == 4  # the same in each worker: not summed
    assert values[serving(load_rules([str(rules)]).version)] == 2  # workers serving it
    assert {result: values[reloads(result)] for result in (OK, FAILED, REFUSED, UNCHANGED)} \
        == dict.fromkeys((OK, FAILED, REFUSED, UNCHANGED), 0)


def test_two_workers_merge_histograms_and_report_each_process(serve):
    start, _ = serve
    served = start(2)
    for _ in range(QUERIES):  # over TCP, where every query is timed (pipeline.TIME_EVERY)
        assert served.rcode("www.blocked.test", tcp=True) == dns.rcode.NXDOMAIN
    assert served.rcode("www.example.test") == dns.rcode.NOERROR
    values = served.metrics()

    def get(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted(labels.items())))]

    duration = "resolver_request_duration_seconds"
    assert get(f"{duration}_count", outcome="blocked") == QUERIES, "both workers' rows added"
    assert get(f"{duration}_bucket", outcome="blocked", le="+Inf") == QUERIES
    assert get(f"{duration}_bucket", outcome="blocked", le="1.0") == QUERIES
    assert get(f"{duration}_count", outcome="forwarded") == 1
    assert get("resolver_upstream_duration_seconds_count", upstream=served.upstream) == 1
    assert 0 < get("resolver_upstream_duration_seconds_sum", upstream=served.upstream) < 3
    build = [labels for (name, labels), value in values.items()
             if name == "resolver_build_info" and value == 1]
    assert [dict(labels)["loop"] for labels in build] == ["uvloop"], "one build, not summed"
    for name in ("resolver_process_resident_memory_bytes", "resolver_process_open_fds",
                 "resolver_process_start_time_seconds", "resolver_process_cpu_seconds_total"):
        processes = {dict(labels)["process"]: value for (have, labels), value in values.items()
                     if have == name}
        assert set(processes) == {"supervisor", "worker-0", "worker-1"}, name
        # (a worker that just started may have used less CPU than a clock tick)
        assert all(value > 0 or name.startswith("resolver_process_cpu")
                   for value in processes.values()), name
    started = "resolver_process_start_time_seconds"
    for worker in ("worker-0", "worker-1"):  # each read in its own process, forked later
        assert get(started, process=worker) > get(started, process="supervisor")


def test_promtool_finds_nothing_to_say_of_two_workers_scrape(serve):
    start, _ = serve
    served = start(2)
    assert served.rcode("www.blocked.test") == dns.rcode.NXDOMAIN
    assert served.rcode("www.example.test") == dns.rcode.NOERROR
    url = f"http://{LOOPBACK}:{served.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'process="worker-1"' in text
    assert promtool_check(text) == ""


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_every_worker_and_a_broken_file_keeps_the_old_rules(serve, workers):
    """One compile per reload: counted once, and every worker serves the new version."""
    start, rules = serve
    served = start(workers)
    old = load_rules([str(rules)]).version
    rules.write_text(RULES.replace("[blocked.test", "[newly.test, blocked.test"))
    new = load_rules([str(rules)]).version
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: served.metrics().get(reloads(OK)) == 1)
    values = served.metrics()
    assert values.get(serving(new)) == workers and serving(old) not in values
    assert served.all_blocked("newly.test")

    rules.write_text(BROKEN)
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: served.metrics().get(reloads(FAILED)) == 1)
    assert served.metrics().get(serving(new)) == workers
    assert served.all_blocked("newly.test")


def test_the_guard_refuses_a_sighup_and_a_forced_http_reload_passes(serve):
    """With two workers: the refused set reaches none of them, the forced one all."""
    start, rules = serve
    served = start(2)
    old = load_rules([str(rules)]).version
    rules.write_text("lists:\n  - name: first\n    domains: [newly.test]\n")  # 4 -> 1
    new = load_rules([str(rules)]).version
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: served.metrics().get(reloads(REFUSED)) == 1)
    assert served.metrics().get(serving(old)) == 2
    assert served.all_blocked("blocked.test")

    status, body = served.reload()
    assert status == 409 and body["result"] == REFUSED and body["version"] == old
    assert body["problems"] == [
        "list 'first' would go from 4 to 1 domains (-3, -75%): more than "
        "blocking.guard.max_change (50%)",
        f"refused {new}; POST /-/reload?force=1 overrides the guard"]

    assert served.reload(force=True) == (200, {"result": OK, "version": new, "problems": []})
    values = served.metrics()
    assert values.get(serving(new)) == 2 and serving(old) not in values
    assert values[reloads(REFUSED)] == 2 and values[reloads(OK)] == 1
    assert served.all_blocked("newly.test")
    assert served.reload() == (200, {"result": UNCHANGED, "version": new, "problems": []})


def test_a_file_change_reloads_every_worker(serve):
    start, rules = serve
    served = start(2, watch=0.2)
    replacement = rules.with_suffix(".new")
    replacement.write_text(RULES.replace("[blocked.test", "[newly.test, blocked.test"))
    os.replace(replacement, rules)
    new = load_rules([str(rules)]).version
    _wait_for(lambda: served.metrics().get(serving(new)) == 2)
    assert served.metrics()[reloads(OK)] == 1
    assert served.all_blocked("newly.test")


def test_a_large_set_reaches_every_worker(serve):
    """50,000 domains pickle to megabytes, far more than a pipe's buffer: each worker must
    read the set whole, though the event loop made its end of the pipe non-blocking."""
    start, rules = serve
    served = start(2)
    rules.write_text("lists:\n  - name: big\n    domains:\n"
                     + "".join(f"      - d{i}.big.test\n" for i in range(50_000)))
    new = load_rules([str(rules)]).version
    assert served.reload(force=True) == (200, {"result": OK, "version": new, "problems": []})
    _wait_for(lambda: served.metrics().get(serving(new)) == 2)
    assert all(served.rcode(f"www.d{i}.big.test") == dns.rcode.NXDOMAIN
               for i in (0, 24_999, 49_999))


def test_a_killed_worker_is_replaced(serve):
    start, _ = serve
    served = start(2)
    victim = served.children()[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: len(served.children()) == 2 and victim not in served.children())
    _wait_for(lambda: served.metrics()[("resolver_workers", ())] == 2)
    assert all(served.rcode("www.blocked.test") == dns.rcode.NXDOMAIN for _ in range(QUERIES))


@pytest.mark.parametrize("broken_since", [False, True])
def test_a_worker_replaced_after_a_reload_serves_the_reloaded_rules(serve, broken_since):
    """A worker started again is forked with the last rule set that loaded, whatever the
    files hold by then (a broken file must not leave it on the startup rules)."""
    start, rules = serve
    served = start(2)
    rules.write_text(RULES.replace("blocked.test", "newly.test"))
    new = load_rules([str(rules)]).version
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: served.metrics().get(reloads(OK)) == 1)
    if broken_since:
        rules.write_text(BROKEN)
        served.process.send_signal(signal.SIGHUP)
        _wait_for(lambda: served.metrics().get(reloads(FAILED)) == 1)
    victim = served.children()[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: len(served.children()) == 2 and victim not in served.children())
    _wait_for(lambda: served.metrics()[("resolver_workers", ())] == 2)
    assert served.metrics().get(serving(new)) == 2
    assert served.all_blocked("newly.test")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("workers", [1, 2])
def test_stop_signals_end_every_process(serve, signum, workers):
    start, _ = serve
    served = start(workers)
    children = served.children()
    served.process.send_signal(signum)
    assert served.process.wait(timeout=15) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_a_worker_sends_a_message_larger_than_the_pipe_buffer_whole() -> None:
    """The event loop makes the worker's end non-blocking for its reader; a snapshot with
    many series is larger than the socket buffer, and must still arrive whole (a cut one
    left the supervisor waiting on a frame that never ended, holding its lock)."""
    ours, theirs = multiprocessing.Pipe()
    os.set_blocking(theirs.fileno(), False)  # as uvloop's add_reader leaves it
    big = ("snapshot", b"x" * 4_000_000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        received = pool.submit(ours.recv)
        send_whole(theirs, big)
        assert received.result(timeout=30) == big
    assert not os.get_blocking(theirs.fileno()), "left as the loop wants it"
    ours.close()
    theirs.close()


def test_a_worker_that_does_not_answer_is_not_counted_as_serving(serve):
    """A stopped worker's counters stay in the sums, but its gauges (the version it serves
    among them) are not reported for it."""
    start, rules = serve
    served = start(2)
    version = load_rules([str(rules)]).version
    assert served.metrics()[serving(version)] == 2
    hung = served.children()[0]
    os.kill(hung, signal.SIGSTOP)
    try:
        assert served.metrics()[serving(version)] == 1  # after the scrape's 2 s wait
    finally:
        os.kill(hung, signal.SIGCONT)
    _wait_for(lambda: served.metrics()[serving(version)] == 2)
