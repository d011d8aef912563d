"""URL sources end to end: feeds served by a small HTTP server on 127.0.0.1 whose behaviour
each test sets (new content, 304, slow, broken, huge, a wrong digest, down), fetched by
rules/sources.py Feeds and reloaded into a running server, which is queried with dnspython."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.rcode
import pytest

from resolver.ops.config import Config
from resolver.rules.sources import Feeds
from resolver.server.app import RunningServer, running_server
from resolver.server.reload import load_at_start
from resolver.server.supervisor import free_port
from tests.conftest import resolver_config
from tests.e2e import make_query, udp
from tests.servers import LOOPBACK, ZONE, NsdServer
from tests.test_workers import QUERIES, Served

pytestmark = pytest.mark.e2e

NAMES = [f"n{i}.ads.test" for i in range(10)]
WWW = ZONE.www.rstrip(".")  # a name NSD answers: NOERROR unless a feed blocks it


@dataclass
class Feed:
    """What the test HTTP server answers, and what it was asked (set from the test)."""

    body: bytes = b""
    etag: str = '"1"'
    delay: float = 0.0  # seconds before the headers
    length: bool = True  # send Content-Length
    requests: list[dict[str, str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def serve(self, lines: list[str], etag: str) -> None:
        self.body, self.etag = "".join(f"{line}\n" for line in lines).encode(), etag


class _Handler(BaseHTTPRequestHandler):
    feed: Feed

    def do_GET(self) -> None:
        feed = self.feed
        feed.requests.append(dict(self.headers))
        time.sleep(feed.delay)
        if self.headers.get("If-None-Match") == feed.etag:
            feed.statuses.append(304)
            self.send_response(304)
            self.end_headers()
            return
        feed.statuses.append(200)
        self.send_response(200)
        self.send_header("ETag", feed.etag)
        if feed.length:
            self.send_header("Content-Length", str(len(feed.body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may give up (cap, timeout)
            self.wfile.write(feed.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def feed_server(feed: Feed) -> Iterator[str]:
    """Serve feed at http://127.0.0.1:PORT/list.txt until the block ends."""
    handler = type("Handler", (_Handler,), {"feed": feed})
    httpd = ThreadingHTTPServer((LOOPBACK, 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{httpd.server_address[1]}/list.txt"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def feed() -> Iterator[tuple[Feed, str]]:
    served = Feed()
    served.serve(NAMES, '"1"')
    with feed_server(served) as url:
        yield served, url


def config_for(tmp_path: Path, nsd: NsdServer, url: str, extra: str = "",
               state_dir: Path | None = None) -> Config:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"lists:\n  - name: feed\n    source: {url}\n    refresh: 60\n{extra}")
    config = resolver_config([nsd], [str(rules)])
    return replace(config, blocking=replace(
        config.blocking, guard=replace(config.blocking.guard, max_change=0.5),
        state_dir=None if state_dir is None else str(state_dir)))


@contextlib.asynccontextmanager
async def serving(config: Config, feeds: Feeds) -> AsyncIterator[RunningServer]:
    rules = await asyncio.to_thread(load_at_start, config, feeds)
    async with running_server(config, rules, feeds=feeds) as server:
        yield server


async def rcode(server: RunningServer, name: str) -> str:
    return dns.rcode.to_text((await udp(server, make_query(name))).rcode())


async def refresh(server: RunningServer, feeds: Feeds) -> str | None:
    """Fetch now, and reload as the refresh task would (which, with the refresh of 60 s,
    does nothing during a test); the reload's result, or None when nothing new came."""
    if not await asyncio.to_thread(feeds.refresh_due, True):
        return None
    return (await server.reload(trigger="source")).result


def failures(feeds: Feeds) -> dict[tuple[str, ...], int]:
    return dict(feeds.failures.counts)


async def test_changing_feed_is_refreshed_by_the_timer(
        tmp_path: Path, nsd_upstream: NsdServer, feed: tuple[Feed, str]) -> None:
    """The refresh task fetches when due: a 304 changes nothing, new content (ETag 2) is
    reloaded and the new name is blocked over real sockets."""
    served, url = feed
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"lists:\n  - name: feed\n    source: {url}\n    refresh: 1\n")
    config = resolver_config([nsd_upstream], [str(rules)])
    feeds = Feeds(None)
    async with serving(config, feeds) as server:
        assert await rcode(server, "www.n3.ads.test") == "NXDOMAIN"
        assert await rcode(server, WWW) == "NOERROR"
        first = server.rules.version
        for _ in range(50):  # the next refresh is a second away: a 304
            if served.statuses[1:]:
                break
            await asyncio.sleep(0.1)
        assert served.statuses[:2] == [200, 304]
        assert served.requests[1]["If-None-Match"] == '"1"'
        assert server.rules.version == first
        served.serve([*NAMES, WWW], '"2"')
        for _ in range(50):
            if server.rules.version != first:
                break
            await asyncio.sleep(0.1)
        assert await rcode(server, WWW) == "NXDOMAIN"
        assert server.rules.counts["feed"] == 11
        assert feeds._last_successes()[("feed",)] > 0
        assert feeds._intervals() == {("feed",): 1.0}


