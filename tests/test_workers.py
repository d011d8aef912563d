"""`resolver serve --workers N`: processes sharing the ports, merged metrics, reloads, shutdown.

These run the real command in a subprocess, as an operator would, and query it with dnspython
from many source ports so the kernel's SO_REUSEPORT hash spreads the queries over the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from resolver.server.supervisor import free_port
from tests.servers import LOOPBACK, NsdServer

RULES = "lists:\n  - name: first\n    domains: [blocked.test]\n"
QUERIES = 40


class Served:
    """A `resolver serve` process and where it listens."""

    def __init__(self, process: subprocess.Popen[str], port: int, metrics_port: int):
        self.process, self.port, self.metrics_port = process, port, metrics_port

    def rcode(self, name: str, tcp: bool = False) -> int:
        query = dns.message.make_query(name, "A")
        ask = dns.query.tcp if tcp else dns.query.udp
        return ask(query, LOOPBACK, port=self.port, timeout=3).rcode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []


@pytest.fixture
def serve(tmp_path: Path, nsd_upstream: NsdServer
          ) -> Iterator[tuple[Callable[[int], Served], Path]]:
    """Factory: serve(workers) starts the command and waits for its banner line."""
    started: list[subprocess.Popen[str]] = []
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    def start(workers: int) -> Served:
        port, metrics_port = free_port(), free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "--workers", str(workers),
             "--listen", f"{LOOPBACK}:{port}", "--upstream", nsd_upstream.address,
             "--rules", str(rules), "--metrics", f"{LOOPBACK}:{metrics_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stderr is not None
        banner = process.stdout.readline()
        assert "listening on" in banner, process.stderr.read()
        return Served(process, port, metrics_port)

    yield start, rules
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_two_workers_share_the_port_and_their_metrics_add_up(serve):
    start, _ = serve
    served = start(2)
    assert len(served.children()) == 2
    for _ in range(QUERIES):
        assert served.rcode("www.blocked.test") == dns.rcode.NXDOMAIN
    assert served.rcode("www.example.test") == dns.rcode.NOERROR
    assert served.rcode("www.blocked.test", tcp=True) == dns.rcode.NXDOMAIN
    values = served.metrics()
    assert values[("resolver_queries_total", (("outcome", "blocked"), ("protocol", "udp")))] \
        == QUERIES
    assert values[("resolver_queries_total", (("outcome", "blocked"), ("protocol", "tcp")))] == 1
    assert values[("resolver_workers", ())] == 2
    # the same in each worker: not summed
    assert values[("resolver_rules_domains", (("list", "first"), ("mode", "enforce")))] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_every_worker_and_a_broken_file_keeps_the_old_rules(serve, workers):
    start, rules = serve
    served = start(workers)
    rules.write_text(RULES.replace("[blocked.test]", "[blocked.test, newly.test]"))
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: served.metrics().get(
        ("resolver_reloads_total", (("result", "ok"),))) == workers)
    assert all(served.rcode(f"n{i}.newly.test") == dns.rcode.NXDOMAIN for i in range(QUERIES))

    rules.write_text("lists:\n  - name: first\n    domains: [bad..name]\n")
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: served.metrics().get(
        ("resolver_reloads_total", (("result", "failed"),))) == workers)
    assert all(served.rcode(f"n{i}.newly.test") == dns.rcode.NXDOMAIN for i in range(QUERIES))


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
    rules.write_text(RULES.replace("[blocked.test]", "[newly.test]"))
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: served.metrics().get(("resolver_reloads_total", (("result", "ok"),))) == 2)
    if broken_since:
        rules.write_text("lists:\n  - name: first\n    domains: [bad..name]\n")
        served.process.send_signal(signal.SIGHUP)
        _wait_for(lambda: served.metrics().get(
            ("resolver_reloads_total", (("result", "failed"),))) == 2)
    victim = served.children()[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: len(served.children()) == 2 and victim not in served.children())
    _wait_for(lambda: served.metrics()[("resolver_workers", ())] == 2)
    assert all(served.rcode(f"n{i}.newly.test") == dns.rcode.NXDOMAIN for i in range(QUERIES))


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
