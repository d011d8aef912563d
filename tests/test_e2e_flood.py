"""A flood on loopback, bounded in time: many source addresses (127.x.y.z, spoofing being
impossible here) and source ports send a mix of valid queries, junk and ANY as fast as one
process can, while a well-behaved client on another address asks once every few
milliseconds. The server's memory must stay under a stated bound, and the client must keep
getting answers (its success rate and latency are printed, and docs/hardening.md has them).

The server runs as `resolver serve` in its own process, so its RSS is its own and the flood
competes with it only for the machine, as a real one would.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.server.supervisor import free_port
from tests.e2e import metric
from tests.servers import LOOPBACK, NsdServer

FLOOD_SECONDS = 8.0
FLOODERS = 1  # sending processes
WORKERS = 2  # the server's, as deployed by default on two cores (one per core)
# What the supervisor and its workers may hold at most, in bytes: about 35 MiB each at start
# (rules, code), plus per worker what CONFIG bounds: the answer cache 16 MiB, the packet cache
# 20,000 entries of at most about 2 KiB, the limiter 5,000 prefixes of about 300 bytes, and
# the verdicts of 65,536 addresses of about 90 bytes (docs/hardening.md).
RSS_BOUND = (1 + WORKERS) * 35 * 2**20 + WORKERS * (16 + 40 + 2 + 6) * 2**20  # 233 MiB
SUCCESS_BOUND = 0.5  # of the good client's queries answered, at least: the flood's share of
# the machine decides how many are lost in the kernel's queue before the server reads them
SOURCES_PER_ROUND = 200  # sockets, each on its own 127.x.y.z, opened for one round
HOT_PREFIXES = 20  # 127.1.0.0/24 to 127.20.0.0/24: where most of the flood comes from
CLIENT = LOOPBACK  # the well-behaved client: no flood source is in 127.0.0.0/24
CLIENT_EVERY = 0.01  # seconds between its queries
MAX_TRACKED = 5000
CONFIG = f"""\
blocking:
  watch_interval: 0
ratelimit:
  qps: 50
  burst: 100
  max_tracked: {MAX_TRACKED}
cache:
  max_bytes: 16777216
  packet_entries: 20000
"""
RULES = "lists:\n  - name: flood\n    domains: [blocked.test]\n"


def rss(pid: int) -> int:
    """The resident memory of a process and its children (the workers), in bytes."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in (pid, *map(int, children)):
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def packets(rng: random.Random) -> list[bytes]:
    """The flood's mix: blocked names (answered locally), names forwarded upstream, ANY, and
    junk of every length."""
    mix = []
    for index in range(400):
        qid = rng.getrandbits(16)
        kind = index % 4
        if kind == 0:
            name, qtype = f"r{rng.getrandbits(20)}.blocked.test", 1
        elif kind == 1:
            name, qtype = f"r{rng.getrandbits(12)}.example.test", 1
        elif kind == 2:
            name, qtype = "mixed.example.test", 255
        else:
            mix.append(rng.randbytes(rng.randrange(0, 600)))
            continue
        question = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
        mix.append(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + b"\x00"
                   + struct.pack("!HH", qtype, 1))
    return mix


def flood(port: int, seconds: float, sent: Synchronized[int]) -> None:
    """Send as fast as this process can, from a new set of source addresses every round."""
    rng = random.Random(os.getpid())
    mix = packets(rng)
    target = (LOOPBACK, port)
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sockets = []
        for index in range(SOURCES_PER_ROUND):
            # most from a few hot /24s, far over their limit; the rest from anywhere in
            # 127/8, more prefixes than the limiter tracks
            second = rng.randrange(1, 1 + HOT_PREFIXES) if index % 5 else rng.randrange(1, 255)
            third = 0 if index % 5 else rng.randrange(256)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.{second}.{third}.{rng.randrange(1, 255)}", 0))
            sock.setblocking(False)
            sockets.append(sock)
        for _ in range(20):
            for sock in sockets:
                try:
                    sock.sendto(mix[count % len(mix)], target)
                except OSError:  # the kernel's buffers are full: that is the point
                    pass
                count += 1
        for sock in sockets:
            sock.close()
    with sent.get_lock():
        sent.value += count


@pytest.fixture
def served(tmp_path: Path, nsd_upstream: NsdServer) -> Iterator[tuple[int, int, int]]:
    """`resolver serve` with rate limits on: (pid, DNS port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    (tmp_path / "resolver.yaml").write_text(CONFIG)
    (tmp_path / "rules.yaml").write_text(RULES)
    process = subprocess.Popen(
        [sys.executable, "-m", "resolver", "serve", "-c", str(tmp_path / "resolver.yaml"),
         "--workers", str(WORKERS), "--listen", f"{LOOPBACK}:{port}", "--upstream",
         nsd_upstream.address, "--rules", str(tmp_path / "rules.yaml"),
         "--metrics", f"{LOOPBACK}:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        assert "listening on" in process.stdout.readline()
        yield process.pid, port, metrics_port
        assert process.poll() is None, "the server died under the flood"
    finally:
        process.terminate()
        process.wait(10)


def test_a_flood_leaves_memory_bounded_and_a_good_client_answered(served, nsd_upstream
                                                                  ) -> None:
    pid, port, metrics_port = served
    query = dns.message.make_query("www.example.test", "A")
    dns.query.udp(query, LOOPBACK, port=port, timeout=2, source=CLIENT)  # cached from here
    sent = multiprocessing.get_context("fork").Value("q", 0)
    flooders = [multiprocessing.get_context("fork").Process(target=flood,
                                                            args=(port, FLOOD_SECONDS, sent))
                for _ in range(FLOODERS)]
    for process in flooders:
        process.start()
    latencies, failures, peak = [], 0, rss(pid)
    deadline = time.monotonic() + FLOOD_SECONDS
    while time.monotonic() < deadline:
        began = time.monotonic()
        try:
            response = dns.query.udp(query, LOOPBACK, port=port, timeout=0.5, source=CLIENT)
            assert response.rcode() == dns.rcode.NOERROR and response.answer
            latencies.append(time.monotonic() - began)
        except dns.exception.Timeout:
            failures += 1
        peak = max(peak, rss(pid))
        time.sleep(CLIENT_EVERY)
    for process in flooders:
        process.join(FLOOD_SECONDS)
    asked = len(latencies) + failures
    latencies.sort()
    print(f"\nflood: {sent.value} packets in {FLOOD_SECONDS:g} s from {FLOODERS} process(es); "
          f"good client: {len(latencies)}/{asked} answered ({len(latencies) / asked:.1%}), latency "
          f"median {statistics.median(latencies) * 1000:.2f} ms, p99 "
          f"{latencies[int(len(latencies) * 0.99) - 1] * 1000:.2f} ms, max "
          f"{latencies[-1] * 1000:.2f} ms; server RSS peak {peak / 2**20:.1f} MiB")
    assert peak < RSS_BOUND
    assert len(latencies) / asked >= SUCCESS_BOUND
    response = dns.query.tcp(query, LOOPBACK, port=port, timeout=2, source=CLIENT)
    assert response.answer, "TCP still served after the flood"
    with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    assert metric(text, "resolver_queries_total", outcome="ratelimited") > 0
    assert 0 < metric(text, "resolver_ratelimit_tracked_prefixes") <= WORKERS * MAX_TRACKED
