"""Several worker processes on the same ports, and the supervisor that keeps them.

Python runs one core per process, so `--workers N` forks N workers after the rules are
compiled (they share the compiled rules copy-on-write). Each runs its own uvloop on sockets
of its own bound to the listen addresses with SO_REUSEPORT, and the kernel spreads queries
across them by flow hash. The supervisor binds every worker's sockets before it drops
privileges (server/privileges.py) and keeps them, so a worker started again reuses its
predecessor's without root (queries to them wait in their queues meanwhile). The supervisor
answers no queries. It:
- serves /metrics, asking every worker for a snapshot over its pipe and adding them up, and
  POST /-/reload;
- reloads the rules (on SIGHUP, a file change, or /-/reload): it reads and compiles them
  once (in a short-lived child: rules/apart.py), judges them (server/reload.py), and sends
  the one compiled set to every worker over its pipe, each of which acknowledges the
  version it then serves. So every worker serves
  the same set, not whatever the files held when each read them; a worker started again
  later is forked with the last set that loaded;
- stops every worker on SIGTERM/SIGINT, and starts again a worker that died.

The pipe carries tagged messages. Supervisor to worker: ("snapshot",), or ("install", N)
followed by the pickled Install as raw bytes and N file descriptors (SCM_RIGHTS), which the
worker reads in a thread so its event loop keeps answering meanwhile. The descriptors are
the memory files of the set's compact table (rules/table.py), pickled by reference: every
worker maps the one copy the supervisor built, so the rules cost one copy of memory however
many workers there are, after any number of reloads (a table's memory goes back when the
last process mapping it drops its set). Worker to supervisor: ("ready", addresses) once,
("snapshot", samples), ("installed", version), or ("failed", version in force) when a set
could not be installed.

/healthz and /readyz ping every worker's event loop over a second pipe of its own:
("ping", serial) -> ("pong", serial, health.Status), answered by the loop at once. Not the
first pipe, because a reload holds that one (and the supervisor's lock on it) until every
worker confirmed, up to INSTALL_TIMEOUT, and a worker reading a rule set has its reader off:
a probe must not wait behind either, nor call a busy worker dead.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
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
from typing import cast

import uvloop
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from resolver.message.constants import Clock
from resolver.ops.config import Address, Config, Overrides
from resolver.ops.health import LOOP_DEADLINE, Probed, Status
from resolver.ops.http import Endpoint
from resolver.ops.metrics import Metrics, Sample, merge_samples
from resolver.ops.process import die_with_parent
from resolver.ops.querylog import worker_path
from resolver.ops.watch import Watcher
from resolver.rules import table
from resolver.rules.matcher import RuleSet
from resolver.rules.sources import Feeds
from resolver.server import privileges
from resolver.server.app import (
    WATCH_IDLE,
    Listener,
    RunningServer,
    bind_listeners,
    bound_socket,
    owned,
    serve_until_signalled,
)
from resolver.server.reload import FAILED, HTTP_WAIT, Install, Outcome, Reloads, pending
from resolver.stages.access import Networks

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds a worker may take to bind its sockets
SNAPSHOT_TIMEOUT = 2.0  # seconds a worker may take to answer a metrics request
INSTALL_TIMEOUT = 30.0  # seconds a worker may take to confirm a new rule set
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL at shutdown
RESTART_DELAY = 1.0  # pause before starting a worker that died, so a crash loop is slow


# Called once every worker is up: (the addresses they serve, the metrics endpoint's or None).
OnReady = Callable[[list[tuple[str, int]], tuple[str, int] | None], None]


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0))


class Worker:
    """One worker process and the supervisor's end of its pipe."""

    def __init__(self, index: int, process: BaseProcess, conn: Connection, pings: Connection):
        self.index, self.process, self.conn, self.pings = index, process, conn, pings
        self.last: list[Sample] = []  # its latest snapshot, kept for when it dies
        self.version: str | None = None  # the rule set version it last confirmed

    @classmethod
    def start(cls, index: int, config: Config, handed: list[Install],
              forget: Callable[[], None], listeners: list[Listener]) -> Worker:
        """Fork a worker serving the one Install in `handed`, which it takes out (see
        _worker_main); forget: what it calls to drop the supervisor's hold on the rules in
        its copy of this process; listeners: the worker's sockets, bound by the supervisor
        (inherited by the fork)."""
        ours, theirs = multiprocessing.Pipe()
        pings, pinged = multiprocessing.Pipe()
        version = handed[0].rules.version
        process = multiprocessing.get_context("fork").Process(
            target=_worker_main,
            args=(config, handed, forget, theirs, pinged, index, listeners),
            name=f"resolver-worker-{index}", daemon=True)
        process.start()
        theirs.close()
        pinged.close()
        worker = cls(index, process, ours, pings)
        worker.version = version
        return worker

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
            while self.conn.poll(0):  # a reply that came too late for an earlier request
                self._take(self.conn.recv())
            self.conn.send(("snapshot",))
        except (EOFError, OSError):
            pass  # it is dying; the supervisor restarts it and keeps its last counts

    def answer(self, deadline: float) -> list[Sample]:
        """The snapshot asked for; if none came by the deadline, the last one's counters only
        (so sums never drop), not its gauges: they would describe a worker that is not
        answering, as serving rules or holding a cache."""
        if self._until(("snapshot",), deadline):
            return self.last
        return [sample for sample in self.last if sample.monotonic]

    def send(self, install: bytes, fds: list[int]) -> bool:
        """Send a pickled Install and the memory files it refers to (table.dumps); False
        when the worker is gone (it is started again with the last set that loaded)."""
        try:
            self.conn.send(("install", len(fds)))
            self.conn.send_bytes(install)
            table.send_fds(self.conn, fds)
        except (EOFError, OSError):
            return False
        return True

    def confirmed(self, version: str, deadline: float) -> bool:
        """Wait for the worker to say it serves version (a late confirmation of an earlier
        install is read past): True once it does, False by the deadline or if it is gone."""
        while (kind := self._until(("installed", "failed"), deadline)) is not None:
            if self.version == version:
                return True
            if kind == "failed":  # it could not load this set, and said so at once
                return False
        return False

    def ping(self, serial: int) -> None:
        """Ask its event loop for its health.Status (read with `pong`)."""
        with contextlib.suppress(OSError):  # gone: it does not answer
            self.pings.send(("ping", serial))

    def pong(self, serial: int, deadline: float) -> Status | None:
        """Its answer to ping `serial`, or None by the deadline; answers to earlier pings
        that came too late are read past."""
        try:
            while self.pings.poll(max(0.0, deadline - time.monotonic())):
                kind, answered, status = self.pings.recv()
                if kind == "pong" and answered == serial:
                    assert isinstance(status, Status)
                    return status
        except (EOFError, OSError):
            pass
        return None

    def close(self) -> None:
        self.conn.close()
        self.pings.close()

    def stop(self) -> None:
        """End a worker that can no longer be trusted to serve the current rules: the watch
        loop starts it again with them."""
        with contextlib.suppress(OSError):
            self.process.terminate()

    def _until(self, kinds: tuple[str, ...], deadline: float) -> str | None:
        """Read messages until one of these kinds came (which) or the deadline passed
        (None)."""
        try:
            while self.conn.poll(max(0.0, deadline - time.monotonic())):
                kind = self._take(self.conn.recv())
                if kind in kinds:
                    return kind
        except (EOFError, OSError):
            pass
        return None

    def _take(self, message: tuple[str, object]) -> str:
        kind, payload = message
        if kind == "snapshot":
            self.last = cast(list[Sample], payload)  # what _Listener sends
        elif kind in ("installed", "failed"):
            assert isinstance(payload, str)
            self.version = payload
        return kind


