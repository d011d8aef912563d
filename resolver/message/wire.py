"""DNS wire format on bytes: decode a query's header and question, build answers by patching.

This is the hot path. A full dnslib parse and re-pack costs 30-40 us per message; reading the
question straight from the bytes and concatenating precomputed pieces costs well under 1 us.
Everything here is pure: no sockets, no clocks.
"""

from __future__ import annotations

import struct

from resolver.message.constants import (
    AD,
    BADVERS,
    CD,
    CLASSIC_UDP,
    EDE_OPTION,
    FORMERR,
    HEADER_SIZE,
    MAX_MESSAGE,
    MAX_NAME,
    NOERROR,
    NOTIMP,
    OPCODE,
    QR,
    RA,
    RD,
    SERVFAIL,
    TC,
    TYPE_OPT,
)
from resolver.message.query import Query

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_COUNTS = struct.Struct("!HHHHH")  # flags and the four section counts
_TYPE_CLASS = struct.Struct("!HH")
_OPT_REST = struct.Struct("!HIH")  # an OPT record after its root name and type: size, ttl, rdlength
_TTL = struct.Struct("!I")


class FormError(Exception):
    """A packet that gets no normal answer: `response` is the error answer, or None to drop."""

    def __init__(self, response: bytes | None, reason: str):
        super().__init__(reason)
        self.response = response


def parse_query(data: bytes, client: tuple[str, int], transport: str) -> Query:
    """Decode header, question and EDNS; raise FormError for anything we won't answer.

    Written flat, with the common shapes first, because it runs for every packet.
    """
    if type(data) is not bytes:  # keys and slices must be hashable bytes, not bytearray
        data = bytes(data)
    size = len(data)
    if size < 12:
        raise FormError(None, "shorter than a header")
    flags, qdcount, ancount, nscount, arcount = _COUNTS.unpack_from(data, 2)
    if flags & (QR | OPCODE) or qdcount != 1:
        raise _header_error(data, flags)
    pos, offsets = 12, []
    try:
        length = data[12]
        while length:
            if length > 63:  # a pointer or extended label has no place in a question
                raise FormError(_bare_error(data, flags, FORMERR), "compressed question name")
            offsets.append(pos - 12)
            pos += length + 1
            length = data[pos]
    except IndexError:  # the name's end is past the packet's: the FormError says it all
        raise FormError(_bare_error(data, flags, FORMERR), "question name runs past the end")  # noqa: B904
    end = pos + 1
    qend = end + 4
    if end - 12 > MAX_NAME or qend > size:
        raise FormError(_bare_error(data, flags, FORMERR), "question too long or cut short")
    qtype, qclass = _TYPE_CLASS.unpack_from(data, end)
    if not arcount:
        edns, udp_size, do = False, CLASSIC_UDP, False
    elif (arcount == 1 and not ancount and not nscount and size >= qend + 11
          and data[qend:qend + 3] == b"\x00\x00\x29"):  # the usual lone OPT at the root
        udp_size, ttl, rdlength = _OPT_REST.unpack_from(data, qend + 3)
        if qend + 11 + rdlength > size:
            raise FormError(_bare_error(data, flags, FORMERR), "OPT record cut short")
        if ttl & 0xFF0000:
            raise FormError(_badvers(data, flags), "EDNS version not supported")
        edns, do = True, bool(ttl & 0x8000)
        if udp_size < CLASSIC_UDP:
            udp_size = CLASSIC_UDP
    else:
        edns, udp_size, do = _read_edns(data, flags, qend, ancount + nscount, arcount)
    return Query(data, flags, data[12:qend], data[12:end].lower(), offsets, qtype, qclass,
                 edns, udp_size, do, client, transport)


def _header_error(data: bytes, flags: int) -> FormError:
    """Why a header is not a query we answer: a response, an opcode, or the question count."""
    if flags & QR:
        return FormError(None, "a response, not a query")  # answering answers invites loops
    if flags & OPCODE:
        return FormError(_bare_error(data, flags, NOTIMP), "opcode not implemented")
    return FormError(_bare_error(data, flags, FORMERR), "question count is not 1")


