"""/healthz and /readyz over real HTTP: a single-process server in this test's event loop,
and `resolver serve --workers 2` in a subprocess, one of whose workers is stopped."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from resolver.ops.health import READY_WINDOW
from resolver.server.app import RunningServer
from resolver.server.supervisor import free_port
from tests.clock import FakeClock
from tests.conftest import METRICS_ON
from tests.e2e import ask, make_query
from tests.servers import LOOPBACK, ZONE, NsdServer

HTTP_TIMEOUT = 10.0  # generous: only reached when a test is about to fail


def get(port: int, path: str) -> tuple[int, str]:
    """GET path from the metrics listener: (status, body)."""
    url = f"http://{LOOPBACK}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metrics_port(server: RunningServer) -> int:
    assert server.metrics_address is not None
    return server.metrics_address[1]


async def aget(server: RunningServer, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, metrics_port(server), path)


@pytest.mark.parametrize(("path", "status"), [
    ("/metrics", 200), ("/metrics?x=1", 200), ("/healthz", 200), ("/readyz", 200),
    ("/", 404), ("/metrics/", 404), ("/metricsx", 404), ("/healthz/", 404), ("/ready", 404),
    ("/-/reload", 405),
])
async def test_paths(start_server, nsd_upstream, path, status):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    answered, body = await aget(server, path)
    assert answered == status
    if path in ("/healthz", "/readyz"):
        assert body == "ok\n"


def stall(seconds: float) -> None:
    """Block the calling thread; called on the event loop, the way a CPU-bound bug would."""
    time.sleep(seconds)


async def test_healthz_fails_while_the_event_loop_is_stalled(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        asked = pool.submit(get, metrics_port(server), "/healthz")
        stall(2.5)  # this loop is the server's: the probe goes unanswered
        status, body = asked.result(HTTP_TIMEOUT)
    assert (status, body) == (503, "the event loop of main did not answer within 1 s\n")
    assert await aget(server, "/healthz") == (200, "ok\n")


async def test_not_ready_once_it_had_to_forward_and_no_upstream_answered(start_server):
    clock = FakeClock(live=True)
    unreachable = (LOOPBACK, free_port())  # nothing listens: ICMP port unreachable
    server = await start_server(unreachable, metrics=METRICS_ON, clock=clock)
    assert await aget(server, "/readyz") == (200, "ok\n")  # nothing needed an upstream yet
    blocked = await ask(server, "udp", make_query("www.example.org"))
    assert blocked.rcode() == dns.rcode.NXDOMAIN
    assert await aget(server, "/readyz") == (200, "ok\n")  # answered locally: still none needed

    failed = await ask(server, "udp", make_query(ZONE.www))
    assert failed.rcode() == dns.rcode.SERVFAIL
    status, body = await aget(server, "/readyz")
    assert status == 503
    assert body.startswith("no upstream answered ever, and an upstream attempt failed ")
    assert await aget(server, "/healthz") == (200, "ok\n")  # alive: not for a restart

    clock.advance(READY_WINDOW + 1)  # the failure ages out: nothing needed an upstream since
    assert await aget(server, "/readyz") == (200, "ok\n")


async def test_ready_while_the_upstream_answers(start_server, nsd_upstream):
    server = await start_server(nsd_upstream, metrics=METRICS_ON)
    response = await ask(server, "udp", make_query(ZONE.www))
    assert response.rcode() == dns.rcode.NOERROR
    assert await aget(server, "/readyz") == (200, "ok\n")


# -- several workers --------------------------------------------------------------------------

@pytest.fixture
def two_workers(tmp_path: Path, nsd_upstream: NsdServer) -> Iterator[tuple[int, list[int]]]:
    """`resolver serve --workers 2`: (its metrics port, its workers' PIDs)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("lists:\n  - name: first\n    domains: [blocked.test]\n")
    port, metrics = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "resolver", "serve", "--workers", "2",
         "--listen", f"{LOOPBACK}:{port}", "--upstream", nsd_upstream.address,
         "--rules", str(rules), "--metrics", f"{LOOPBACK}:{metrics}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stderr is not None
        assert "listening on" in process.stdout.readline(), process.stderr.read()
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        yield metrics, [int(pid) for pid in children.split()]
    finally:
        process.kill()
        process.wait()


def test_a_stopped_worker_makes_healthz_fail_until_it_runs_again(two_workers):
    port, workers = two_workers
    assert len(workers) == 2
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ok\n")
    os.kill(workers[1], signal.SIGSTOP)
    try:
        status, body = get(port, "/healthz")
        assert status == 503
        assert body.startswith("the event loop of worker-")
        assert body.count("worker-") == 1  # the other one answered
        assert get(port, "/readyz") == (status, body)
    finally:
        os.kill(workers[1], signal.SIGCONT)
    # the late answer to the ping it missed is read past
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ok\n")
