"""What /healthz and /readyz answer: pure judgements of what each event loop said when asked.

The HTTP thread asks every event loop that answers queries (the one loop of a single process,
or each worker's, over its ping pipe: server/supervisor.py) for a `Status`, giving each
LOOP_DEADLINE seconds; a loop that does not answer in time is `None`. From those answers:

- live (/healthz): every loop answered. A loop that cannot run a callback within a second
  is not answering queries either (a CPU-bound stall, a deadlock, a stopped process), and
  restarting the process is the cure;
- ready (/readyz): live, every loop has a rule set, and the upstreams are not failing: an
  upstream answered within READY_WINDOW seconds, or none was needed, meaning no upstream
  attempt failed in that time either. An attempt still waiting for its reply is not judged
  until it times out, so the first forward after a quiet spell does not flap readiness.
  Not ready takes a resolver out of a load balancer's rotation; it is not restarted.

Times are each loop's own monotonic clock (the injected one), read on that loop, so a test's
fake clock drives the whole judgement; only ages (now - then) leave the loop's process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

LOOP_DEADLINE = 1.0  # seconds a loop has to answer a probe
READY_WINDOW = 30.0  # seconds an upstream answer (or failure) counts for readiness


@dataclass(frozen=True, slots=True)
class Status:
    """What one event loop reports about itself, on its own clock (picklable: workers send
    it to their supervisor)."""

    rules: str | None  # the version of the rule set in force; None: none loaded
    now: float  # the loop's clock when it answered
    answered: float | None  # when an upstream last replied; None: never
    failed: float | None  # when an upstream attempt last failed; None: never


# Each loop's name (`main`, `worker-0`, ...) and what it said; None: no answer in time.
Probed = Sequence[tuple[str, Status | None]]


class Probe(Protocol):
    """Asks every loop for its Status (blocks up to about LOOP_DEADLINE seconds)."""

    def __call__(self) -> Probed: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's result: whether it passed, and the plain-text body that says why."""

    ok: bool
    text: str


def liveness(probed: Probed) -> Verdict:
    """Every loop answered its probe."""
    if not probed:
        return Verdict(False, "no event loop is running\n")
    silent = [name for name, status in probed if status is None]
    if silent:
        return Verdict(False, f"the event loop of {', '.join(silent)} did not answer within "
                              f"{LOOP_DEADLINE:g} s\n")
    return Verdict(True, "ok\n")


def readiness(probed: Probed, window: float = READY_WINDOW) -> Verdict:
    """Live, rules loaded everywhere, and the upstreams answering or not needed (the
    module's docstring). The upstreams are judged across loops, which share them: the
    freshest answer and the freshest failure anywhere count."""
    live = liveness(probed)
    if not live.ok:
        return live
    statuses = [(name, status) for name, status in probed if status is not None]
    problems = [f"{name}: no rules loaded" for name, status in statuses if status.rules is None]
    answered = _youngest(s.now - s.answered for _, s in statuses if s.answered is not None)
    failed = _youngest(s.now - s.failed for _, s in statuses if s.failed is not None)
    if failed is not None and failed <= window and (answered is None or answered > window):
        since = "ever" if answered is None else f"for {answered:.0f} s"
        problems.append(f"no upstream answered {since}, and an upstream attempt failed "
                        f"{failed:.1f} s ago")
    if problems:
        return Verdict(False, "".join(f"{problem}\n" for problem in problems))
    return Verdict(True, "ok\n")


def _youngest(ages: Iterable[float]) -> float | None:
    return min(ages, default=None)
