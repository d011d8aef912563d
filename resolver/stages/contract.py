"""What a stage returns, where answers go, and the one place an exception becomes SERVFAIL.

A stage looks at a decoded Query and says one of four things, each a type of its own:
- `Answered`: here is the answer (bytes), its outcome label, and whether the packet cache may
  replay it to the next identical query, and until when (`Replay`);
- `PASS`: not mine, ask the next stage; `PASS_PER_CLIENT` says the same, but what the chain
  answers from here on holds for this client only (see below);
- `FORWARD`: no later stage can answer, go upstream now;
- `DROP`: send nothing.

Stages that depend on who asks (access control, rate limits, client-scoped or percentage
rule lists) must not let one client's answer be replayed to another. A stage that answers on
the client's account returns an `Answered` without a `Replay`. A stage that passes on the
client's account (the name is on a list this client is outside of) returns
`PASS_PER_CLIENT`, and the pipeline then keeps whatever a later stage answers out of the
packet cache. The answer cache needs nothing: it holds upstream replies, which are the same
for every client; only its CNAME verdicts depend on the rules, and docs/design.md says how a
per-client rule must treat them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

from resolver.message import wire
from resolver.message.constants import SERVFAIL, Cancellable
from resolver.message.query import Outcome, Query

if TYPE_CHECKING:
    from resolver.ops.metrics import Tally

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long the packet cache may replay an answer (by the clock; NEVER: until the rules
# change), and the counter a replay bumps with its key, so a replay counts as the full path.
Replay = tuple[float, "Tally", tuple[str, ...]]


class Answered:
    """A stage's answer: the bytes, the `outcome` label, and its Replay (None: never replayed,
    for answers that change under the cache or hold for one client only)."""

    __slots__ = ("data", "outcome", "replay")

    def __init__(self, data: bytes, outcome: str, replay: Replay | None = None):
        self.data = data
        self.outcome = outcome
        self.replay = replay


class Pass:
    """Not this stage's to answer (the singletons PASS and PASS_PER_CLIENT)."""

    __slots__ = ("per_client",)

    def __init__(self, per_client: bool):
        self.per_client = per_client


class Forward:
    """Go upstream now (the singleton FORWARD): the cache holds nothing at all for the
    question, so the stages after it, which only read its entries, are skipped."""

    __slots__ = ()


class Later:
    """What the pipeline returns for a query handed to the forwarder (the singleton LATER):
    its answer comes through the sink's `deliver`. Never a stage's result."""

    __slots__ = ()


class Drop:
    """Send nothing (the singleton DROP)."""

    __slots__ = ()


PASS: Final = Pass(False)
PASS_PER_CLIENT: Final = Pass(True)
FORWARD: Final = Forward()
DROP: Final = Drop()
LATER: Final = Later()

Result = Answered | Pass | Forward | Drop


class Stage(Protocol):
    """One synchronous step of the chain (see server.app.build_pipeline for the order)."""

    def answer(self, q: Query) -> Result: ...


class Sink(Protocol):
    """Where a later answer goes: the transport that knows how to reach the client."""

    name: str  # the `protocol` label: udp or tcp

    def deliver(self, answer: bytes, client: tuple[str, int]) -> None: ...


class CallLater(Protocol):
    """Run callback(arg) after delay seconds unless cancelled: loop.call_later in the
    server, a recording fake in tests. How stages and the forwarder arm timers without
    touching the loop."""

    def __call__(self, delay: float, callback: Callable[[_T], object], arg: _T, /
                 ) -> Cancellable: ...


class Deliver(Protocol):
    """The forwarder's one callback: a later answer with its outcome, for q's client, and
    the label of the upstream whose reply it came from ("" when none did: a stale answer,
    or SERVFAIL after no reply). Clients that waited on one question share its upstream."""

    def __call__(self, q: Query, sink: Sink, answer: bytes, outcome: str, upstream: str
                 ) -> None: ...


class QueryObserver(Protocol):
    """Sees every query answered or dropped, after it is counted (the query log): q, None
    when the packet could not be decoded; the transport (`protocol` label) and outcome;
    the answer sent, None when nothing was; seconds from receipt to the answer handed to
    the transport; the upstream label as for Deliver. Called on the event loop for every
    query, so it must be quick; an exception it raises is logged and costs no answer."""

    def offer(self, q: Query | None, transport: str, outcome: str, answer: bytes | None,
              duration: float, upstream: str) -> None: ...


def servfail(q: Query, error: Exception) -> Answered:
    """The answer to a query whose handling raised: SERVFAIL, logged with the traceback.

    The one place an exception becomes SERVFAIL: the pipeline calls it around the
    synchronous stages, the forwarder around each later answer, so a bug costs one answer,
    never a silent client or an uncounted query.
    """
    log.error("unexpected error while answering a query", exc_info=error)
    return Answered(wire.error_answer(q, SERVFAIL), Outcome.SERVFAIL)
