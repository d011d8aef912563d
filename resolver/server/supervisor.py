"""Several worker processes on the same ports, and the supervisor that keeps them.

Python runs one core per process, so `--workers N` forks N workers after the rules are
compiled (they share the compiled rules copy-on-write). Each runs its own uvloop and binds
the listen addresses with SO_REUSEPORT, and the kernel spreads queries across them by flow
hash. The supervisor answers no queries. It:
- serves /metrics, asking every worker for a snapshot over its pipe and adding them up;
- passes SIGHUP on to every worker, each of which reloads its rules;
- stops every worker on SIGTERM/SIGINT, and starts again a worker that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

import uvloop
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from resolver.ops.config import Address, Config
from resolver.ops.errors import ConfigError
from resolver.ops.metrics import Endpoint, Metrics, Sample, merge_samples
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.server.app import RunningServer, bound_socket, serve_until_signalled

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds a worker may take to bind its sockets
SNAPSHOT_TIMEOUT = 2.0  # seconds a worker may take to answer a metrics request
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL at shutdown
PR_SET_PDEATHSIG = 1
RESTART_DELAY = 1.0  # pause before starting a worker that died, so a crash loop is slow


# Called once every worker is up: (the addresses they serve, the metrics endpoint's or None).
OnReady = Callable[[list[tuple[str, int]], tuple[str, int] | None], None]


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0))


class Worker:
    """One worker process and the supervisor's end of its pipe."""

    def __init__(self, index: int, process: BaseProcess, conn: Connection):
        self.index, self.process, self.conn = index, process, conn
        self.last: list[Sample] = []  # its latest snapshot, kept for when it dies

    @classmethod
    def start(cls, index: int, config: Config, rules: RuleSet) -> Worker:
        ours, theirs = multiprocessing.Pipe()
        process = multiprocessing.get_context("fork").Process(
            target=_worker_main, args=(config, rules, theirs), name=f"resolver-worker-{index}",
            daemon=True)
        process.start()
        theirs.close()
        return cls(index, process, ours)

    def ready(self) -> list[tuple[str, int]]:
        """Wait for the worker to report its bound addresses."""
        if not self.conn.poll(READY_TIMEOUT):
            raise RuntimeError(f"worker {self.index} did not start in {READY_TIMEOUT:g}s")
        try:
            message, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"worker {self.index} exited during startup") from None
        if message != "ready":
            raise RuntimeError(f"worker {self.index}: {payload}")
        addresses: list[tuple[str, int]] = payload
        return addresses

    def ask(self) -> None:
        """Ask for a snapshot of the counters (read with `answer`)."""
        try:
            while self.conn.poll(0):  # a reply that came too late for an earlier scrape
                self.last = self.conn.recv()
            self.conn.send("snapshot")
        except (EOFError, OSError):
            pass  # it is dying; the supervisor restarts it and keeps its last counts

    def answer(self, deadline: float) -> list[Sample]:
        """The snapshot asked for, or the last one if none came by the deadline."""
        try:
            if self.conn.poll(max(0.0, deadline - time.monotonic())):
                self.last = self.conn.recv()
        except (EOFError, OSError):
            pass
        return self.last


def _worker_main(config: Config, rules: RuleSet, conn: Connection) -> None:
    """Body of a worker process: serve with SO_REUSEPORT until told to stop."""
    _die_with_parent()

    def on_ready(server: RunningServer) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), _answer_snapshot, conn, server.metrics)
        conn.send(("ready", server.addresses))

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_until_signalled(config, rules, on_ready, reuse_port=True,
                                             serve_metrics=False))
    except OSError as exc:
        conn.send(("error", str(exc)))


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: workers then outlive a killed supervisor
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # the event loop installs its own handlers
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before it does must not kill


def _answer_snapshot(conn: Connection, metrics: Metrics) -> None:
    try:
        conn.recv()
        conn.send(metrics.snapshot())
    except (EOFError, OSError):
        pass  # the supervisor is gone; SIGTERM or the parent-death check ends us


