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

import dns.rcode
import uvloop

from resolver.app import running_server
from resolver.rules import load_rules
from tests.conftest import RULES_YAML, resolver_config
from tests.e2e import ask, make_query, raw_udp, tcp
from tests.tls import TLS_NAME
from tests.servers import ZONE

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


async def every_path(servers: dict, do: bool) -> None:
    """Forwarded, then cached, blocked, negative, CNAME, truncated then TCP, TCP pipelined,
    malformed; a silent upstream timing out into SERVFAIL; DNS over TLS, and TLS failing on
    a certificate that names another server. `do` is part of the cache key: the second round
    forwards what the first one cached."""
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
    for name, rcode in (("silent", dns.rcode.SERVFAIL), ("tls", dns.rcode.NOERROR),
                        ("tls_wrong_name", dns.rcode.SERVFAIL)):
        reply = await ask(servers[name], "udp", make_query(ZONE.www, do=do))
        assert reply.rcode() == rcode, name


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
