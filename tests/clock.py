"""The one fake clock of the tests, injected wherever the resolver reads time.

Pure tests use it still: it moves only when the test steps it, so a TTL boundary or a
timeout is exact. End-to-end tests use it live (`live=True`): it runs with real time from
wherever the test last set it, so upstream timeouts and sweeps still fire while the test can
jump a cache entry to its expiry.
"""

from __future__ import annotations

import time

START = 1000.0  # what the clock reads at first: any value works, a round one reads well


class FakeClock:
    """Monotonic seconds that a test sets (`at`, `advance`, `now = ...`)."""

    def __init__(self, *, live: bool = False, start: float = START):
        self._live = live
        self._base = start
        self._since = time.monotonic()

    def __call__(self) -> float:
        if self._live:
            return self._base + (time.monotonic() - self._since)
        return self._base

    @property
    def now(self) -> float:
        return self()

    @now.setter
    def now(self, value: float) -> None:
        self._base = value
        self._since = time.monotonic()

    def at(self, elapsed: float) -> None:
        """Read START + elapsed from now on (and run on from there, if live)."""
        self.now = START + elapsed

    def advance(self, seconds: float) -> None:
        self.now = self.now + seconds
