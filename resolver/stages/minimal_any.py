"""RFC 8482: ANY queries over UDP get one small synthesized HINFO record, not every record.

An ANY answer can be many times the size of its query, which makes ANY over UDP (whose source
address anyone can forge) the favourite of amplification attacks; and no client needs it:
resolvers never had to give a complete set. So, as Cloudflare and BIND's `minimal-any` do, an
ANY query over UDP is answered with `<name> HINFO "RFC8482" ""`, with no upstream query.

Over TCP, ANY is forwarded (and cached) like any other type: nobody can forge a TCP client's
address, so nothing is amplified toward a victim, and a debugging `dig ANY +tcp` still works.
`server.any: forward` turns this stage off (it is then not in the chain at all).

The answer is the same for every client and every rule set, so the packet cache may replay
it; it is counted as `blocked` (a policy answer) and in `resolver_minimal_any_total`.
"""

from __future__ import annotations

import struct

from resolver.message import wire
from resolver.message.constants import CLASS_IN, NEVER, NOERROR
from resolver.message.query import Outcome, Query
from resolver.ops.metrics import Metrics
from resolver.stages.contract import PASS, Answered, Result

TYPE_ANY, TYPE_HINFO = 255, 13
TTL = 3600  # RFC 8482 4.2 leaves it to the operator; long, since it never changes
# The record: owner a pointer to the question name, then type, class, TTL, and the HINFO data
# (CPU "RFC8482", OS "").
_RDATA = b"\x07RFC8482\x00"
RECORD = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_HINFO, CLASS_IN, TTL, len(_RDATA)) + _RDATA


class MinimalAny:
    """Answer ANY (class IN) over UDP with the RFC 8482 HINFO record."""

    def __init__(self, metrics: Metrics):
        self._tally = metrics.counter("minimal_any_total", "ANY queries over UDP answered "
                                      "with RFC 8482's one HINFO record.", ())
        self._tally.expect([()])

    def answer(self, q: Query) -> Result:
        if q.qtype != TYPE_ANY or q.transport != "udp" or q.qclass != CLASS_IN:
            return PASS
        tally = self._tally
        tally.inc(())
        opt = wire.PLAIN_OPT[q.do] if q.edns else b""
        data = wire.header(q, NOERROR, 1, 0, int(q.edns)) + q.question + RECORD + opt
        return Answered(wire.fit(q, data), Outcome.BLOCKED, (NEVER, tally, ()))
