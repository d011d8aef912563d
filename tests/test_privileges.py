"""Dropping root (resolver/server/privileges.py): `resolver serve --user nobody`, started as
root, binds a privileged port and then runs every process as nobody, with no groups; a worker
started again after a crash is nobody too and serves the same port. Needs root (CI runs as
root); elsewhere these tests skip, but for the pure ones at the end."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.server import privileges
from resolver.server.privileges import PrivilegeError
from tests.servers import LOOPBACK, NsdServer

RULES = "lists:\n  - name: first\n    domains: [blocked.test]\n"
NOBODY = "nobody"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


def privileged_port() -> int:
    """A port below 1024 free for UDP and TCP on 127.0.0.1: only root may bind it."""
    for port in range(1000, 600, -1):
        try:
            with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
                tcp.bind((LOOPBACK, port))
                udp.bind((LOOPBACK, port))
                return port
        except OSError:
            continue
    raise RuntimeError("no privileged port free")


def ids(pid: int) -> dict[str, list[str]]:
    """The Uid, Gid and Groups lines of /proc/PID/status (real, effective, saved, fs)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: rest.split() for key, _, rest in (line.partition(":") for line in lines)
            if key in ("Uid", "Gid", "Groups")}


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def wait_for(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def blocked(port: int) -> bool:
    query = dns.message.make_query("www.blocked.test", "A")
    return dns.query.udp(query, LOOPBACK, port=port, timeout=3).rcode() == dns.rcode.NXDOMAIN


@pytest.fixture
def serve_as_nobody(tmp_path: Path, nsd_upstream: NsdServer
                    ) -> Iterator[Callable[[int], tuple[subprocess.Popen[str], int]]]:
    started: list[subprocess.Popen[str]] = []

    def start(workers: int) -> tuple[subprocess.Popen[str], int]:
        port = privileged_port()
        (tmp_path / "rules.yaml").write_text(RULES)
        (tmp_path / "resolver.yaml").write_text("blocking:\n  watch_interval: 0\n")
        process = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "-c", str(tmp_path / "resolver.yaml"),
             "--workers", str(workers), "--user", NOBODY, "--listen", f"{LOOPBACK}:{port}",
             "--upstream", nsd_upstream.address, "--rules", str(tmp_path / "rules.yaml"),
             "--metrics", "off"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stderr is not None
        banner = process.stdout.readline()
        assert "listening on" in banner, process.stderr.read()
        return process, port

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


@as_root
@pytest.mark.parametrize("workers", [1, 2])
def test_every_process_runs_as_the_user_with_no_groups(serve_as_nobody, workers: int) -> None:
    process, port = serve_as_nobody(workers)
    assert blocked(port)
    entry = pwd.getpwnam(NOBODY)
    processes = [process.pid, *children(process.pid)]
    assert len(processes) == (1 if workers == 1 else 1 + workers)
    for pid in processes:
        assert ids(pid) == {"Uid": [str(entry.pw_uid)] * 4, "Gid": [str(entry.pw_gid)] * 4,
                            "Groups": []}, pid


@as_root
def test_a_worker_started_again_is_the_user_and_serves_the_privileged_port(
        serve_as_nobody) -> None:
    process, port = serve_as_nobody(2)
    victim = children(process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(process.pid)) == 2 and victim not in children(process.pid))
    fresh = [pid for pid in children(process.pid) if pid != victim]
    assert all(ids(pid)["Uid"] == [str(pwd.getpwnam(NOBODY).pw_uid)] * 4 for pid in fresh)
    assert all(blocked(port) for _ in range(20))  # many source ports: both workers answer
    assert process.poll() is None


@as_root
def test_an_unknown_user_stops_the_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resolver", "serve", "--user", "no-such-user-here",
         "--listen", f"{LOOPBACK}:0", "--upstream", "127.0.0.1:9", "--metrics", "off",
         "--workers", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no user named 'no-such-user-here'" in result.stderr


def test_a_group_needs_a_user() -> None:
    with pytest.raises(PrivilegeError, match="needs a user"):
        privileges.drop(None, "nogroup")


def test_no_user_changes_nothing() -> None:
    before = os.getresuid()
    privileges.drop(None, None)
    assert os.getresuid() == before


@pytest.mark.parametrize(("euid", "user", "warned"), [(0, None, True), (0, "nobody", False),
                                                      (1000, None, False)])
def test_root_without_a_user_is_warned(monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture, euid: int,
                                       user: str | None, warned: bool) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    with caplog.at_level(logging.WARNING, "resolver.server.privileges"):
        privileges.warn_if_root(user)
    assert bool(caplog.messages) is warned
