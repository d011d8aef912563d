"""The query log of a running server: records of real answers, through the pipeline's
observer, into a real file; and `--workers 2` writing whole lines to a shared stdout and
to a file per worker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from resolver.server.supervisor import free_port
from tests.conftest import METRICS_ON
from tests.e2e import ask, make_query, metric, scrape
from tests.servers import LOOPBACK, ZONE, NsdServer

WAIT = 10.0  # seconds for records to appear: generous, only reached when failing
QUERIES = 40


async def lines_of(path: Path, count: int) -> list[dict[str, object]]:
    """The file's records once it holds `count` (the writer thread writes every 50 ms)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= count:
            return [json.loads(line) for line in text.splitlines()]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} holds fewer than {count} records: {text!r}")


async def test_records_of_real_answers(start_server, nsd_upstream, tmp_path):
    path = tmp_path / "queries.jsonl"
    server = await start_server(nsd_upstream, metrics=METRICS_ON, query_log={"path": str(path)})
    await ask(server, "udp", make_query("WWW.Example.ORG"))  # blocked, entry `example`
    await ask(server, "udp", make_query("www.example.org"))  # the packet cache's replay
    await ask(server, "tcp", make_query(ZONE.www, "AAAA"))  # forwarded over TCP
    await ask(server, "udp", make_query(ZONE.www, "AAAA"))  # from the cache
    blocked, replayed, forwarded, cached = await lines_of(path, 4)

    version = server.rules.version
    for record in (blocked, replayed):
        assert {k: record[k] for k in ("client", "qname", "qtype", "protocol", "outcome",
                                       "rcode", "list", "entry", "mode", "upstream",
                                       "rules_version")} == {
            "client": "127.0.0.0", "qname": "www.example.org", "qtype": "A", "protocol": "udp",
            "outcome": "blocked", "rcode": "NXDOMAIN", "list": "tracking", "entry": "example",
            "mode": "enforce", "upstream": None, "rules_version": version}
    assert {k: forwarded[k] for k in ("qname", "qtype", "protocol", "outcome", "rcode",
                                      "list", "upstream")} == {
        "qname": "www.example.test", "qtype": "AAAA", "protocol": "tcp",
        "outcome": "forwarded", "rcode": "NOERROR", "list": None,
        "upstream": nsd_upstream.address}
    assert (cached["outcome"], cached["upstream"], cached["protocol"]) == ("cached", None, "udp")
    assert all(record["schema"] == 1 and float(str(record["duration_ms"])) > 0
               for record in (blocked, replayed, forwarded, cached))
    text = await scrape(server)
    assert metric(text, "resolver_querylog_records_total") == 4
    assert metric(text, "resolver_querylog_dropped_total") == 0


def serve_two_workers(tmp_path: Path, nsd_upstream: NsdServer, query_log: str
                      ) -> tuple[subprocess.Popen[str], int]:
    rules = tmp_path / "rules.yaml"
    rules.write_text("lists:\n  - name: first\n    domains: [blocked.test]\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "resolver", "serve", "--workers", "2", "--metrics", "off",
         "--listen", f"{LOOPBACK}:{port}", "--upstream", nsd_upstream.address,
         "--rules", str(rules), "--query-log", query_log],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    assert "listening on" in process.stdout.readline(), process.stderr.read()
    return process, port


def ask_many(port: int) -> None:
    """Blocked names from many source ports, so both workers answer some."""
    for i in range(QUERIES):
        query = dns.message.make_query(f"n{i}.blocked.test", "A")
        assert dns.query.udp(query, LOOPBACK, port=port, timeout=3).rcode() == dns.rcode.NXDOMAIN


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, as an operator stops it; what it wrote to stdout after the banner."""
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    return out


def test_workers_share_stdout_in_whole_lines(tmp_path, nsd_upstream):
    process, port = serve_two_workers(tmp_path, nsd_upstream, "-")
    try:
        ask_many(port)
    finally:
        out = stop(process)
    names = sorted(json.loads(line)["qname"] for line in out.splitlines())  # each line whole
    assert names == sorted(f"n{i}.blocked.test" for i in range(QUERIES))


def test_each_worker_writes_its_own_file(tmp_path, nsd_upstream):
    path = tmp_path / "queries.jsonl"
    process, port = serve_two_workers(tmp_path, nsd_upstream, str(path))
    try:
        ask_many(port)
    finally:
        stop(process)
    files = sorted(p.name for p in tmp_path.glob("queries.jsonl*"))
    assert files == ["queries.jsonl.worker-0", "queries.jsonl.worker-1"]
    names = sorted(json.loads(line)["qname"] for name in files
                   for line in (tmp_path / name).read_text().splitlines())
    assert names == sorted(f"n{i}.blocked.test" for i in range(QUERIES))
