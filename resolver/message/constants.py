"""Numbers every layer shares: header flags, rcodes, record types, sizes, and the clock's ends.

A leaf module with no imports of its own, so the message layer, the stages, the upstream
transports and the config can all take from it without an import cycle.
"""

from collections.abc import Callable
from typing import Protocol

HEADER_SIZE = 12  # bytes before the question
QR, TC, RD, RA, AD, CD = 0x8000, 0x0200, 0x0100, 0x0080, 0x0020, 0x0010  # flag bits
OPCODE = 0x7800
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
TYPE_A, TYPE_CNAME, TYPE_SOA, TYPE_AAAA, TYPE_OPT = 1, 5, 6, 28, 41
CLASS_IN = 1
EDE_OPTION = 15
MAX_NAME = 255
CLASSIC_UDP = 512
MAX_MESSAGE = 65535  # what a TCP frame's two-byte length can say
MAX_TTL = 2**31 - 1  # RFC 2181 8: the largest TTL a record may carry

NEVER = float("inf")  # a time the clock never reaches: "holds until something else changes"
ALWAYS = float("-inf")  # a time the clock is always past

Clock = Callable[[], float]  # seconds, monotonic; injected so tests can step time


class Cancellable(Protocol):
    """A timer or an attempt in flight, as its owner may stop it (loop.call_later's handle,
    a stream attempt's task)."""

    def cancel(self) -> object: ...