def _worker_main(config: Config, handed: list[Install], forget: Callable[[], None],
                 conn: Connection, pings: Connection, index: int,
                 listeners: list[Listener]) -> None:
    """Body of a worker process: serve with SO_REUSEPORT until told to stop.

    A forked worker holds a copy of the supervisor's objects, its frames included, and the
    rules they refer to stay mapped as long as a reference remains. So the set it starts
    with comes in a list it empties (the Process keeps its arguments), no frame keeps it
    once the server holds it, and `forget` drops the supervisor's hold on it in this copy:
    when a reload replaces it, it is freed here, and the workers keep one table each."""
    _die_with_parent()
    install = handed.pop()
    forget()

    def on_ready(server: RunningServer) -> None:
        loop = asyncio.get_running_loop()
        _Listener(conn, server, loop)
        loop.add_reader(pings.fileno(), _pong, pings, server, loop)
        conn.send(("ready", server.addresses))

    serving = serve_until_signalled(config, install.rules, on_ready, reuse_port=True,
                                    serve_metrics=False, worker=install,
                                    process=f"worker-{index}", listeners=listeners)
    del install
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serving)
    except OSError as exc:
        conn.send(("error", str(exc)))


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies, even by SIGKILL."""
    die_with_parent(signal.SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # the event loop installs its own handlers
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor reloads, not the workers


def _pong(pings: Connection, server: RunningServer, loop: asyncio.AbstractEventLoop) -> None:
    """Answer a health ping, on the event loop: that it runs this at all is the liveness."""
    try:
        _, serial = pings.recv()
        send_whole(pings, ("pong", serial, server.status()))
    except (EOFError, OSError):  # the supervisor is gone, or the pipe broke: nobody asks
        loop.remove_reader(pings.fileno())


class _Listener:
    """A worker's end of its pipe, read from the event loop: a snapshot is answered at once;
    a rule set is received and unpickled in a thread (a large one takes a while), then
    installed on the loop in one step and confirmed."""

    def __init__(self, conn: Connection, server: RunningServer,
                 loop: asyncio.AbstractEventLoop):
        self.conn, self.server, self.loop = conn, server, loop
        self.tasks: set[asyncio.Task[None]] = set()
        loop.add_reader(conn.fileno(), self.heard)

    def heard(self) -> None:
        try:
            message = self.conn.recv()
            if message[0] == "snapshot":
                send_whole(self.conn, ("snapshot", self.server.metrics.snapshot()))
                return
        except EOFError:  # the supervisor is gone: SIGTERM (PDEATHSIG) ends us
            self.loop.remove_reader(self.conn.fileno())
            return
        except OSError:
            self._deaf()
            return
        if message[0] == "install":
            self.loop.remove_reader(self.conn.fileno())  # the bytes are the thread's to read
            task = self.loop.create_task(self._install(message[1]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _install(self, fds: int) -> None:
        try:
            outcome = "installed"
            try:
                install = await asyncio.to_thread(_receive, self.conn, fds)
                self.server.install(install)
                log.info("worker %d: rules %s in force", os.getpid(), install.rules.version)
            except (EOFError, OSError):
                raise
            except Exception:  # told, so the supervisor need not wait out its timeout
                log.exception("worker %d: installing a rule set failed", os.getpid())
                outcome = "failed"
            send_whole(self.conn, (outcome, self.server.rules.version))
        except EOFError:  # the supervisor is gone
            return
        except OSError:
            self._deaf()
            return
        self.loop.add_reader(self.conn.fileno(), self.heard)

    def _deaf(self) -> None:
        """The pipe failed half-way: a worker that can no longer hear its supervisor would
        serve on with rules nobody can change, so it stops, and is started again."""
        log.exception("worker %d: its pipe to the supervisor failed; stopping", os.getpid())
        self.loop.remove_reader(self.conn.fileno())
        os.kill(os.getpid(), signal.SIGTERM)


def send_whole(conn: Connection, message: tuple[object, ...]) -> None:
    """Send on the pipe the event loop made non-blocking for its reader: blocking for the
    send, since a message larger than the socket buffer (a snapshot with many series) would
    otherwise be cut short. The supervisor is reading while it waits for it."""
    os.set_blocking(conn.fileno(), True)
    try:
        conn.send(message)
    finally:
        os.set_blocking(conn.fileno(), False)


def _receive(conn: Connection, count: int) -> Install:
    """Read and unpickle a rule set and map its shared tables (in a thread). The event loop
    made the pipe non-blocking for its reader, which would have this read fail the moment it
    outpaced the writer; the reader is off meanwhile, so the read may block."""
    os.set_blocking(conn.fileno(), True)
    try:
        data = conn.recv_bytes()
        fds = table.receive_fds(conn, count)
    finally:
        os.set_blocking(conn.fileno(), False)
    install = table.loads(data, fds)
    assert isinstance(install, Install)
    return install


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """A reload asked for, and where to put its outcome (a waiting HTTP request's)."""

    force: bool
    trigger: str
    answer: concurrent.futures.Future[Outcome] | None = None


class Supervisor:
    """Starts, watches and stops the workers; reloads their rules; merges their metrics."""

    def __init__(self, config: Config, rules: RuleSet, count: int,
                 overrides: Overrides = Overrides(), wall: Clock = time.time,
                 watcher: Watcher | None = None, feeds: Feeds | None = None):
        """watcher: one whose baseline was taken before the rules were read (see
        running_server); else the baseline is taken once the workers are ready. feeds: the
        URL sources the rules were loaded with, refreshed here (not in the workers)."""
        self.config = _concrete_ports(config)
        self.count = count
        self.own = Metrics(process="supervisor")  # its own: reloads, sources, resource use
        self.reloads = Reloads(config, overrides, rules, self.own.reloads, wall, feeds)
        self.reloads.feeds.export(self.own)
        self._fetching = threading.Event()  # a refresh of the URL sources is under way
        self._watcher = watcher
        self.workers: list[Worker] = []
        self.listeners: list[list[Listener]] = []  # each worker's sockets, by its index
        self.retired: list[Sample] = []  # counters of workers that died, so sums never drop
        self.lock = threading.Lock()  # the metrics thread and the main thread share pipes
        self.pinging = threading.Lock()  # probes, one at a time, own the ping pipes
        self._serial = 0  # of the last ping
        self.stopping = False
        # Reloads asked for, in order: appended by signal handlers and the HTTP thread (a
        # deque's append is atomic, and takes no lock a signal handler could deadlock on).
        self.requests: collections.deque[Request] = collections.deque()
        self._woken, self._wake = socket.socketpair()  # wakes the main loop
        self._wake.setblocking(False)

    @property
    def rules(self) -> RuleSet:
        return self.reloads.current.rules

    def run(self, on_ready: OnReady) -> None:
        """Serve until SIGTERM/SIGINT; on_ready(addresses, metrics_address) once all are up."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        endpoint = None
        try:
            _check_free(self.config.server.listen)
            # Every worker's sockets, bound while we may still be root: a worker started
            # again takes its predecessor's, so no one needs root after the drop.
            self.listeners = [bind_listeners(self.config.server.listen, reuse_port=True)
                              for _ in range(self.count)]
            privileges.drop(self.config.server.user, self.config.server.group,
                            owned(self.config))
            self.workers = [self._fork(i) for i in range(self.count)]
            started = [worker.ready() for worker in self.workers]  # wait for every one
            addresses = started[0]  # they all serve the same
            listen = self.config.metrics.listen
            if listen is not None:
                registry = CollectorRegistry()
                registry.register(self)
                endpoint = Endpoint(listen.host, listen.port, registry, self._reload_from_http,
                                    self.probe, Networks(self.config.metrics.allow))
            watcher = self._watcher or Watcher(self.reloads.watch_paths)
            on_ready(addresses, endpoint.address if endpoint else None)
            self._watch(watcher)
        finally:
            self._stop_all()
            for listener in (one for each in self.listeners for one in each):
                listener.close()
            if endpoint is not None:
                endpoint.stop()
            while self.requests:  # an HTTP request still waiting is told
                request = self.requests.popleft()
                if request.answer is not None:
                    request.answer.set_result(Outcome(FAILED, self.rules.version,
                                                      ("the server is stopping",)))

    def _fork(self, index: int) -> Worker:
        """A worker with the rule set in force and the blocking section it came with (in a
        list, so that no frame of the forked copy holds it: _worker_main), and a query log
        file of its own."""
        handed = [self.reloads.current]
        query_log = self.config.query_log
        config = dataclasses.replace(
            self.config, blocking=handed[0].blocking,
            query_log=dataclasses.replace(query_log, path=worker_path(query_log.path, index)))
        return Worker.start(index, config, handed, self._forget, self.listeners[index])

    def _forget(self) -> None:
        """In a worker's copy of the supervisor: drop the rules it holds (this copy never
        runs again), so they are freed when the worker replaces them."""
        del self.reloads

    def _watch(self, watcher: Watcher) -> None:
        """Sleep until a worker exits, a reload is asked for, or the files are due a look."""
        next_look = time.monotonic()
        while not self.stopping:
            while self.requests and not self.stopping:
                self._run(self.requests.popleft())
            interval = self.reloads.current.blocking.watch_interval
            now = time.monotonic()
            if interval and now >= next_look:
                watcher.watch(self.reloads.watch_paths)
                if watcher.poll(now, interval):
                    self.requests.append(Request(False, "watch"))
                    continue
                next_look = now + interval
            self._refresh_sources()
            timeout = max(0.0, next_look - now) if interval else WATCH_IDLE
            timeout = min(timeout, self.reloads.feeds.sleep())
            ended = wait([*(w.process.sentinel for w in self.workers), self._woken], timeout)
            with contextlib.suppress(BlockingIOError):
                self._woken.recv(4096, socket.MSG_DONTWAIT)
            for worker in [w for w in self.workers if w.process.sentinel in ended]:
                if not self.stopping:
                    self._restart(worker)

    def _refresh_sources(self) -> None:
        """Fetch the URL sources that are due, in a thread (the main loop keeps restarting
        workers and running reloads meanwhile), then queue a reload if one brought new
        content; its outcome keeps or drops the new copy (Reloads.report)."""
        feeds = self.reloads.feeds
        if self._fetching.is_set() or not feeds.due():
            return
        self._fetching.set()

        def fetch() -> None:
            try:
                if feeds.refresh_due():
                    self.requests.append(Request(False, "source"))
            except Exception:  # a bug must not end refreshing without a word
                log.exception("refreshing the rule sources failed; trying again")
            finally:
                self._fetching.clear()
                self._poke()

        threading.Thread(target=fetch, name="resolver-sources", daemon=True).start()

    def _run(self, request: Request) -> None:
        """One reload: read and judge here, send what loaded to every worker."""
        reloads = self.reloads
        try:
            judged = reloads.judge(reloads.read(), request.force, request.trigger)
            if isinstance(judged, Install):
                judged = reloads.installed(judged, self._push(judged))
        except Exception as exc:  # a bug must not end the supervisor, nor go unsaid
            log.exception("reload failed")
            judged = Outcome(FAILED, self.rules.version, (f"internal error: {exc!r}",))
        outcome = reloads.report(judged, request.trigger)
        if request.answer is not None:
            request.answer.set_result(outcome)

    def _push(self, install: Install) -> list[str]:
        """Send install to every worker and wait for each to confirm it; what went wrong."""
        data, fds = table.dumps(install)  # once for all; compact tables by reference
        version = install.rules.version
        problems = []
        with self.lock:
            sent = [worker for worker in self.workers if worker.send(data, fds)]
            deadline = time.monotonic() + INSTALL_TIMEOUT
            for worker in self.workers:
                if worker not in sent:
                    problems.append(f"worker {worker.index} is gone; it is started again "
                                    f"with rules {version}")
                elif not worker.confirmed(version, deadline):
                    problems.append(f"worker {worker.index} did not confirm rules {version} "
                                    f"within {INSTALL_TIMEOUT:g} s (it serves "
                                    f"{worker.version or 'an unknown version'}); it is "
                                    f"started again with rules {version}")
                    worker.stop()  # so no worker stays on another version
        return problems

    def _reload_from_http(self, force: bool) -> Outcome:
        """POST /-/reload, on the HTTP thread: queue the reload and wait for its outcome."""
        answer: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        self.requests.append(Request(force, "http", answer))
        self._poke()
        try:
            return answer.result(HTTP_WAIT)
        except TimeoutError:  # concurrent.futures' is the builtin since 3.11
            return pending(self.rules.version)

    def probe(self) -> Probed:
        """Every worker's health.Status, each given LOOP_DEADLINE seconds (side by side);
        None for one that did not answer (stopped, hung, or dead and not yet replaced)."""
        with self.pinging:
            self._serial += 1
            workers = list(self.workers)
            for worker in workers:
                worker.ping(self._serial)
            deadline = time.monotonic() + LOOP_DEADLINE
            return [(f"worker-{worker.index}", worker.pong(self._serial, deadline))
                    for worker in workers]

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full: it is awake already
            self._wake.send(b"x")

    def _restart(self, worker: Worker) -> None:
        """Start a replacement; swap it in only once it is ready, so a scrape never reads its
        pipe before the ready message, and the dead worker's counts move to `retired`."""
        log.error("worker %d exited with %s; starting it again", worker.index,
                  worker.process.exitcode)
        time.sleep(RESTART_DELAY)
        with self.lock:  # no pipe traffic while forking
            fresh = self._fork(worker.index)
        try:
            fresh.ready()
        except RuntimeError as exc:  # left out: the dead worker stays, and is tried again
            log.error("%s", exc)
            fresh.process.kill()
            fresh.process.join()
            fresh.close()
            return
        with self.lock, self.pinging:
            self.retired = merge_samples([self.retired,
                                          [s for s in worker.last if s.monotonic]])
            worker.close()
            self.workers[self.workers.index(worker)] = fresh

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self._poke()

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        self.requests.append(Request(False, "signal"))
        self._poke()

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
        """Prometheus collector: the sum of every worker's snapshot, plus the retired counts
        and the supervisor's own (reloads)."""
        with self.lock:
            for worker in self.workers:  # all asked first: they answer side by side
                worker.ask()
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT
            snapshots = [worker.answer(deadline) for worker in self.workers]
            alive = sum(worker.process.is_alive() for worker in self.workers)
        # its own counts (reloads, sources) and resource use, not its build: the workers'
        # (on uvloop) is the one that answers
        own = [sample for sample in self.own.snapshot() if sample.name != "build_info"]
        for sample in merge_samples([*snapshots, self.retired, own]):
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