async def test_slow_feed_times_out_and_keeps_the_rules(
        tmp_path: Path, nsd_upstream: NsdServer, feed: tuple[Feed, str]) -> None:
    served, url = feed
    feeds = Feeds(None, connect_timeout=0.3)
    async with serving(config_for(tmp_path, nsd_upstream, url), feeds) as server:
        version = server.rules.version
        served.serve([*NAMES, WWW], '"2"')
        served.delay = 1.0
        assert await refresh(server, feeds) is None
        assert failures(feeds) == {("feed", "timeout"): 1}
        assert server.rules.version == version
        assert await rcode(server, "n1.ads.test") == "NXDOMAIN"
        assert await rcode(server, WWW) == "NOERROR"


@pytest.mark.parametrize(("body", "reason"), [
    (b"\xff\xfe\x00binary\n", "broken"),  # not UTF-8
    (b"<html><body>Service Unavailable</body></html>\n", "broken"),  # no usable line
    ("".join(f"{name}\n" for name in NAMES[:2]).encode(), "refused"),  # the guard: -80%
])
async def test_broken_or_refused_feed_keeps_the_rules(
        tmp_path: Path, nsd_upstream: NsdServer, feed: tuple[Feed, str], body: bytes,
        reason: str, caplog: pytest.LogCaptureFixture) -> None:
    served, url = feed
    state = tmp_path / "state"
    feeds = Feeds(str(state))
    async with serving(config_for(tmp_path, nsd_upstream, url, state_dir=state), feeds
                       ) as server:
        version = server.rules.version
        good = sorted((state / "sources").glob("*.feed"))[0].read_bytes()
        served.body, served.etag = body, '"2"'
        await refresh(server, feeds)
        assert failures(feeds) == {("feed", reason): 1}
        assert server.rules.version == version
        assert await rcode(server, "n9.ads.test") == "NXDOMAIN"
        # the copy on disk is still the good one, and the next try asks for everything again
        assert sorted((state / "sources").glob("*.feed"))[0].read_bytes() == good
        assert not list((state / "sources").glob("*.pending"))
        assert "new content not taken" in caplog.text
        await refresh(server, feeds)
        assert served.statuses[-1] == 200
        assert failures(feeds) == {("feed", reason): 2}


@pytest.mark.parametrize("length", [True, False])
async def test_huge_feed_is_capped(tmp_path: Path, nsd_upstream: NsdServer,
                                   feed: tuple[Feed, str], length: bool) -> None:
    """Over max_bytes: refused from Content-Length when sent, else while reading."""
    served, url = feed
    feeds = Feeds(None)
    config = config_for(tmp_path, nsd_upstream, url, "    max_bytes: 4096\n")
    async with serving(config, feeds) as server:
        version = server.rules.version
        served.serve([f"n{i}.huge.test" for i in range(2000)], '"2"')
        served.length = length
        assert await refresh(server, feeds) is None
        assert failures(feeds) == {("feed", "too_large"): 1}
        assert server.rules.version == version


async def test_sha256_pin(tmp_path: Path, nsd_upstream: NsdServer,
                          feed: tuple[Feed, str]) -> None:
    served, url = feed
    pin = hashlib.sha256(served.body).hexdigest()
    feeds = Feeds(None)
    async with serving(config_for(tmp_path, nsd_upstream, url, f"    sha256: {pin}\n"),
                       feeds) as server:
        assert server.rules.counts["feed"] == 10  # the pinned content loads
        served.serve([*NAMES, WWW], '"2"')
        assert await refresh(server, feeds) is None
        assert failures(feeds) == {("feed", "sha256"): 1}
        assert await rcode(server, WWW) == "NOERROR"


