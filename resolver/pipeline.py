"""The query path from bytes to answer, shared by the UDP and TCP transports.

A packet is decoded once, offered to the synchronous stages in order, and only if none of them
answers does it become an asyncio task that goes upstream. This is also the one place where an
unexpected exception becomes SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from . import wire
from .forward import Forwarder
from .metrics import Metrics
from .query import Outcome, Query
from .upstream import UpstreamError

log = logging.getLogger(__name__)

PENDING = b""  # handle()'s answer when it will come later through sink.deliver


class Stage(Protocol):
    """A synchronous step that may answer a query (returns bytes) or pass it on (None)."""

    outcome: str

    def answer(self, q: Query) -> bytes | None: ...


class Sink(Protocol):
    """Where answers go: a transport that knows how to reach the client."""

    name: str

    def deliver(self, answer: bytes, client: tuple) -> None: ...


class Pipeline:
    """Decode, the synchronous stages, then forwarding as a bounded number of tasks."""

    def __init__(self, stages: list[Stage], forwarder: Forwarder, metrics: Metrics,
                 max_inflight: int):
        self.stages = stages
        self._forwarder = forwarder
        self._metrics = metrics
        self._max_inflight = max_inflight
        self._tasks: set[asyncio.Task] = set()
        metrics.gauge("inflight", "Queries waiting for an upstream answer.", (),
                      lambda: {(): len(self._tasks)})

    def handle(self, data: bytes, client: tuple, sink: Sink) -> bytes | None:
        """Answer a packet now (the bytes returned), later (PENDING: through sink.deliver), or
        never (None: dropped)."""
        try:
            q = wire.parse_query(data, client, sink.name)
        except wire.FormError as exc:
            outcome = Outcome.FORMERR if exc.response is not None else Outcome.DROPPED
            self._metrics.queries.inc((sink.name, outcome.value))
            return exc.response
        for stage in self.stages:
            answer = stage.answer(q)
            if answer is not None:
                self._metrics.queries.inc((sink.name, stage.outcome))
                return answer
        if len(self._tasks) >= self._max_inflight:  # shed load instead of growing memory
            self._metrics.queries.inc((sink.name, Outcome.DROPPED.value))
            return None
        task = asyncio.get_running_loop().create_task(self._forward(q, sink))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return PENDING

    async def _forward(self, q: Query, sink: Sink) -> None:
        try:
            answer, outcome = await self._forwarder.resolve(q)
        except UpstreamError as exc:
            log.debug("upstream failed: %s", exc)
            answer, outcome = wire.error_answer(q, wire.SERVFAIL), Outcome.SERVFAIL
        except Exception:
            log.exception("unexpected error while forwarding")
            answer, outcome = wire.error_answer(q, wire.SERVFAIL), Outcome.SERVFAIL
        self._metrics.queries.inc((q.transport, outcome.value))
        sink.deliver(answer, q.client)

    async def drain(self) -> None:
        """Cancel forwarding still in flight (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._forwarder.drain()
