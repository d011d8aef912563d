"""Scrubbing upstream replies: records that do not belong to the answer are neither cached
nor served, as Unbound's scrubber (iterator/iter_scrub.c) removes them.

A forged or broken reply can carry records the question never asked about: an A record for
another name in the answer section, an NS record for a whole TLD in the authority section, an
address for the attacker's name server in the additional one. Whatever a client does with
them, we must not pass them on, nor replay them from the cache to every client. What stays:

- answer: the records owned by a name of the question's CNAME chain (the question name, then
  each CNAME target the chain reaches, in any order), and DNAME records owned by an ancestor
  of one (RFC 6672 answers carry the DNAME beside the CNAME it synthesized);
- authority and additional: the records at or below the zone of the answer, which is the
  deepest owner of an SOA or NS record in the authority section that encloses the chain's last
  name (the zone that answered for it), or, when there is none, that name itself; and the OPT
  record.

The usual reply, a positive answer whose records are all owned by a pointer to the question
name (no CNAME), is recognized by a walk over its fixed fields, without reading a name, and
kept as a minimal response: its answer section alone, whatever the authority and additional
sections held (the zone's NS records and their addresses, which no stub resolver needs), as
Unbound's and BIND's minimal responses give it. Reading every name of such a reply to check
them cost about 6 us a forward, a quarter of the whole cold path. Any other reply whose
records all stay is passed on as it came, byte for byte; one that loses records is written
again without them, its names uncompressed (a pointer could point into a record that is
gone).

Pure: bytes in, bytes out. Malformed records raise ValueError (or IndexError, struct.error),
as reply.scan_reply does, and the caller treats the reply as unusable.
"""

from __future__ import annotations

import struct

from resolver.message import wire
from resolver.message.constants import HEADER_SIZE, TYPE_CNAME, TYPE_OPT, TYPE_SOA

TYPE_NS, TYPE_PTR, TYPE_MX, TYPE_DNAME = 2, 12, 15, 39
_COUNTS = struct.Struct("!HHH")  # answer, authority, additional counts
_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_CHAIN_TYPES = (TYPE_CNAME, TYPE_DNAME)  # both below 256: their first byte is 0
_OPT = b"\x00" + TYPE_OPT.to_bytes(2, "big")  # an OPT record's root owner and type
# Record types whose data holds names that may be compressed (RFC 3597 4: those of RFC 1035
# only), as (bytes before the first name, names, bytes after them).
_NAMES_IN_DATA = {TYPE_NS: (0, 1, 0), TYPE_CNAME: (0, 1, 0), TYPE_PTR: (0, 1, 0),
                  TYPE_DNAME: (0, 1, 0), TYPE_MX: (2, 1, 0), TYPE_SOA: (0, 2, 20)}

ANSWER, AUTHORITY, ADDITIONAL = 0, 1, 2


class Record:
    """One resource record of a reply, located in its bytes."""

    __slots__ = ("section", "owner", "rtype", "fixed", "rdata", "end")

    def __init__(self, section: int, owner: bytes, rtype: int, fixed: int, rdata: int,
                 end: int):
        self.section, self.owner, self.rtype = section, owner, rtype
        self.fixed, self.rdata, self.end = fixed, rdata, end  # offsets in the message


def scrub(data: bytes, qend: int) -> bytes:
    """The reply with only the records that belong to its answer (see the module's words):
    `data` itself when all of them do. qend: where the question section ends."""
    an, ns, ar = _COUNTS.unpack_from(data, 6)
    if an and not data[3] & 0xF:  # a positive answer: plain, if every record is the name's
        # the walk over fixed fields, written out (it runs for every forward): each owner a
        # pointer to the question name (0xC00C), no type CNAME (5) or DNAME (39)
        pos = qend
        for _ in range(an):
            if (data[pos] != 0xC0 or data[pos + 1] != HEADER_SIZE or data[pos + 2]
                    or data[pos + 3] in _CHAIN_TYPES):
                break
            pos += 12 + ((data[pos + 10] << 8) | data[pos + 11])
        else:
            if pos <= len(data):
                if not ns and (not ar or (ar == 1 and data[pos:pos + 3] == _OPT)):
                    return data  # nothing beside the answer, or the OPT record alone
                # a minimal response: the answer alone (render adds each client's OPT)
                return data[:6] + _COUNTS.pack(an, 0, 0) + data[HEADER_SIZE:pos]
    records = read_records(data, qend)
    kept = belonging(records, data[HEADER_SIZE:qend - 4].lower(), data)
    if len(kept) == len(records):
        return data
    return _rewrite(data, qend, kept)