def _read_edns(data: bytes, flags: int, pos: int, skip: int, arcount: int
               ) -> tuple[bool, int, bool]:
    """Find the OPT record: (present, largest UDP answer the client takes, DO bit)."""
    if not arcount:
        return False, CLASSIC_UDP, False
    found, udp_size, do = False, CLASSIC_UDP, False
    try:
        for index in range(skip + arcount):
            name_at = pos
            pos = skip_name(data, pos)
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
            pos += 10 + rdlength
            if pos > len(data):
                raise ValueError("record runs past the end")
            if rtype != TYPE_OPT or index < skip:
                continue
            if found or data[name_at] != 0:
                raise ValueError("second OPT record or OPT not at the root")
            found, udp_size, do = True, max(rclass, CLASSIC_UDP), bool(ttl & 0x8000)
            if (ttl >> 16) & 0xFF:
                raise FormError(_badvers(data, flags), "EDNS version not supported")
    except (ValueError, struct.error, IndexError) as exc:
        raise FormError(_bare_error(data, flags, FORMERR),
                        f"bad additional section: {exc}") from None
    return found, udp_size, do


def skip_name(data: bytes, pos: int) -> int:
    """Return the offset just past a (possibly compressed) name starting at pos."""
    while True:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length >= 0xC0:
            return pos + 2
        if length > 63:
            raise ValueError("unknown label type")
        pos += length + 1


def question_type(data: bytes) -> int:
    """The first question's type, read without decoding the rest; 0 when there is none to
    read (for counting queries turned away before decoding)."""
    try:
        end = skip_name(data, HEADER_SIZE)
        return (data[end] << 8) | data[end + 1]
    except (ValueError, IndexError):
        return 0


def read_name(data: bytes, pos: int) -> tuple[bytes, int]:
    """Read a possibly compressed name: (its lowercase uncompressed wire form, the offset just
    past it where it starts). For the slow path (CNAME targets of upstream replies).

    Every pointer must point before the label that holds it, so a loop is impossible; a name
    longer than 255 octets, an unknown label type or a name past the end raises ValueError.
    """
    labels, size, end, limit = [], 0, None, pos
    while True:
        if pos >= len(data):
            raise ValueError("name runs past the end")
        length = data[pos]
        if length >= 0xC0:
            if pos + 1 >= len(data):
                raise ValueError("name runs past the end")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= limit:
                raise ValueError("compression pointer does not point backwards")
            if end is None:
                end = pos + 2
            pos = limit = target
            continue
        if length > 63:
            raise ValueError("unknown label type")
        size += length + 1
        if size > MAX_NAME:
            raise ValueError("name longer than 255 octets")
        if length == 0:
            labels.append(b"\x00")
            return b"".join(labels).lower(), pos + 1 if end is None else end
        if pos + 1 + length > len(data):
            raise ValueError("name runs past the end")
        labels.append(data[pos:pos + 1 + length])
        pos += 1 + length


def _bare_error(data: bytes, flags: int, rcode: int) -> bytes:
    """Header-only error answer: the question may be what is broken, so echo none of it."""
    return data[:2] + _COUNTS.pack(reply_flags(flags, rcode), 0, 0, 0, 0)


def _badvers(data: bytes, flags: int) -> bytes:
    """RFC 6891 BADVERS: the upper rcode bits travel in our OPT record."""
    return (data[:2] + _COUNTS.pack(reply_flags(flags, 0), 0, 0, 0, 1)
            + opt_record(False, ext_rcode=BADVERS >> 4))


def reply_flags(query_flags: int, rcode: int) -> int:
    """Answer flags: QR and RA set, opcode, RD and CD echoed, not authoritative."""
    return QR | RA | (query_flags & (OPCODE | RD | CD)) | rcode


