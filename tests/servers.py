"""Upstream servers the tests forward to, all on 127.0.0.1.

A real authoritative server (NSD) answers the ordinary cases, so the resolver is tested against
the messages a real server sends (compression, truncation, EDNS, SOA in negative answers) rather
than against our own idea of them. A small hand-written server covers only the faults a real
server won't produce: silence, garbage, spoofed IDs or questions, slowness, forced truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest
from dnslib import NS, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from resolver.server.supervisor import free_port

LOOPBACK = "127.0.0.1"


def require_tool(name: str, package: str | None = None) -> str:
    """Return the path of an external tool, or skip the test when it is not installed.
    package: the Debian package that has it, when it is not named after the tool.

    In CI (CI=true) a missing tool fails instead: .ci/run installs every tool, so a skip there
    would hide a broken install step behind a green run.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install {package or name})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# --------------------------------------------------------------------------------------------
# The test zones. The zone files are generated from this, so tests and server cannot disagree.


@dataclass(frozen=True, slots=True)
class TestZone:
    """Names (absolute, with the trailing dot) and data served by NSD."""

    __test__ = False  # not a test class, despite the name

    origin: str = "example.test."
    soa_minimum: int = 300  # also the SOA's own TTL, so negative answers are cached 300 s
    default_ttl: int = 300
    ns: str = "ns.example.test."
    ns_a: str = "192.0.2.1"
    www: str = "www.example.test."
    www_a: str = "192.0.2.10"
    www_aaaa: str = "2001:db8::10"
    alias: str = "alias.example.test."  # CNAME to www, so the answer holds CNAME + A
    mixed: str = "mixed.example.test."  # two A records and a TXT, no AAAA (AAAA is NODATA)
    mixed_a: tuple[str, ...] = ("192.0.2.11", "192.0.2.12")
    mixed_txt: str = "mixed types"
    big: str = "big.example.test."  # TXT RRset over 2 KB: truncated over UDP even with EDNS 1232
    big_txt: tuple[str, ...] = tuple(f"big-{i:02d}-".ljust(60, "x") for i in range(40))
    short_ttl: str = "short-ttl.example.test."
    short_ttl_a: str = "192.0.2.13"
    short_ttl_ttl: int = 2
    ttl3600: str = "ttl3600.example.test."
    ttl3600_a: str = "192.0.2.14"
    outside: str = "outside.example.test."  # CNAME out of the zone, to org_www
    missing: str = "missing.example.test."  # not in the zone: NXDOMAIN with the SOA
    org_origin: str = "example.org."
    org_www: str = "www.example.org."
    org_www_a: str = "192.0.2.20"


ZONE = TestZone()


def _soa(origin: str, minimum: int) -> str:
    return f"@ {minimum} IN SOA ns.{origin} hostmaster.{origin} 1 3600 900 604800 {minimum}"


def zone_files(zone: TestZone = ZONE) -> dict[str, str]:
    """Zone file name -> zone file text, in NSD's (RFC 1035) master file format."""
    test = [
        f"$ORIGIN {zone.origin}",
        f"$TTL {zone.default_ttl}",
        _soa(zone.origin, zone.soa_minimum),
        f"@ IN NS {zone.ns}",
        f"{zone.ns} IN A {zone.ns_a}",
        f"{zone.www} IN A {zone.www_a}",
        f"{zone.www} IN AAAA {zone.www_aaaa}",
        f"{zone.alias} IN CNAME {zone.www}",
        *(f"{zone.mixed} IN A {address}" for address in zone.mixed_a),
        f'{zone.mixed} IN TXT "{zone.mixed_txt}"',
        *(f'{zone.big} IN TXT "{text}"' for text in zone.big_txt),
        f"{zone.short_ttl} {zone.short_ttl_ttl} IN A {zone.short_ttl_a}",
        f"{zone.ttl3600} 3600 IN A {zone.ttl3600_a}",
        f"{zone.outside} IN CNAME {zone.org_www}",
    ]
    org = [
        f"$ORIGIN {zone.org_origin}",
        f"$TTL {zone.default_ttl}",
        _soa(zone.org_origin, zone.soa_minimum),
        f"@ IN NS ns.{zone.org_origin}",
        f"ns.{zone.org_origin} IN A 192.0.2.2",
        f"{zone.org_www} IN A {zone.org_www_a}",
    ]
    return {
        f"{zone.origin}zone": "\n".join(test) + "\n",
        f"{zone.org_origin}zone": "\n".join(org) + "\n",
    }


# --------------------------------------------------------------------------------------------
# NSD