def read_records(data: bytes, qend: int) -> list[Record]:
    """Every record after the question, with its owner name (lowercase wire form)."""
    an, ns, ar = _COUNTS.unpack_from(data, 6)
    records, pos = [], qend
    for index in range(an + ns + ar):
        section = ANSWER if index < an else AUTHORITY if index < an + ns else ADDITIONAL
        owner, fixed = wire.read_name(data, pos)
        rtype, _, _, rdlength = _FIXED.unpack_from(data, fixed)
        end = fixed + 10 + rdlength
        if end > len(data):
            raise ValueError("record runs past the end")
        records.append(Record(section, owner, rtype, fixed, fixed + 10, end))
        pos = end
    return records


def belonging(records: list[Record], qname: bytes, data: bytes) -> list[Record]:
    """The records that stay, in their order."""
    chain = _chain(records, qname, data)
    last = chain[-1]
    zone = max((r.owner for r in records if r.section == AUTHORITY
                and r.rtype in (TYPE_SOA, TYPE_NS) and at_or_below(last, r.owner)),
               key=len, default=last)
    names = set(chain)

    def stays(record: Record) -> bool:
        if record.section == ANSWER:
            return record.owner in names or (record.rtype == TYPE_DNAME and any(
                at_or_below(name, record.owner) for name in chain))
        return ((record.section == ADDITIONAL and record.rtype == TYPE_OPT)
                or at_or_below(record.owner, zone))

    return [record for record in records if stays(record)]


def _chain(records: list[Record], qname: bytes, data: bytes) -> list[bytes]:
    """The question name, then each CNAME target the answer section leads it to; a loop or a
    second CNAME for one name ends it (each name is followed once)."""
    targets: dict[bytes, Record] = {}
    for record in records:
        if record.section == ANSWER and record.rtype == TYPE_CNAME:
            targets.setdefault(record.owner, record)
    chain = [qname]
    while (found := targets.pop(chain[-1], None)) is not None:
        target, _ = wire.read_name(data, found.rdata)
        if target in chain:
            break
        chain.append(target)
    return chain


def at_or_below(name: bytes, zone: bytes) -> bool:
    """Whether a name (lowercase wire form) is zone or a name under it, label by label."""
    pos = 0
    while True:
        if name[pos:] == zone:
            return True
        length = name[pos]
        if not length:
            return False
        pos += length + 1


def _rewrite(data: bytes, qend: int, kept: list[Record]) -> bytes:
    """The message again with only `kept`, every name written out in full."""
    counts = [0, 0, 0]
    out = [b""]  # the header, once the counts are known
    for record in kept:
        counts[record.section] += 1
        out.append(record.owner)
        rdata = _rdata(data, record)
        out.append(data[record.fixed:record.fixed + 8] + len(rdata).to_bytes(2, "big") + rdata)
    out[0] = data[:6] + _COUNTS.pack(*counts) + data[HEADER_SIZE:qend]
    return b"".join(out)


def _rdata(data: bytes, record: Record) -> bytes:
    """A record's data, with the names of the types that may compress them written out."""
    shape = _NAMES_IN_DATA.get(record.rtype)
    if shape is None:
        return data[record.rdata:record.end]
    before, names, after = shape
    pos = record.rdata + before
    parts = [data[record.rdata:pos]]
    for _ in range(names):
        name, pos = wire.read_name(data, pos)
        parts.append(name)
    if pos + after != record.end:
        raise ValueError(f"type {record.rtype} data does not have its shape")
    parts.append(data[pos:record.end])
    return b"".join(parts)