def header(q: Query, rcode: int, an: int, ns: int, ar: int) -> bytes:
    """An answer header for q with its ID and one question."""
    return q.data[:2] + _COUNTS.pack(reply_flags(q.flags, rcode), 1, an, ns, ar)


def opt_record(do: bool, options: bytes = b"", ext_rcode: int = 0, size: int = 1232) -> bytes:
    """An OPT pseudo-record advertising `size`, echoing DO (RFC 3225), with `options`."""
    ttl = (ext_rcode << 24) | (0x8000 if do else 0)
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, size, ttl, len(options)) + options


PLAIN_OPT = (opt_record(False), opt_record(True))  # by DO: the OPT of most EDNS answers


def ede_option(code: int, text: str) -> bytes:
    """An Extended DNS Error option (RFC 8914)."""
    raw = text.encode()
    return struct.pack("!HHH", EDE_OPTION, 2 + len(raw), code) + raw


def error_answer(q: Query, rcode: int, options: bytes = b"") -> bytes:
    """An answer with no records and this rcode, EDNS echoed when the client used it."""
    if not q.edns:
        return header(q, rcode, 0, 0, 0) + q.question
    return header(q, rcode, 0, 0, 1) + q.question + opt_record(q.do, options)


def truncated(q: Query) -> bytes:
    """The TC=1 answer that tells a UDP client to retry over TCP."""
    out = bytearray(error_answer(q, NOERROR))
    out[2] |= TC >> 8
    return bytes(out)


def fit(q: Query, answer: bytes) -> bytes:
    """Truncate an answer the client's UDP buffer cannot take (512 without EDNS); an answer
    too big for any message (a TCP frame holds 65,535 bytes, RFC 1035 4.2.2) is SERVFAIL."""
    if q.transport == "udp":
        if len(answer) > q.udp_size:
            return truncated(q)
    elif len(answer) > MAX_MESSAGE:
        return error_answer(q, SERVFAIL)
    return answer


def answers(data: bytes, q: Query) -> bool:
    """Whether an upstream's reply answers q: a response with one question, the same name (in
    any case), type and class. The ID is the caller's to check (it knows what it sent)."""
    end = HEADER_SIZE + len(q.question)
    return bool(len(data) >= end and data[2] & (QR >> 8) and data[4:6] == b"\x00\x01"
                and data[HEADER_SIZE:end - 4].lower() == q.name
                and data[end - 4:end] == q.question[-4:])


def framed(message: bytes) -> bytes:
    """A message as it goes over TCP or TLS: after its two-byte length (RFC 1035 4.2.2)."""
    return len(message).to_bytes(2, "big") + message


def unframe(buffer: bytearray, most: int = MAX_MESSAGE) -> list[bytes]:
    """Take every whole length-prefixed message off the front of a stream buffer, or the
    `most` first; a partial one, and those beyond `most`, stay for the next read."""
    messages: list[bytes] = []
    while len(buffer) >= 2 and len(messages) < most:
        end = 2 + ((buffer[0] << 8) | buffer[1])
        if len(buffer) < end:
            break
        messages.append(bytes(buffer[2:end]))
        del buffer[:end]
    return messages


def upstream_query(q: Query, qid: int, udp_size: int) -> bytes:
    """The query we send upstream: a fresh ID, RD, the client's CD, always EDNS with its DO.

    AD is set so a validating upstream tells us the data is authentic (RFC 6840 5.7); we clear
    it again for clients that asked for neither AD nor DO.
    """
    flags = RD | AD | (q.flags & CD)
    opts = _UPSTREAM_OPTS.get(udp_size)
    if opts is None:  # once per size: the OPT record is the same for every query
        opts = _UPSTREAM_OPTS[udp_size] = (opt_record(False, size=udp_size),
                                           opt_record(True, size=udp_size))
    return _HEADER.pack(qid, flags, 1, 0, 0, 1) + q.question + opts[q.do]


_UPSTREAM_OPTS: dict[int, tuple[bytes, bytes]] = {}  # EDNS size -> OPT without DO, with DO
