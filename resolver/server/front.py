"""The front of the UDP path: access control, then the rate limit, then the packet cache.

Both depend on who asks, so they sit in front of the packet cache (which replays by query
bytes to anyone) and of every stage: a refused or limited client costs no decoding, no rule
walk and no cache lookup, and is counted (`refused`, `dropped`, `ratelimited`) before any
of them runs. TCP asks `connection()` once per connection instead (server/tcp.py): its
clients cannot spoof their address, so they are not rate limited, only capped.

The verdict for a source address (refused, answered without limit, or the limiter's bucket
it draws from) is worked out once and kept, so an allowed client costs one dict lookup per
query. The table is bounded: full, it is emptied and refilled by the addresses still asking
(a spoofed flood from a /8 costs it a parse per new address, never memory).
"""

from __future__ import annotations

from collections.abc import Mapping

from resolver.message import wire
from resolver.message.query import Outcome
from resolver.ops.metrics import UNTIMED, Metrics
from resolver.server.tcp import ALLOW as TCP_ALLOW
from resolver.server.tcp import CLOSE as TCP_CLOSE
from resolver.server.tcp import REFUSE as TCP_REFUSE
from resolver.server.udp import Answer, Handler
from resolver.stages.access import Networks, refusal
from resolver.stages.contract import Sink
from resolver.stages.ratelimit import ALLOW, SLIP, WOULD, Limiter

MAX_VERDICTS = 65536  # addresses whose verdict is kept (about 90 bytes each: 6 MiB at most)
ALLOWED, REFUSED = True, False  # verdicts; a limited client's is its bucket's key


class Front:
    """Access control and rate limits in front of the packet cache (UDP)."""

    def __init__(self, inner: Handler, allow: Networks, refuse_action: str,
                 limiter: Limiter | None, metrics: Metrics):
        self.behind: Answer = inner.handle  # udp.py's shortcut reads it
        self._inner = inner.handle
        self._allow = allow
        self._drop = refuse_action == "drop"
        self._limiter = limiter
        self._admit = limiter.admit if limiter is not None else None
        # the limiter's buckets by key, which udp.py's shortcut takes tokens from
        self.buckets: Mapping[str, list[float]] = (limiter.buckets if limiter is not None
                                                   else {})
        # each address's verdict; read by the UDP transport too (udp.py's shortcut)
        self._verdicts: dict[str, bool | str] = {}
        self.verdicts: Mapping[str, bool | str] = self._verdicts
        self._record = metrics.queries.record
        self._would = metrics.counter(
            "would_ratelimit_total", "UDP queries over the rate limit that a dry run "
            "(ratelimit.dry_run) answered all the same.", ())
        self._would.expect([()])
        if limiter is not None:
            metrics.gauge("ratelimit_tracked_prefixes", "Client prefixes the rate limiter "
                          "tracks (at most ratelimit.max_tracked).", (),
                          lambda: {(): len(limiter)})

    def handle(self, data: bytes, client: tuple[str, int], sink: Sink) -> bytes | None:
        """The answer to send now (see PacketCache.handle, the inner handler), or None."""
        verdict = self._verdicts.get(client[0])
        if verdict is ALLOWED:  # the usual case: one lookup, one comparison
            return self._inner(data, client, sink)
        if verdict is None:
            verdict = self._judge(client[0])
            if verdict is ALLOWED:
                return self._inner(data, client, sink)
        if verdict is REFUSED:
            return self._refuse(data, client, sink.name)
        admitted = self._admit(verdict)  # type: ignore[misc, arg-type]  # a limiter's key
        if admitted == ALLOW:
            return self._inner(data, client, sink)
        if admitted == WOULD:
            self._would.inc(())
            return self._inner(data, client, sink)
        if admitted == SLIP:
            try:
                answer = wire.truncated(wire.parse_query(data, client, sink.name))
            except wire.FormError:
                pass
            else:
                self._count(sink.name, Outcome.RATELIMITED, data, answer)
                return answer
        self._count(sink.name, Outcome.RATELIMITED, data, None)
        return None

    def connection(self, host: str) -> str:
        """What a TCP connection from host gets (server/tcp.py): served, each of its queries
        answered REFUSED, or closed at once (refuse_action drop)."""
        if host in self._allow:
            return TCP_ALLOW
        return TCP_CLOSE if self._drop else TCP_REFUSE

    def refuse(self, data: bytes, client: tuple[str, int], transport: str) -> bytes | None:
        """Count and answer a query from a client outside the allowed networks."""
        answer = refusal(data, client, transport)
        outcome = Outcome.DROPPED if answer is None else Outcome.REFUSED  # junk: unanswered
        self._count(transport, outcome, data, answer)
        return answer

    def _refuse(self, data: bytes, client: tuple[str, int], transport: str) -> bytes | None:
        if self._drop:
            self._count(transport, Outcome.DROPPED, data, None)
            return None
        return self.refuse(data, client, transport)

    def _judge(self, host: str) -> bool | str:
        """Work out and keep the verdict for an address heard from for the first time."""
        verdict: bool | str
        if host not in self._allow:
            verdict = REFUSED
        elif self._limiter is None:
            verdict = ALLOWED
        else:
            key = self._limiter.key(host)
            verdict = ALLOWED if key is None else key
        verdicts = self._verdicts
        if len(verdicts) >= MAX_VERDICTS:
            verdicts.clear()
        verdicts[host] = verdict
        return verdict

    def _count(self, transport: str, outcome: str, data: bytes, answer: bytes | None
               ) -> None:
        """Count a query turned away here (never timed: see pipeline.TIME_EVERY)."""
        self._record(transport, outcome, wire.question_type(data), answer, UNTIMED)