@dataclass(frozen=True, slots=True)
class NsdServer:
    """A running NSD serving ZONE on host:port (UDP and TCP)."""

    host: str
    port: int
    log: Path
    zone: TestZone = field(default=ZONE, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class NsdError(RuntimeError):
    """NSD did not come up; the message carries its log so the cause shows in the test report."""


def nsd_config(workdir: Path, host: str, port: int, zone: TestZone = ZONE) -> str:
    """An nsd.conf that keeps every file NSD writes inside workdir and runs as the caller."""
    zones = "".join(
        f"zone:\n    name: {name.removesuffix('zone')}\n    zonefile: {name}\n"
        for name in zone_files(zone)
    )
    return f"""server:
    ip-address: {host}
    port: {port}
    do-ip4: yes
    do-ip6: no
    reuseport: no
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "{workdir}"
    database: ""
    zonelistfile: "{workdir}/zone.list"
    xfrdfile: "{workdir}/xfrd.state"
    xfrdir: "{workdir}"
    pidfile: "{workdir}/nsd.pid"
    logfile: "{workdir}/nsd.log"
    verbosity: 1
    hide-version: yes
    refuse-any: no
    round-robin: no
    zonefiles-write: 0
remote-control:
    control-enable: no
{zones}"""


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _answers(host: str, port: int, origin: str) -> bool:
    try:
        dns.query.udp(dns.message.make_query(origin, "SOA"), host, port=port, timeout=0.2)
    except (dns.exception.DNSException, OSError):
        return False
    return True


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop NSD by its PID; if it hangs, kill its process group (its own forked children)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=5)


