"""The resolver_process_* metrics: what one process uses, read from /proc when scraped.

Each process reports its own under a `process` label (`main`, `supervisor`, `worker-N`), so
the supervisor's merge, which adds workers' samples up, keeps them apart: their label values
differ. prometheus-client's ProcessCollector reads the same files, but exports unprefixed
names without a label, which would collide once several processes' samples are merged.
A value that cannot be read (no /proc: not Linux) is left out rather than made up.

Also `die_with_parent`, for the processes the server forks (workers, rule compiles).
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # prctl(2)
PROC = "/proc/self"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def usage(proc: str = PROC) -> dict[str, tuple[str, str, float]]:
    """This process' CPU time, resident memory, open descriptors and start time: by metric
    name (under the namespace), its type and help and the value read now."""
    times = os.times()
    found = {"process_cpu_seconds_total": ("counter", "CPU time (user and system) used, by "
                                           "process.", times.user + times.system)}
    read: list[tuple[str, str, Callable[[str], float]]] = [
        ("process_resident_memory_bytes", "Resident memory, by process.", _resident),
        ("process_open_fds", "Open file descriptors, by process.", _open_fds),
        ("process_start_time_seconds", "Unix time the process started, by process.",
         _start_time)]
    for name, help, reader in read:
        try:
            found[name] = ("gauge", help, reader(proc))
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    return found


def _resident(proc: str) -> float:
    with open(f"{proc}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _open_fds(proc: str) -> float:
    return len(os.listdir(f"{proc}/fd"))


def _start_time(proc: str) -> float:
    """Boot time plus the start in clock ticks since boot (field 22 of stat, counted after
    the command name, which may hold spaces and parentheses)."""
    with open(f"{proc}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    with open("/proc/stat", "rb") as system:
        boot = next(line for line in system if line.startswith(b"btime "))
    return float(boot.split()[1]) + int(fields[19]) / _TICKS


def die_with_parent(signum: signal.Signals) -> None:
    """Ask Linux to send this process signum when its parent dies, even by SIGKILL; where
    that cannot be asked (not Linux) the child outlives a killed parent."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        pass
