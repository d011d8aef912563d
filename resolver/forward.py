"""The last stage: ask upstream, once per distinct question in flight, and cache the reply.

Identical questions that arrive while one is already upstream wait for that one's reply
instead of sending their own, so an expiring popular name costs the upstream one query, not a
stampede.
"""

from __future__ import annotations

import asyncio
import struct

from .cache import Cache
from .query import Query
from .reply import Reply, TtlPolicy, render, scan_reply
from .upstream import UpstreamError, UpstreamPool


class Forwarder:
    """Resolves a query through the upstream pool, coalescing identical questions."""

    def __init__(self, upstreams: UpstreamPool, cache: Cache, policy: TtlPolicy):
        self._upstreams = upstreams
        self._cache = cache
        self._policy = policy
        self._inflight: dict[tuple, asyncio.Future] = {}

    async def resolve(self, q: Query) -> bytes:
        """The answer for q; raises UpstreamError when no upstream gave one."""
        key = q.cache_key
        shared = self._inflight.get(key)
        if shared is not None:
            return render(q, await asyncio.shield(shared), 0)
        shared = asyncio.get_running_loop().create_future()
        shared.add_done_callback(_retrieve)
        self._inflight[key] = shared
        try:
            reply = await self._fetch(q)
        except Exception as exc:
            shared.set_exception(exc)
            raise
        except BaseException:
            shared.cancel()
            raise
        else:
            shared.set_result(reply)
        finally:
            del self._inflight[key]
        return render(q, reply, 0)

    async def _fetch(self, q: Query) -> Reply:
        data = await self._upstreams.query(q)
        try:
            reply = scan_reply(data, 12 + len(q.question), self._policy)
        except (ValueError, IndexError, struct.error) as exc:
            raise UpstreamError(f"malformed reply: {exc}") from exc
        self._cache.put(q.cache_key, reply)
        return reply


def _retrieve(future: asyncio.Future) -> None:
    """Mark a shared failure as seen, so asyncio does not log it when nobody else waited."""
    if not future.cancelled():
        future.exception()