async def test_restart_with_the_feed_down_serves_the_state_dir_copy(
        tmp_path: Path, nsd_upstream: NsdServer) -> None:
    served = Feed()
    served.serve(NAMES, '"1"')
    state = tmp_path / "state"
    with feed_server(served) as url:
        config = config_for(tmp_path, nsd_upstream, url, state_dir=state)
        async with serving(config, Feeds(str(state))) as server:
            assert await rcode(server, "n2.ads.test") == "NXDOMAIN"
    # the feed is down now: a restart serves the copy (fresh, so not fetched at start)
    feeds = Feeds(str(state), connect_timeout=0.5)
    async with serving(config, feeds) as server:
        assert await rcode(server, "n2.ads.test") == "NXDOMAIN"
        assert await refresh(server, feeds) is None  # down: fails, the copy stays
        assert failures(feeds) == {("feed", "fetch"): 1}
        assert await rcode(server, "www.n2.ads.test") == "NXDOMAIN"


async def test_first_start_with_the_feed_down_serves_without_the_list(
        tmp_path: Path, nsd_upstream: NsdServer, caplog: pytest.LogCaptureFixture) -> None:
    """As Blocky does: start with what loads, log, count, retry; the list fills in later."""
    served = Feed()
    with feed_server(served) as url:
        pass  # a port nobody listens on any more
    feeds = Feeds(None, connect_timeout=0.5)
    async with serving(config_for(tmp_path, nsd_upstream, url), feeds) as server:
        assert server.rules.counts == {"feed": 0}
        assert failures(feeds) == {("feed", "fetch"): 1}
        assert "empty until a fetch succeeds" in caplog.text
        assert await rcode(server, WWW) == "NOERROR"


def test_workers_take_a_changed_feed_from_the_supervisor(
        tmp_path: Path, nsd_upstream: NsdServer, feed: tuple[Feed, str]) -> None:
    """`resolver serve --workers 2`: the supervisor fetches (workers do not) and sends every
    worker the new set; the source metrics come from the supervisor."""
    served, url = feed
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"lists:\n  - name: feed\n    source: {url}\n    refresh: 1\n")
    config = tmp_path / "resolver.yaml"
    config.write_text(f"blocking:\n  watch_interval: 0\n  state_dir: {tmp_path / 'state'}\n"
                      "  guard: {max_change: null}\n")  # the new feed is 4 times the old
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "resolver", "serve", "-c", str(config), "--workers", "2",
         "--listen", f"{LOOPBACK}:{port}", "--upstream", nsd_upstream.address,
         "--rules", str(rules), "--metrics", f"{LOOPBACK}:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stderr is not None
        banner = process.stdout.readline()
        assert "listening on" in banner, process.stderr.read()
        server = Served(process, port, metrics_port, nsd_upstream.address)
        assert server.rcode("n4.ads.test") == dns.rcode.NXDOMAIN
        served.serve([f"n{i}.new.test" for i in range(QUERIES)], '"2"')
        deadline = time.monotonic() + 15
        while not server.all_blocked("new.test"):
            assert time.monotonic() < deadline, "the workers never blocked the new names"
            time.sleep(0.2)
        metrics = server.metrics()
        assert metrics[("resolver_source_refresh_interval_seconds", (("list", "feed"),))] == 1
        last = metrics[("resolver_source_last_success_timestamp_seconds", (("list", "feed"),))]
        assert time.time() - 30 < last <= time.time() + 1
        assert len(list((tmp_path / "state" / "sources").glob("*.feed"))) == 1
    finally:
        process.kill()
        process.wait()


async def test_a_local_source_is_watched_like_a_rule_file(
        tmp_path: Path, nsd_upstream: NsdServer) -> None:
    source = tmp_path / "hosts.txt"
    source.write_text("0.0.0.0 n1.ads.test n2.ads.test n3.ads.test\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("lists:\n  - name: local\n    source: hosts.txt\n    format: hosts\n")
    config = resolver_config([nsd_upstream], [str(rules)])
    config = replace(config, blocking=replace(config.blocking, watch_interval=0.1))
    async with serving(config, Feeds(None)) as server:
        assert await rcode(server, WWW) == "NOERROR"
        source.write_text(f"0.0.0.0 n1.ads.test n2.ads.test n3.ads.test {WWW}\n")
        for _ in range(100):
            if server.rules.counts["local"] == 4:
                break
            await asyncio.sleep(0.05)
        assert await rcode(server, WWW) == "NXDOMAIN"
