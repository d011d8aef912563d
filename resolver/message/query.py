"""The decoded query every stage reads, and the outcome labels answers are counted under.

A Query is built once per packet by `wire.parse_query` and then only read. It keeps the raw
bytes next to the few decoded fields the stages need, so answers can be made by patching bytes
instead of parsing and re-packing whole messages.
"""

from __future__ import annotations

# What makes two questions share an answer: name (lowercase wire form), type, class, the DO
# bit, and the CD bit (as it sits in the flags).
CacheKey = tuple[bytes, int, int, bool, int]


class Outcome:
    """How a query was answered: the values of the `outcome` label of resolver_queries_total.

    Plain strings rather than an Enum: they are metric label values, used as they are on
    every answer (an Enum member's `.value` is a property call each time).
    """

    BLOCKED = "blocked"
    CACHED = "cached"
    STALE = "stale"  # an expired answer, served because upstreams failed (RFC 8767)
    FORWARDED = "forwarded"
    SERVFAIL = "servfail"
    FORMERR = "formerr"
    DROPPED = "dropped"
    REFUSED = "refused"  # the client is outside server.allow (stages/access.py)
    RATELIMITED = "ratelimited"  # over its prefix's rate limit: dropped or slipped (TC=1)
    MINIMAL = "minimal"  # an ANY query over UDP, given RFC 8482's one record (minimal_any.py)
    ALL = (BLOCKED, CACHED, STALE, FORWARDED, SERVFAIL, FORMERR, DROPPED, REFUSED, RATELIMITED,
           MINIMAL)


class Query:
    """One client question, decoded from the wire just enough to route it.

    Attributes:
        data: the packet as received.
        flags: the header's flags word.
        question: the question section exactly as sent (name case included), echoed in answers.
        name: the question name in lowercase wire form, the key for rules and the cache.
        offsets: start of each label in `name`, most specific first, for suffix lookups.
        qtype, qclass: from the question.
        edns: whether the client sent an OPT record (answers then carry one too).
        udp_size: the largest UDP answer the client accepts (512 without EDNS).
        do: the client's DNSSEC OK bit.
        client: the client's address tuple; transport: "udp" or "tcp".
        received: by the server's clock, when a query going upstream came (a timed one:
            pipeline.TIME_EVERY), or else when it was handed to the forwarder, a few
            microseconds later: its answer's duration is measured from it.
    """

    __slots__ = ("data", "flags", "question", "name", "offsets", "qtype", "qclass",
                 "edns", "udp_size", "do", "client", "transport", "received", "cache_key")

    def __init__(self, data: bytes, flags: int, question: bytes, name: bytes,
                 offsets: list[int], qtype: int, qclass: int, edns: bool, udp_size: int,
                 do: bool, client: tuple[str, int], transport: str):
        self.data = data
        self.flags = flags
        self.question = question
        self.name = name
        self.offsets = offsets
        self.qtype = qtype
        self.qclass = qclass
        self.edns = edns
        self.udp_size = udp_size
        self.do = do
        self.client = client
        self.transport = transport
        self.received = 0.0  # set when the query goes upstream: local answers need none
        # What makes two questions share an answer: name, type, class, DO and CD. Built once:
        # the cache, its stages and the forwarder each look it up.
        self.cache_key = (name, qtype, qclass, do, flags & 0x0010)
