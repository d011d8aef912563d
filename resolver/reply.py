"""Upstream replies kept as wire bytes, replayed to any client that asks the same question.

A Reply is the upstream answer minus its header, question and OPT record, with the offset of
every TTL field. Serving it (fresh or from the cache) is one concatenation and a TTL patch per
record: no parse, no re-pack. The client's own question bytes are put back in front, which
keeps every compression pointer valid because the question has the same length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dnslib

from . import wire
from .query import Query

_TTL = struct.Struct("!I")
_COUNTS = struct.Struct("!HHHHH")  # flags and the four section counts
_RR_FIXED = struct.Struct("!HHIH")
TYPE_CNAME = 5
EDE_STALE = 3  # RFC 8914 "Stale Answer"


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    """How long replies may be kept: upstream TTLs bounded before they are stored and served
    (RFC 2308 for negatives), and the lifetime of a failure (RFC 9520: a resolution failure is
    cached briefly, so a failing name does not send every client's query upstream again)."""

    min_ttl: int = 0
    max_ttl: int = 86400
    negative_max: int = 3600
    servfail_ttl: int = 5  # 0: failures are not cached


class Reply:
    """An upstream answer ready to replay.

    flags: the upstream header flags (rcode and AD are what we keep of them).
    an, ns, ar: record counts, OPT excluded.
    body: the records after the question, TTLs already bounded by the policy.
    ttls: (offset in body, stored TTL) for every record.
    ttl: the lifetime of the whole reply: its shortest stored TTL, the negative TTL, or the
        SERVFAIL TTL; None when it must not be cached (a negative answer without an SOA,
        REFUSED and other errors).
    cnames: the targets of the answer section's CNAME records, in lowercase wire form, so the
        chain can be checked against the rules (CNAME cloaking) without parsing again.
    """

    __slots__ = ("flags", "rcode", "an", "ns", "ar", "body", "ttls", "ttl", "cnames")

    def __init__(self, flags: int, an: int, ns: int, ar: int, body: bytes,
                 ttls: tuple[tuple[int, int], ...], ttl: int | None,
                 cnames: tuple[bytes, ...] = ()):
        self.flags, self.an, self.ns, self.ar = flags, an, ns, ar
        self.rcode = flags & 0xF  # read on every answer: an attribute, not a property
        self.body, self.ttls, self.ttl, self.cnames = body, ttls, ttl, cnames


def scan_reply(data: bytes, qend: int, policy: TtlPolicy) -> Reply:
    """Read an upstream reply (already matched to our query) into a Reply.

    One walk over the records and one pass over what it found: this runs for every forward.
    Raises ValueError (or struct.error/IndexError) when the records are malformed.
    """
    flags, _, an, ns, ar = _COUNTS.unpack_from(data, 2)
    records, cnames, opt, end = _walk_records(data, qend, an + ns + ar, an, an + ns)
    if opt is not None:
        if opt[1] != end:
            return _scan_repacked(data[:end], policy)
        end, ar = opt[0], ar - 1
    # Each TTL is kept within [floor, ceiling]. A positive answer lives as long as its
    # shortest kept TTL; other answers have a lifetime of their own, or None (not cached).
    rcode = flags & 0xF
    positive = rcode == wire.NOERROR and an
    if positive:
        floor, ceiling = policy.min_ttl, policy.max_ttl
    elif rcode == wire.NXDOMAIN or rcode == wire.NOERROR:
        lifetime = _negative_ttl([rec for rec in records[an:an + ns] if rec[1] == wire.TYPE_SOA],
                                 policy)
        floor, ceiling = 0, lifetime or 0
    elif rcode == wire.SERVFAIL:
        floor, ceiling, lifetime = 0, policy.servfail_ttl, policy.servfail_ttl or None
    else:
        floor, ceiling, lifetime = policy.min_ttl, policy.max_ttl, None
    ttls, shortest, changed = [], ceiling, False
    for offset, _, ttl, _ in records:
        kept = floor if ttl < floor else ceiling if ttl > ceiling else ttl
        if kept != ttl:
            changed = True
        if kept < shortest:
            shortest = kept
        ttls.append((offset - qend, kept))
    body = data[qend:end]  # bytes past the counted records would be junk in every answer
    if changed:  # some TTLs were bounded: write them back
        body = bytearray(body)
        for offset, ttl in ttls:
            _TTL.pack_into(body, offset, ttl)
        body = bytes(body)
    return Reply(flags, an, ns, ar, body, tuple(ttls), shortest if positive else lifetime,
                 tuple(cnames))


def failure(policy: TtlPolicy) -> Reply:
    """The SERVFAIL kept when no upstream answered at all (RFC 9520 failure caching)."""
    return Reply(wire.SERVFAIL, 0, 0, 0, b"", (), policy.servfail_ttl or None)


def _walk_records(data: bytes, pos: int, count: int, an: int, additional: int
                  ) -> tuple[list[tuple[int, int, int, int]], list[bytes],
                             tuple[int, int] | None, int]:
    """Each record's (TTL offset, type, TTL, SOA minimum), the answer section's CNAME targets,
    the OPT record's span, and where the records end. `an` answer records come first;
    `additional` is the index of the first additional record: RFC 6891 allows one OPT record,
    there and nowhere else."""
    records, cnames, opt = [], [], None
    size = len(data)
    for index in range(count):
        start = pos
        # An owner name is most often a pointer to the question, or the root for OPT: skip
        # those without a call.
        label = data[pos]
        pos = pos + 2 if label >= 0xC0 else pos + 1 if not label else wire.skip_name(data, pos)
        rtype, _, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        end = pos + 10 + rdlength
        if end > size:
            raise ValueError("record runs past the end")
        if rtype == wire.TYPE_OPT:
            if opt is not None or index < additional:
                raise ValueError("OPT record repeated or outside the additional section")
            opt = (start, end)
        else:
            minimum = 0
            if rtype == wire.TYPE_SOA:
                minimum = _TTL.unpack_from(data, end - 4)[0]
            elif rtype == TYPE_CNAME and index < an:
                cnames.append(wire.read_name(data, pos + 10)[0])
            records.append((pos + 4, rtype, ttl, minimum))
        pos = end
    return records, cnames, opt, pos


def _negative_ttl(soa: list[tuple[int, int, int, int]], policy: TtlPolicy) -> int | None:
    """RFC 2308: a negative answer lives min(SOA TTL, SOA minimum); without an SOA, not at all."""
    if not soa:
        return None
    _, _, ttl, minimum = soa[0]
    return min(ttl, minimum, policy.negative_max)


def _scan_repacked(data: bytes, policy: TtlPolicy) -> Reply:
    """Rare slow path: the OPT record is not last, so removing it would break pointers.

    dnslib re-packs the message without it; its pointers are then laid out afresh.
    """
    try:
        record = dnslib.DNSRecord.parse(data)
    except dnslib.DNSError as exc:  # callers handle ValueError, as for the fast path
        raise ValueError(str(exc)) from exc
    record.ar = [rr for rr in record.ar if rr.rtype != wire.TYPE_OPT]
    packed = record.pack()
    qend = wire.skip_name(packed, 12) + 4
    return scan_reply(packed, qend, policy)


def render(q: Query, reply: Reply, elapsed: int) -> bytes:
    """Reply to q with `reply` as it stands `elapsed` seconds after it was received."""
    out = _header(q, reply) + q.question + reply.body
    if q.edns:
        out += wire.PLAIN_OPT[q.do]
    if elapsed > 0:
        out = bytearray(out)
        base = 12 + len(q.question)
        for offset, ttl in reply.ttls:
            _TTL.pack_into(out, base + offset, ttl - elapsed if ttl > elapsed else 0)
        out = bytes(out)
    return wire.fit_udp(q, out)


def render_stale(q: Query, reply: Reply, ttl: int) -> bytes:
    """Reply to q with an expired `reply` (RFC 8767 serve-stale): every TTL set to `ttl`, and
    for a client that sent EDNS, an Extended DNS Error 'Stale Answer' (RFC 8914) saying so."""
    out = bytearray(_header(q, reply) + q.question + reply.body)
    base = 12 + len(q.question)
    for offset, _ in reply.ttls:
        _TTL.pack_into(out, base + offset, ttl)
    if q.edns:
        out += wire.opt_record(q.do, wire.ede_option(EDE_STALE, ""))
    return wire.fit_udp(q, bytes(out))


def _header(q: Query, reply: Reply) -> bytes:
    """The header for q's answer from reply: q's ID, opcode, RD and CD; the reply's rcode; AD
    only for a client that asked with AD or DO (RFC 6840); one more record if we add an OPT."""
    flags = wire.reply_flags(q.flags, reply.rcode)
    if reply.flags & wire.AD and (q.do or q.flags & wire.AD):
        flags |= wire.AD
    return q.data[:2] + _COUNTS.pack(flags, 1, reply.an, reply.ns, reply.ar + q.edns)