@contextlib.contextmanager
def run_nsd(
    workdir: Path, *, host: str = LOOPBACK, attempts: int = 5, startup: float = 10.0
) -> Iterator[NsdServer]:
    """Run `nsd -d` on a free port until the block exits, retrying if another process took it."""
    nsd = require_tool("nsd")
    for name, text in zone_files().items():
        (workdir / name).write_text(text)
    log, stderr = workdir / "nsd.log", workdir / "nsd.stderr"
    for _ in range(attempts):
        port = free_port(host)
        config = workdir / "nsd.conf"
        config.write_text(nsd_config(workdir, host, port))
        log.unlink(missing_ok=True)
        with stderr.open("wb") as err:
            process = subprocess.Popen(
                [nsd, "-d", "-c", str(config)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
            )
        try:
            deadline = time.monotonic() + startup
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(host, port, ZONE.origin):
                    yield NsdServer(host, port, log)
                    return
                time.sleep(0.05)
        finally:
            _stop_process(process)
        output = _read(stderr) + _read(log)
        if "already in use" not in output and "can't bind" not in output:
            break
    raise NsdError(
        f"nsd did not answer on {host}:{port} within {startup:g}s "
        f"(exit code {process.returncode});\n--- output and log ---\n{output}"
    )


# --------------------------------------------------------------------------------------------
# The fault upstream

FAULT_MODES = ("answer", "silent", "garbage", "wrong_id", "wrong_question", "slow", "truncate",
               "servfail", "refused", "poison")
FAULT_A = "192.0.2.99"
POISON_A = "203.0.113.66"  # what a poisoning reply wants cached: never in a scrubbed answer


@dataclass(frozen=True, slots=True)
class Received:
    """One query as it arrived, kept raw so tests can check exactly what the resolver sent,
    and the source port it came from (so tests can watch the resolver's ports change)."""

    protocol: str  # 'udp' or 'tcp'
    wire: bytes
    port: int  # the sender's source port

    @property
    def message(self) -> DNSRecord:
        return DNSRecord.parse(self.wire)


@dataclass(slots=True)
class FaultUpstream:
    """A DNS server on 127.0.0.1 (UDP and TCP, same port) that misbehaves in one chosen way.

    Modes, applied to every query (unparseable queries are counted and never answered):
      answer          correct answer: A FAULT_A for A queries, NOERROR/empty for other types
      silent          never answers (TCP: reads and keeps the connection open)
      garbage         the query's ID and a QR header, then bytes no decoder can parse
      wrong_id        a correct answer under another ID
      wrong_question  the right ID, answering a different name
      slow            a correct answer after `delay` seconds
      truncate        UDP: TC=1 with an empty answer; TCP: the correct answer
      servfail        SERVFAIL
      refused         REFUSED
      poison          the correct answer, plus records that do not belong to it (an A record
                      for victim.example, an NS record for example. with its glue, all
                      pointing at POISON_A), as a cache-poisoning reply would carry them
    With then_answer=True, wrong_id, wrong_question and garbage send the correct answer right
    after the bad one, to test that a client skips the bad reply and keeps listening.

    It runs its own event loop in a thread, so it works beside the event loop of an async test.
    """

    mode: str
    delay: float = 1.0
    ttl: int = 60
    then_answer: bool = False
    host: str = LOOPBACK
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(FAULT_MODES)}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def udp_count(self) -> int:
        return self.count("udp")

    @property
    def tcp_count(self) -> int:
        return self.count("tcp")

    def count(self, protocol: str | None = None) -> int:
        """Queries received, over one protocol or (None) both."""
        with self._lock:
            return sum(1 for r in self.received if protocol in (None, r.protocol))

    # -- what to send: pure, no I/O ------------------------------------------------------------

    def replies(self, wire: bytes, protocol: str) -> list[bytes]:
        """The messages this mode sends in reply to one query."""
        try:
            query = DNSRecord.parse(wire)
        except DNSError:
            return []
        good = self._answer(query).pack()
        match self.mode:
            case "answer" | "slow":
                return [good]
            case "silent":
                return []
            case "servfail" | "refused":
                reply = query.reply(ra=1, aa=0)
                reply.header.rcode = RCODE.SERVFAIL if self.mode == "servfail" else RCODE.REFUSED
                return [reply.pack()]
            case "truncate":
                if protocol == "tcp":
                    return [good]
                reply = query.reply(ra=1, aa=0)
                reply.header.tc = 1
                return [reply.pack()]
            case "garbage":
                # A compression pointer to offset 0x3fff, past the end: unparseable everywhere.
                header = b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\xff\xff"
                bad = wire[:2] + header + os.urandom(20)
            case "wrong_id":
                bad = struct.pack("!H", (query.header.id + 1) & 0xFFFF) + good[2:]
            case "poison":
                reply = self._answer(query)
                reply.add_answer(RR("victim.example.", QTYPE.A, rdata=A(POISON_A), ttl=self.ttl))
                reply.add_auth(RR("example.", QTYPE.NS, rdata=NS("ns.evil.example."),
                                  ttl=self.ttl))
                reply.add_ar(RR("ns.evil.example.", QTYPE.A, rdata=A(POISON_A), ttl=self.ttl))
                return [reply.pack()]
            case "wrong_question":
                other = query.reply(ra=1, aa=0)
                other.questions[0].qname = other.questions[0].qname.add("wrong")
                other.add_answer(RR(other.questions[0].qname, QTYPE.A, rdata=A(FAULT_A),
                                    ttl=self.ttl))
                bad = other.pack()
        return [bad, good] if self.then_answer else [bad]

    def _answer(self, query: DNSRecord) -> DNSRecord:
        reply = query.reply(ra=1, aa=0)
        if query.q.qtype == QTYPE.A:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(FAULT_A), ttl=self.ttl))
        return reply

    def _record(self, protocol: str, wire: bytes, port: int) -> list[bytes]:
        with self._lock:
            self.received.append(Received(protocol, wire, port))
        return self.replies(wire, protocol)

    # -- I/O ------------------------------------------------------------------------------------

    def __enter__(self) -> FaultUpstream:
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), daemon=True, name=f"fault-{self.mode}"
        )
        self._thread.start()
        self._ready.wait(timeout=10)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise RuntimeError("fault upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            tcp, udp = await self._bind()
        except BaseException as error:  # reported to the starting thread, not lost in this one
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            udp.close()
            tcp.close()

    async def _bind(self) -> tuple[asyncio.Server, asyncio.DatagramTransport]:
        """TCP on port 0, then UDP on the same port; retry if that UDP port is taken."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            tcp = await asyncio.start_server(self._tcp_client, self.host, self.port)
            port = tcp.sockets[0].getsockname()[1]
            try:
                udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self),
                                                             local_addr=(self.host, port))
            except OSError:
                tcp.close()
                if self.port:
                    raise
                continue
            self.port = port
            return tcp, udp
        raise OSError("no port free for both UDP and TCP")

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("peername")[1]
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                replies = self._record("tcp", await reader.readexactly(length), port)
                if self.mode == "slow":
                    await asyncio.sleep(self.delay)
                for reply in replies:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FaultUpstream):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        replies = self.server._record("udp", data, addr[1])
        if self.server.mode == "slow":
            asyncio.get_running_loop().call_later(self.server.delay, self._send, replies, addr)
        else:
            self._send(replies, addr)

    def _send(self, replies: list[bytes], addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            for reply in replies:
                self.transport.sendto(reply, addr)