class Supervisor:
    """Starts, watches and stops the workers; merges their metrics for Prometheus."""

    def __init__(self, config: Config, rules: RuleSet, count: int):
        self.config = _concrete_ports(config)
        self.rules = rules
        self.count = count
        self.workers: list[Worker] = []
        self.retired: list[Sample] = []  # counters of workers that died, so sums never drop
        self.lock = threading.Lock()  # the metrics thread and the main thread share pipes
        self.stopping = False
        self.reload_requested = False

    def run(self, on_ready: OnReady) -> None:
        """Serve until SIGTERM/SIGINT; on_ready(addresses, metrics_address) once all are up."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        endpoint = None
        try:
            _check_free(self.config.server.listen)
            self.workers = [Worker.start(i, self.config, self.rules) for i in range(self.count)]
            started = [worker.ready() for worker in self.workers]  # wait for every one
            addresses = started[0]  # they all serve the same
            listen = self.config.metrics.listen
            if listen is not None:
                registry = CollectorRegistry()
                registry.register(self)
                endpoint = Endpoint(listen.host, listen.port, registry)
            on_ready(addresses, endpoint.address if endpoint else None)
            self._watch()
        finally:
            self._stop_all()
            if endpoint is not None:
                endpoint.stop()

    def _watch(self) -> None:
        """Sleep until a worker exits or a signal asks for something."""
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                for worker in self.workers:
                    pid = worker.process.pid
                    assert pid is not None  # every worker was started
                    with contextlib.suppress(ProcessLookupError):  # died: restarted below
                        os.kill(pid, signal.SIGHUP)
                self._load_rules()
            ended = wait([w.process.sentinel for w in self.workers], timeout=0.5)
            for worker in [w for w in self.workers if w.process.sentinel in ended]:
                if not self.stopping:
                    self._restart(worker)

    def _restart(self, worker: Worker) -> None:
        """Start a replacement; swap it in only once it is ready, so a scrape never reads its
        pipe before the ready message, and the dead worker's counts move to `retired`."""
        log.error("worker %d exited with %s; starting it again", worker.index,
                  worker.process.exitcode)
        time.sleep(RESTART_DELAY)
        with self.lock:  # no pipe traffic while forking
            fresh = Worker.start(worker.index, self.config, self.rules)
        try:
            fresh.ready()
        except RuntimeError as exc:  # left out: the dead worker stays, and is tried again
            log.error("%s", exc)
            fresh.process.kill()
            fresh.process.join()
            fresh.conn.close()
            return
        with self.lock:
            self.retired = merge_samples([self.retired,
                                          [s for s in worker.last if s.kind == "counter"]])
            worker.conn.close()
            self.workers[self.workers.index(worker)] = fresh

    def _load_rules(self) -> None:
        """Load the rule files here too, while the workers do: a worker started again later
        is forked with the last set that loaded, as the others serve it (reloading in the new
        worker instead would fail, and leave it on the startup rules, if the files broke
        since). A problem is the workers' to log; this keeps its set as they keep theirs."""
        try:
            self.rules = load_rules(self.config.blocking.rules)
        except ConfigError:
            pass
        except Exception:
            log.exception("loading the rules for workers started later failed")

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _stop_all(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector: the sum of every worker's snapshot, plus the retired counts."""
        with self.lock:
            for worker in self.workers:  # all asked first: they answer side by side
                worker.ask()
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT
            snapshots = [worker.answer(deadline) for worker in self.workers]
            alive = sum(worker.process.is_alive() for worker in self.workers)
        for sample in merge_samples([*snapshots, self.retired]):
            yield sample.family()
        yield Sample("gauge", "workers", "Worker processes alive.", (), {(): alive}).family()


def _check_free(listen: tuple[Address, ...]) -> None:
    """Raise OSError if another process holds a listen address. The workers bind with
    SO_REUSEPORT, which would let them join a port another server of this user holds, each
    then getting part of the traffic; one bind without it, before forking, finds that out."""
    for address in listen:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            bound_socket(address.host, address.port, kind, reuse_port=False).close()


def _concrete_ports(config: Config) -> Config:
    """Port 0 means 'any free port', but every worker must bind the same one: pick it here."""
    listen = tuple(Address(a.host, a.port or free_port(a.host)) for a in config.server.listen)
    return dataclasses.replace(config, server=dataclasses.replace(config.server, listen=listen))


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on host at this moment."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
