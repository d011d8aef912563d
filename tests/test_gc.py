"""The query paths make no reference cycles.

The server freezes whatever survives a young garbage collection (cli.settle_memory), so a
cycle that outlives one would never be collected. Here every path runs with the collector
off, then one collection must find nothing of ours to free: no Flight, Exchange, Query,
connection or timer handle held in a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl

import dns.rcode
import uvloop

from resolver.message import wire
from resolver.ops.config import Config
from resolver.rules.loader import load_rules
from resolver.server.app import RunningServer, running_server
from tests.conftest import RULES_YAML, resolver_config
from tests.e2e import ask, make_query, raw_udp, tcp
from tests.servers import LOOPBACK, ZONE
from tests.tls import TLS_NAME, TlsFiles

# Modules whose objects in a garbage cycle would mean our code made it.
OURS = ("resolver", "asyncio", "uvloop")


def cyclic_garbage() -> list[object]:
    """Objects of ours that only the cycle collector could free."""
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [obj for obj in gc.garbage if _ours(obj)]
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
    return found


def _ours(obj: object) -> bool:
    if type(obj).__module__.split(".")[0] in OURS:
        return True
    code = getattr(obj, "f_code", None) or getattr(obj, "__code__", None)
    return code is not None and "/resolver/" in code.co_filename


async def every_path(servers: dict[str, RunningServer], do: bool) -> None:
    """Forwarded, then cached, blocked, negative, CNAME, truncated then TCP, TCP pipelined,
    malformed; a silent upstream timing out into SERVFAIL; a truncated reply whose TCP retry
    gets a wrong answer or no connection; DNS over TLS, TLS failing on a certificate that
    names another server, and a TLS upstream that never answers or hangs up. `do` is part of
    the cache key: the second round forwards what the first one cached."""
    server = servers["normal"]
    for protocol in ("udp", "tcp"):
        for name, rdtype in ((ZONE.www, "A"), (ZONE.www, "A"), (ZONE.alias, "A"),
                             (ZONE.missing, "A"), (ZONE.mixed, "AAAA"), ("www.example.org", "A"),
                             (ZONE.big, "TXT")):
            await ask(server, protocol, make_query(name, rdtype, edns=0, do=do))
    await asyncio.gather(*(tcp(server, make_query(f"n{i}.{ZONE.origin}", do=do))
                           for i in range(5)))
    async with raw_udp(server) as sock:
        sock.send(b"\x12\x34\x01")
        sock.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01")
        await sock.receive()
    for name, rcode in (("silent", dns.rcode.SERVFAIL), ("tcp_mismatch", dns.rcode.SERVFAIL),
                        ("tcp_refused", dns.rcode.SERVFAIL), ("tls", dns.rcode.NOERROR),
                        ("tls_wrong_name", dns.rcode.SERVFAIL), ("tls_silent", dns.rcode.SERVFAIL),
                        ("tls_closing", dns.rcode.SERVFAIL)):
        reply = await ask(servers[name], "udp", make_query(ZONE.www, do=do))
        assert reply.rcode() == rcode, name


class _Truncating(asyncio.DatagramProtocol):
    """Answers every query over UDP with TC=1: the retry goes over TCP."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(data[:2] + bytes((data[2] | 0x82, 0x80)) + data[4:], addr)


async def in_loop_faults(stack: contextlib.AsyncExitStack, configs: dict[str, Config],
                         rules: str, fast: dict[str, float], tls_files: TlsFiles) -> None:
    """Upstreams failing in ways nsd and unbound do not, in this loop (a fault upstream's
    own asyncio loop in a thread would leave cycles of its own): truncating UDP ports whose
    TCP retry gets an answer to another ID or no connection, and TLS servers that never
    answer or hang up at the first query."""
    loop = asyncio.get_running_loop()

    async def mismatch(reader, writer) -> None:  # the reply to the TCP retry has another ID
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            query = await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big"))
            writer.write(wire.framed(bytes((query[0] ^ 0xFF, query[1], query[2] | 0x80, 0x80))
                                     + query[4:]))
            await reader.read()
        writer.close()

    tcp = await asyncio.start_server(mismatch, LOOPBACK, 0)
    stack.push_async_callback(tcp.wait_closed)
    stack.callback(tcp.close)
    for name, port in (("tcp_mismatch", tcp.sockets[0].getsockname()[1]), ("tcp_refused", 0)):
        udp, _ = await loop.create_datagram_endpoint(_Truncating, local_addr=(LOOPBACK, port))
        stack.callback(udp.close)
        configs[name] = resolver_config([udp.get_extra_info("sockname")[:2]], [rules],
                                        upstream=fast)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    for name, hang_up in (("tls_silent", False), ("tls_closing", True)):
        async def serve(reader, writer, hang_up=hang_up) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readexactly(2)
                if not hang_up:
                    await reader.read()  # until the client gives up and closes
            writer.close()

        server = await asyncio.start_server(serve, LOOPBACK, 0, ssl=context)
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close)
        port = server.sockets[0].getsockname()[1]
        configs[name] = resolver_config([(LOOPBACK, port, "tls", TLS_NAME, str(tls_files.ca))],
                                        [rules], upstream=fast)


def test_query_paths_leave_no_cycles(tmp_path, nsd_upstream, fault_upstream, unbound_dot,
                                     tls_files):
    """Run on uvloop, the server's own loop: its transports are part of what is checked."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_YAML)
    fast = {"timeout": 0.2, "deadline": 0.4}
    configs = {
        "normal": resolver_config([nsd_upstream], [str(rules)]),
        "silent": resolver_config([fault_upstream("silent")], [str(rules)], upstream=fast),
        "tls": resolver_config(
            [(unbound_dot.host, unbound_dot.port, "tls", TLS_NAME, str(tls_files.ca))],
            [str(rules)]),
        "tls_wrong_name": resolver_config(
            [(unbound_dot.host, unbound_dot.port, "tls", "other.example.test",
              str(tls_files.ca))], [str(rules)], upstream=fast),
    }

    async def run() -> list[object]:
        async with contextlib.AsyncExitStack() as stack:
            await in_loop_faults(stack, configs, str(rules), fast, tls_files)
            servers = {name: await stack.enter_async_context(
                           running_server(config, load_rules([str(rules)])))
                       for name, config in configs.items()}
            await every_path(servers, False)  # warm up: first-use caches
            # Out of sight: everything older than the paths checked, such as the servers
            # themselves and whatever earlier tests left for the collector.
            gc.collect()
            gc.freeze()
            gc.disable()
            try:
                await every_path(servers, True)
                await asyncio.sleep(0.1)  # let closed connections finish closing
                return cyclic_garbage()
            finally:
                gc.enable()
                gc.unfreeze()

    found = uvloop.run(run())
    assert found == [], sorted({type(obj).__qualname__ for obj in found})
