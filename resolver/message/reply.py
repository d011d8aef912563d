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

from resolver.message import wire
from resolver.message.constants import (
    AD,
    MAX_TTL,
    NOERROR,
    NXDOMAIN,
    SERVFAIL,
    TYPE_CNAME,
    TYPE_OPT,
    TYPE_SOA,
)
from resolver.message.query import Query

_TTL = struct.Struct("!I")
_COUNTS = struct.Struct("!HHHHH")  # flags and the four section counts
_RR_FIXED = struct.Struct("!HHIH")

_CHAIN_TYPES = (b"\x00\x05", b"\x00\xff")  # CNAME, ANY: a question a chain answers
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

    One walk over the records, written flat: this runs for every forward. TTLs are rewritten
    only when one falls outside the policy's bounds, which the walk's lowest and highest tell.
    Raises ValueError (or struct.error/IndexError) when the records are malformed.
    """
    flags, _, an, ns, ar = _COUNTS.unpack_from(data, 2)
    additional = an + ns  # RFC 6891: the one OPT record belongs there and nowhere else
    ttls, cnames, soa, opt = [], [], None, None
    low, high = MAX_TTL, 0
    pos = qend
    for index in range(additional + ar):
        start = pos
        # An owner name is most often a pointer to the question, or the root for OPT: skip
        # those without a call.
        label = data[pos]
        pos = pos + 2 if label >= 0xC0 else pos + 1 if not label else wire.skip_name(data, pos)
        rtype, _, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        end = pos + 10 + rdlength
        if rtype == TYPE_OPT:
            if opt is not None or index < additional:
                raise ValueError("OPT record repeated or outside the additional section")
            if ttl >> 24:  # the rcode's upper bits (RFC 6891 6.1.3) would go with the OPT
                raise ValueError("an extended rcode, which the answer could not carry")
            opt = (start, end)
        else:
            if rtype == TYPE_CNAME:
                if index < an:
                    target, after = wire.read_name(data, pos + 10)
                    if after != end:
                        raise ValueError("CNAME data is not one name")
                    cnames.append(target)
            elif rtype == TYPE_SOA and soa is None and an <= index < additional:
                soa = _soa_ttls(data, pos + 10, end, ttl)
            ttls.append((pos + 4 - qend, ttl))
            if ttl < low:
                low = ttl
            if ttl > high:
                high = ttl
        pos = end
    if pos > len(data):
        raise ValueError("record runs past the end")
    end = pos
    if opt is not None:
        if opt[1] != end:
            return _scan_repacked(data[:end], policy)
        end, ar = opt[0], ar - 1
    # Each TTL is kept within [floor, ceiling]. A positive answer lives as long as its
    # shortest kept TTL; other answers have a lifetime of their own, or None (not cached).
    rcode = flags & 0xF
    # NOERROR with only a CNAME chain in the answer is NODATA for the chain's end (RFC 2308
    # 5), negative like one with no answer, unless the chain itself was asked for.
    positive = rcode == NOERROR and an and (
        len(cnames) < an or data[qend - 4:qend - 2] in _CHAIN_TYPES)
    if positive:
        floor, ceiling = policy.min_ttl, policy.max_ttl
    elif rcode == NXDOMAIN or rcode == NOERROR:
        # RFC 2308: min(SOA TTL, SOA minimum); without an SOA, not cached at all
        lifetime = None if soa is None else min(soa[0], soa[1], policy.negative_max)
        floor, ceiling = 0, lifetime or 0
    elif rcode == SERVFAIL:
        floor, ceiling, lifetime = 0, policy.servfail_ttl, policy.servfail_ttl or None
    else:
        floor, ceiling, lifetime = policy.min_ttl, policy.max_ttl, None
    body: bytes | bytearray  # patched in place when a TTL is out of bounds
    body = data[qend:end]  # bytes past the counted records would be junk in every answer
    if not ttls:
        shortest = ceiling
    elif floor <= low and high <= ceiling:  # the usual case: every TTL within bounds
        shortest = low
    else:  # bound them, and write them back; RFC 2181 8: a TTL over 2^31-1 means 0
        ttls = [(offset, 0 if ttl > MAX_TTL else floor if ttl < floor
                 else ceiling if ttl > ceiling else ttl) for offset, ttl in ttls]
        shortest = min(ceiling, *(ttl for _, ttl in ttls))
        body = bytearray(body)
        for offset, ttl in ttls:
            _TTL.pack_into(body, offset, ttl)
        body = bytes(body)
    return Reply(flags, an, ns, ar, body, tuple(ttls), shortest if positive else lifetime,
                 tuple(cnames))


def _soa_ttls(data: bytes, rdata: int, end: int, ttl: int) -> tuple[int, int]:
    """An SOA's TTL and MINIMUM, the negative answer's bounds (RFC 2308), each read as 0 when
    over 2^31-1 (RFC 2181 8). Raises ValueError unless its data is two names and 20 bytes."""
    if wire.skip_name(data, wire.skip_name(data, rdata)) + 20 != end:
        raise ValueError("SOA data is not two names and five numbers")
    minimum = _TTL.unpack_from(data, end - 4)[0]
    return (ttl if ttl <= MAX_TTL else 0, minimum if minimum <= MAX_TTL else 0)


def failure(policy: TtlPolicy) -> Reply:
    """The SERVFAIL kept when no upstream answered at all (RFC 9520 failure caching)."""
    return Reply(SERVFAIL, 0, 0, 0, b"", (), policy.servfail_ttl or None)


def _scan_repacked(data: bytes, policy: TtlPolicy) -> Reply:
    """Rare slow path: the OPT record is not last, so removing it would break pointers.

    dnslib re-packs the message without it; its pointers are then laid out afresh.
    """
    try:
        record = dnslib.DNSRecord.parse(data)
    except dnslib.DNSError as exc:  # callers handle ValueError, as for the fast path
        raise ValueError(str(exc)) from exc
    record.ar = [rr for rr in record.ar if rr.rtype != TYPE_OPT]
    packed = record.pack()
    qend = wire.skip_name(packed, 12) + 4
    return scan_reply(packed, qend, policy)


def render(q: Query, reply: Reply, elapsed: int) -> bytes:
    """Reply to q with `reply` as it stands `elapsed` seconds after it was received."""
    out: bytes | bytearray  # patched in place when the TTLs count down
    out = _header(q, reply) + q.question + reply.body
    if q.edns:
        out += wire.PLAIN_OPT[q.do]
    if elapsed > 0:
        out = bytearray(out)
        base = 12 + len(q.question)
        for offset, ttl in reply.ttls:
            _TTL.pack_into(out, base + offset, ttl - elapsed if ttl > elapsed else 0)
        out = bytes(out)
    return wire.fit(q, out)


def render_stale(q: Query, reply: Reply, ttl: int) -> bytes:
    """Reply to q with an expired `reply` (RFC 8767 serve-stale): every TTL set to `ttl`, and
    for a client that sent EDNS, an Extended DNS Error 'Stale Answer' (RFC 8914) saying so."""
    out = bytearray(_header(q, reply) + q.question + reply.body)
    base = 12 + len(q.question)
    for offset, _ in reply.ttls:
        _TTL.pack_into(out, base + offset, ttl)
    if q.edns:
        out += wire.opt_record(q.do, wire.ede_option(EDE_STALE, ""))
    return wire.fit(q, bytes(out))


def _header(q: Query, reply: Reply) -> bytes:
    """The header for q's answer from reply: q's ID, opcode, RD and CD; the reply's rcode; AD
    only for a client that asked with AD or DO (RFC 6840); one more record if we add an OPT."""
    flags = wire.reply_flags(q.flags, reply.rcode)
    if reply.flags & AD and (q.do or q.flags & AD):
        flags |= AD
    return q.data[:2] + _COUNTS.pack(flags, 1, reply.an, reply.ns, reply.ar + q.edns)
