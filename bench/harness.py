"""What the hand-run benchmarks share: starting and stopping their own processes, free
ports on 127.0.0.1, and naming the commit they measured.

Every process is started in its own session and stopped by the PID this module got back,
never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0


class Processes:
    """Every process this script started, each in its own session; stopped by PID."""

    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=out,
                                    start_new_session=True, **kw)
        self.live[proc.pid] = proc
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the session this script started for proc, SIGKILL after STOP_TIMEOUT."""
        self.live.pop(proc.pid, None)
        if proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # its own session: pgid == the pid we started
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for proc in list(self.live.values()):
            self.stop(proc)


def free_port() -> int:
    """A port free on HOST for both UDP and TCP at this moment."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
                return port


def revision() -> str:
    """The commit the server runs (installed editable, so the working tree), and whether
    resolver/ differs from it."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return out.stdout.strip()
    changed = git("status", "--porcelain", "resolver")
    dirty = " + uncommitted changes in resolver/" if changed else ""
    return f"{git('rev-parse', '--short', 'HEAD') or '?'}{dirty}"


def clean_up(procs: Processes, work: Path, keep: bool) -> None:
    """Stop every process a run started and remove its scratch folder (unless asked to keep)."""
    procs.stop_all()
    if keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
