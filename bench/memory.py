#!/usr/bin/env python3
"""Process memory of `resolver serve --workers 1` with small and large rule sets and caches.

What: starts the installed server (.venv/bin/resolver) fresh for each state and reads
its resident memory from /proc/PID/status: VmRSS (now) and VmHWM (the peak since it started).
  a. shipped    the shipped rules (rules/exchanges.yaml), default config, idle;
  b. rules-1M   one plain text rule file of 1,000,000 synthetic names d<N>.example;
  c. cache-100k the shipped rules after 100,000 distinct allowed names went through the cache
                (default config: cache.max_entries 100000, cache.max_bytes 128 MiB);
  d. cache-8MiB the same traffic with cache.max_bytes set to 8 MiB in a config file: the cache
                stops growing at its configured bound, and so does the process;
  e. +blocked   then, on the same server, 100,000 distinct names under a blocked domain: their
                answers go to the packet cache (whole UDP answers by query bytes), which
                cache.max_bytes does not cover; cache.packet_entries (100000) bounds it;
  f. small      d and e again on a fresh server with cache.packet_entries 10000 as well: with
                both bounds set low, the process stays small whatever the traffic.
The upstream is an NSD the script starts in a temporary directory on a free 127.0.0.1 port,
serving the wildcard zone `*.fill.test A 192.0.2.1`, so every fill name is a distinct cache
entry; the system resolver is never asked. The fill is sent with dnsperf (-n 1, bounded by -l)
when it is installed, otherwise (or with --client python) with a small standard-library UDP
client keeping a window of 200 queries in flight (bounded by a deadline). Entries and bytes
come from the server's own gauges on /metrics: resolver_cache_entries, resolver_cache_bytes and
resolver_packet_cache_entries.

How to run, by hand only (never from CI or tests), from the checkout:
    python3 bench/memory.py [--fill 100000] [--rules-count 1000000] [--client python]
It needs nsd (and uses dnsperf when present); `sudo make deps` installs both. It runs
`make -s .venv/.installed` first. Everything listens on 127.0.0.1, the processes it starts are
stopped by their PIDs, and the temporary directory is removed at the end. About a minute.

How to read: "RSS MiB" is what the process holds now, "peak MiB" the most it ever held (for
rules-1M that is while compiling the list). "load s" is the time from starting the process to
its ready line, so (b) minus (a) is the cost of loading 1M domains. "cache bytes" is what the
cache counts against cache.max_bytes (answer size + 700 bytes per entry); compare its growth
with the RSS growth between (a) and (c) to see how honest that estimate is. In (d) the
entries stop where the bytes bound is reached and RSS stays near (a); (e) shows what the
packet cache adds on top, and (f) that cache.packet_entries bounds it. Under the table, a line
per fill says what the client got, what the server counted and how many datagrams the kernel
dropped for a full receive buffer meanwhile (a lost query shows up there, and costs an
entry). Numbers depend on the Python version and the machine; compare states with each other,
not machines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import ClassVar, NoReturn, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout
from bench.harness import HOST, ROOT, Processes, clean_up, free_port, revision

RESOLVER = ROOT / ".venv" / "bin" / "resolver"
FILL_ZONE = "fill.test"
FILL_ADDRESS = "192.0.2.1"
BLOCKED_DOMAIN = "binance.com"  # in the shipped rules
READY_TIMEOUT = 600.0  # seconds a server may take to print its ready line (1M rules: ~10-30)
MIB = 1024 * 1024


# --------------------------------------------------------------------------- processes

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of pid, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}; "
            f"Python {python_version()}; load average {open('/proc/loadavg').read().split()[0]}")


def python_version() -> str:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "--version"],
                         capture_output=True, text=True)
    return out.stdout.strip().split()[-1] if out.returncode == 0 else "?"


# --------------------------------------------------------------------------- DNS

def query_packet(qid: int, name: str) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def ask(port: int, name: str, timeout: float = 1.0) -> int | None:
    """The response code for `name A` from HOST:port, or None without an answer."""
    qid = random.randrange(65536)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(query_packet(qid, name), (HOST, port))
        try:
            data = sock.recv(4096)
        except OSError:
            return None
    if len(data) < 12 or struct.unpack("!H", data[:2])[0] != qid:
        return None
    return data[3] & 0x0F


class Fill(TypedDict):
    """How one fill went, from our client or from dnsperf."""

    sent: int
    answered: int
    lost: int
    rcodes: dict[int | str, int]  # by number; dnsperf's names for the rcodes it has no number of
    seconds: float


def udp_fill(port: int, names: list[str], window: int, deadline: float) -> Fill:
    """Send every name once with at most `window` queries unanswered; a query unanswered
    after 2 s counts as lost and frees its slot. Ends by `deadline` whatever happens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
    sock.connect((HOST, port))
    sock.setblocking(False)
    pending: dict[int, float] = {}  # query id -> time sent
    free_ids = list(range(65536))
    random.shuffle(free_ids)
    sent = answered = lost = 0
    rcodes: dict[int | str, int] = {}
    start = time.monotonic()
    end = start + deadline
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    while (sent < len(names) or pending) and time.monotonic() < end:
        while sent < len(names) and len(pending) < window:
            qid = free_ids.pop()
            try:
                sock.send(query_packet(qid, names[sent]))
            except BlockingIOError:
                free_ids.append(qid)
                break
            pending[qid] = time.monotonic()
            sent += 1
        sel.select(0.05)
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, ConnectionRefusedError):
                break
            qid = struct.unpack("!H", data[:2])[0]
            if pending.pop(qid, None) is not None:
                free_ids.insert(0, qid)
                answered += 1
                rcodes[data[3] & 0x0F] = rcodes.get(data[3] & 0x0F, 0) + 1
        now = time.monotonic()
        for qid in [q for q, t in pending.items() if now - t > 2.0]:
            del pending[qid]
            free_ids.insert(0, qid)  # a late answer to it is dropped: ids recycle slowly
            lost += 1
    sel.close()
    sock.close()
    lost += len(pending)
    return Fill(sent=sent, answered=answered, lost=lost, rcodes=rcodes,
                seconds=time.monotonic() - start)


def dnsperf_fill(port: int, names_file: Path, count: int, deadline: float, log: Path) -> Fill:
    """dnsperf sends the file once (-n 1), bounded by -l."""
    cmd = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(names_file), "-n", "1",
           "-l", str(int(deadline)), "-c", "10", "-q", "200", "-t", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline + 30).stdout
    log.write_text(" ".join(cmd) + "\n\n" + out)

    def number(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    codes = re.search(r"Response codes:\s+(.*)", out)
    names: dict[str, int | str] = {"NOERROR": 0, "SERVFAIL": 2, "NXDOMAIN": 3, "REFUSED": 5}
    rcodes = {names.get(c, c): int(n) for c, n in re.findall(r"(\w+) (\d+) \(", codes.group(1))} \
        if codes else {}
    return Fill(sent=int(number(r"Queries sent:\s+(\d+)")),
                answered=int(number(r"Queries completed:\s+(\d+)")),
                lost=int(number(r"Queries lost:\s+(\d+)")), rcodes=rcodes,
                seconds=number(r"Run time \(s\):\s+([\d.]+)"))


# --------------------------------------------------------------------------- NSD

NSD_CONF = """\
server:
    ip-address: {host}@{port}
    port: {port}
    do-ip4: yes
    do-ip6: no
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "{dir}"
    database: ""
    zonelistfile: "{dir}/zone.list"
    xfrdfile: "{dir}/xfrd.state"
    xfrdir: "{dir}"
    pidfile: "{dir}/nsd.pid"
    logfile: "{dir}/nsd.log"
    verbosity: 1
    hide-version: yes
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: "{zone}"
    zonefile: "{zone}.zone"
"""

ZONE = """\
$ORIGIN {zone}.
$TTL 3600
@ IN SOA ns1 hostmaster 1 3600 900 604800 3600
@ IN NS ns1
ns1 IN A 127.0.0.1
* IN A {address}
"""


def start_nsd(procs: Processes, work: Path) -> int:
    nsd = shutil.which("nsd") or shutil.which("nsd", path="/usr/sbin:/usr/local/sbin")
    if not nsd:
        sys.exit("memory.py needs nsd (sudo make deps, or apt-get install nsd)")
    run = work / "nsd"
    run.mkdir()
    port = free_port()
    (run / f"{FILL_ZONE}.zone").write_text(ZONE.format(zone=FILL_ZONE, address=FILL_ADDRESS))
    conf = run / "nsd.conf"
    conf.write_text(NSD_CONF.format(host=HOST, port=port, dir=run, zone=FILL_ZONE))
    proc = procs.start([nsd, "-d", "-c", str(conf)], run / "stderr.log",
                       stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while ask(port, f"probe.{FILL_ZONE}", 0.3) != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            log = run / "nsd.log"
            sys.exit(f"NSD did not come up; see {log}:\n"
                     + (log.read_text()[-2000:] if log.exists() else ""))
        time.sleep(0.2)
    return port


# --------------------------------------------------------------------------- the server

class Server:
    """One `resolver serve --workers 1` process."""

    def __init__(self, procs: Processes, work: Path, tag: str, upstream: int,
                 extra: list[str]):
        self.procs = procs
        self.metrics_port = free_port()
        self.log = work / f"{tag}.log"
        argv = [str(RESOLVER), "serve", "--workers", "1", "--listen", f"{HOST}:0",
                "--upstream", f"{HOST}:{upstream}", "--metrics",
                f"{HOST}:{self.metrics_port}", *extra]
        started = time.monotonic()
        self.proc = procs.start(argv, self.log, stdout=subprocess.PIPE)
        line = self._ready_line()
        self.load_seconds = time.monotonic() - started
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.fail(f"unexpected ready line: {line!r}")
        self.port = int(m.group(1))
        self.banner = line.strip()

    def _ready_line(self) -> str:
        stdout = self.proc.stdout
        assert stdout is not None  # a pipe, asked for
        sel = selectors.DefaultSelector()
        sel.register(stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if sel.select(0.5):
                    line = stdout.readline().decode()
                    if line:
                        return line
                if self.proc.poll() is not None:
                    self.fail(f"exited with status {self.proc.returncode}")
            self.fail(f"not ready after {READY_TIMEOUT:g}s")
        finally:
            sel.close()

    def fail(self, why: str) -> NoReturn:
        self.procs.stop(self.proc)
        tail = self.log.read_text()[-2000:] if self.log.exists() else ""
        sys.exit(f"resolver: {why}\n{tail}")

    def memory(self) -> dict[str, int]:
        return proc_status(self.proc.pid)

    def gauges(self) -> dict[str, float]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        found = {}
        for name in ("resolver_cache_entries", "resolver_cache_bytes",
                     "resolver_packet_cache_entries"):
            m = re.search(rf"^{name} (\S+)$", text, re.M)
            if m:
                found[name] = float(m.group(1))
        return found

    def counters(self) -> str:
        """The server's own count of outcomes and upstream errors, to explain any loss."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics",
                                    timeout=10) as reply:
            text = reply.read().decode()
        found = re.findall(r'^resolver_(queries|upstream_errors)_total\{(.*)\} (\S+)$', text,
                           re.M)
        return ", ".join(f"{kind}{{{labels}}} {float(value):.0f}"
                         for kind, labels, value in found) or "-"

    def stop(self) -> None:
        self.procs.stop(self.proc)


# --------------------------------------------------------------------------- states

class Row(TypedDict):
    """One state's line of the table."""

    state: str
    rss: float  # MiB
    peak: float  # MiB
    entries: float | None  # the gauges, None when the endpoint did not show one
    bytes: float | None
    packets: float | None
    load: float  # seconds from start to ready
    note: str


def measure(server: Server, state: str, note: str = "") -> Row:
    time.sleep(1.0)  # let the allocator and any background task settle
    mem = server.memory()
    gauges = server.gauges()
    return Row(state=state, rss=mem["VmRSS"] / 1024, peak=mem["VmHWM"] / 1024,
                entries=gauges.get("resolver_cache_entries"),
                bytes=gauges.get("resolver_cache_bytes"),
                packets=gauges.get("resolver_packet_cache_entries"), load=server.load_seconds,
                note=note)


def udp_drops() -> int:
    """Datagrams the kernel dropped for a full socket receive buffer, machine-wide."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def fill(server: Server, names: list[str], names_file: Path, client: str, work: Path,
         tag: str) -> str:
    deadline = 120.0
    drops = udp_drops()
    if client == "dnsperf":
        r = dnsperf_fill(server.port, names_file, len(names), deadline, work / f"{tag}.dnsperf")
    else:
        r = udp_fill(server.port, names, 200, deadline)
    time.sleep(0.5)  # answers still in flight upstream reach the cache
    codes = ",".join(f"{k}:{v}" for k, v in sorted(r["rcodes"].items(), key=str))
    return (f"{client}: {r['sent']} sent, {r['answered']} answered, {r['lost']} lost, "
            f"rcodes {codes}, {r['seconds']:.1f}s "
            f"({r['answered'] / max(r['seconds'], 1e-9):,.0f}/s)\n"
            f"    server counted: {server.counters()}; kernel UDP receive-buffer drops "
            f"meanwhile (all sockets): {udp_drops() - drops}")


# --------------------------------------------------------------------------- rule goals

def smaps(pid: int) -> dict[str, float]:
    """Rss, Pss and Pss_Shmem of pid in MiB (/proc/PID/smaps_rollup)."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Shmem"):
                found[key] = int(rest.split()[0]) / 1024
    return found


def tables_mib(pid: int) -> float:
    """Size of the rule tables (memfd resolver-rules) pid maps, each counted once."""
    sizes: dict[str, int] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/memfd:resolver-rules" in line:
                span, _, _, _, inode = line.split()[:5]
                start, end = (int(x, 16) for x in span.split("-"))
                sizes[inode] = sizes.get(inode, 0) + end - start
    return sum(sizes.values()) / MIB


class Plain:
    """`python -m resolver serve` from this checkout, no upstream needed (port 9); its log
    (stderr) goes to a file, where the compile lines say what each compiling child took."""

    running: ClassVar[list[Plain]] = []  # stopped at the end whatever happens (main)

    def __init__(self, workers: int, rules: list[Path], log: Path, probe: str | None = None):
        """probe: a name the rules block; then `answered` is the time from the start to the
        first NXDOMAIN for it."""
        self.log = log
        started = time.monotonic()
        with log.open("w") as errors:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resolver", "serve", "--workers", str(workers),
                 "--listen", f"{HOST}:0", "--upstream", f"{HOST}:9", "--metrics", "off",
                 *(arg for path in rules for arg in ("--rules", str(path)))],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True)
        Plain.running.append(self)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.seconds = time.monotonic() - started
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            sys.exit(f"resolver did not start: {line!r}\n{log.read_text()[-2000:]}")
        self.port = int(m.group(1))
        self.answered = self.seconds
        if probe is not None:
            while ask(self.port, probe, 2.0) != 3:
                time.sleep(0.01)
            self.answered = time.monotonic() - started

    def touch(self, count: int, prefix: str = "d") -> None:
        """Queries over the whole table, so every page of it a lookup can touch is resident."""
        for i in range(0, count, max(1, count // 3000)):
            ask(self.port, f"www.{prefix}{i}.example", 2.0)

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def reload(self, path: Path, marker: str, blocks: bool = True) -> None:
        """Add a name to the list, SIGHUP, and wait until the name is blocked (or, for a
        list that blocks nothing, until the log says the reload is done)."""
        done = self.log.read_text().count(") ok: ")
        with path.open("a") as f:
            f.write(f"{marker}\n")
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while (ask(self.port, marker, 2.0) != 3 if blocks
               else self.log.read_text().count(") ok: ") == done):
            if time.monotonic() > deadline:
                sys.exit(f"reload did not block {marker}")
            time.sleep(0.2)

    def compiles(self) -> list[tuple[float, float]]:
        """(seconds, peak RSS MiB) of each compile so far, from the log."""
        return [(float(s), float(m)) for s, m in re.findall(
            r"compiled in ([\d.]+) s by process \d+ \(peak RSS (\d+) MiB\)",
            self.log.read_text())]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        Plain.running.remove(self)


def rules_goals(count: int, work: Path) -> None:
    """The goals of a large list (docs/performance.md): load time and extra memory of one
    process, its peak during a reload, the PSS of 4 workers after 1 and 10 reloads; then the
    same list as a YAML list's `source:`, and as a dry-run list."""
    big = work / "big.txt"
    big.write_text("".join(f"d{i}.example\n" for i in range(count)))
    shipped = ROOT / "rules" / "exchanges.yaml"
    base = Plain(1, [shipped], work / "base.log")
    time.sleep(1)
    base_rss, base_load = proc_status(base.proc.pid)["VmRSS"] / 1024, base.seconds
    base.stop()
    one = Plain(1, [shipped, big], work / "one.log")
    one.touch(count)
    time.sleep(1)
    rss = proc_status(one.proc.pid)["VmRSS"] / 1024
    table = tables_mib(one.proc.pid)
    steady = smaps(one.proc.pid)
    [(seconds, child)] = one.compiles()
    print(f"rules: {count:,} domains in one process: loaded in {one.seconds - base_load:.2f} s "
          f"more than the shipped rules (compiled in {seconds:.2f} s by a child peaking at "
          f"{child:.0f} MiB RSS); RSS {rss:.1f} MiB ({rss - base_rss:+.1f} MiB), its table "
          f"file {table:.1f} MiB (resident part counted in RSS)")
    reload_peak(one, big, count, steady, table)
    one.stop()
    workers_pss(count, big, shipped, work)
    real_path(count, work, shipped, base_load)


class Together(threading.Thread):
    """Samples, every 20 ms, the sum of the PSS of a server and its children (the compiling
    child during a reload): PSS splits shared pages between the processes sharing them, so
    the sum is what both hold, without the table files' pages no process maps."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.most, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        tasks = Path(f"/proc/{self.pid}/task")
        while not self.done.is_set():
            total = 0.0
            children: list[int] = []  # listed per thread: a reload forks in a thread
            for task in tasks.iterdir():
                with contextlib.suppress(OSError):
                    children += map(int, (task / "children").read_text().split())
            for pid in [self.pid, *children]:
                with contextlib.suppress(OSError):  # a child that ended meanwhile
                    total += smaps(pid)["Pss"]
            self.most = max(self.most, total)
            time.sleep(0.02)


def reload_peak(one: Plain, big: Path, count: int, steady: dict[str, float],
                table: float) -> None:
    """VmHWM of the serving process over a reload (until queries have touched the whole new
    table), and what the compiling child took."""
    with open(f"/proc/{one.proc.pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    together = Together(one.proc.pid)
    together.start()
    one.reload(big, "reloaded.example")
    together.done.set()
    together.join()
    one.touch(count)
    peak = proc_status(one.proc.pid)["VmHWM"] / 1024
    seconds, child = one.compiles()[-1]
    after = smaps(one.proc.pid)
    print(f"rules: reload peak (VmHWM) {peak:.1f} MiB = {peak / steady['Rss']:.2f}x the steady "
          f"RSS {steady['Rss']:.1f} MiB; RSS after it {after['Rss']:.1f} MiB; the compiling "
          f"child peaked at {child:.0f} MiB RSS for {seconds:.2f} s; server and child together "
          f"(sum of PSS) at most {together.most:.1f} MiB = {together.most / steady['Pss']:.2f}x "
          f"the server's steady PSS {steady['Pss']:.1f}; plus the new table file "
          f"({table:.1f} MiB, mapped only as queries touch it) until the old is freed")


def workers_pss(count: int, big: Path, shipped: Path, work: Path) -> None:
    """The sum of 4 workers' PSS after start, 1 and 10 reloads."""
    four = Plain(4, [shipped, big], work / "four.log")
    four.touch(count)

    def pss(when: str) -> None:
        time.sleep(1)
        rows = [smaps(pid) for pid in four.workers()]
        print(f"rules: 4 workers {when}: sum of PSS {sum(r['Pss'] for r in rows):.1f} MiB "
              f"(shared table part {sum(r['Pss_Shmem'] for r in rows):.1f} MiB), sum of RSS "
              f"{sum(r['Rss'] for r in rows):.1f}; supervisor PSS "
              f"{smaps(four.proc.pid)['Pss']:.1f}; tables mapped per worker "
              f"{tables_mib(four.workers()[0]):.1f} MiB, by the supervisor "
              f"{tables_mib(four.proc.pid):.1f} MiB")

    pss("after start")
    for n in range(1, 11):
        four.reload(big, f"reload{n}.example")
        four.touch(count)
        if n in (1, 10):
            pss(f"after {n} reload{'s' if n > 1 else ''}")
    four.stop()


def real_path(count: int, work: Path, shipped: Path, base_load: float) -> None:
    """The list as operators write it: a YAML list whose `source:` is a domains file, timed
    through load_rules and a server's start to its first blocked answer; then the same list
    in dry-run mode (the staged table: a dict)."""
    from resolver.rules.loader import load_rules  # the checkout's, as sys.path says

    feed = work / "feed.txt"
    feed.write_text("".join(f"f{i}.example\n" for i in range(count)))
    for mode in ("enforce", "dry-run"):
        rules = work / f"{mode}.yaml"
        rules.write_text(f"lists:\n  - name: feed\n    mode: {mode}\n    source: {feed}\n"
                         "    format: domains\n")
        started = time.monotonic()
        load_rules([str(rules)])
        loaded = time.monotonic() - started
        probe = "www.f7.example" if mode == "enforce" else None
        server = Plain(1, [shipped, rules], work / f"{mode}.log", probe)
        server.touch(count, "f")
        time.sleep(1)
        rss = proc_status(server.proc.pid)["VmRSS"] / 1024
        peak = proc_status(server.proc.pid)["VmHWM"] / 1024
        [(seconds, child)] = server.compiles()
        with open(f"/proc/{server.proc.pid}/clear_refs", "w") as f:
            f.write("5")
        server.reload(feed, "reloaded.example", mode == "enforce")
        reload = proc_status(server.proc.pid)["VmHWM"] / 1024
        _, reload_child = server.compiles()[-1]
        print(f"rules: YAML list, {mode}, source: {count:,} names (format domains): "
              f"load_rules {loaded:.2f} s; server start to "
              f"{'first blocked answer' if probe else 'ready line'} {server.answered:.2f} s "
              f"({server.answered - base_load:.2f} s more than the shipped rules; compile "
              f"{seconds:.2f} s, child peak {child:.0f} MiB); RSS {rss:.1f} MiB (peak "
              f"{peak:.1f}); reload peak {reload:.1f} MiB = {reload / rss:.2f}x (child "
              f"{reload_child:.0f} MiB)")
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fill", type=int, default=100_000,
                        help="distinct names sent to fill the cache (default 100000)")
    parser.add_argument("--rules-count", type=int, default=1_000_000,
                        help="synthetic rule domains for state b (default 1000000)")
    parser.add_argument("--small-cache", type=int, default=8 * MIB,
                        help="cache.max_bytes for state d (default 8 MiB)")
    parser.add_argument("--small-packets", type=int, default=10_000,
                        help="cache.packet_entries for state f (default 10000)")
    parser.add_argument("--client", choices=["dnsperf", "python"],
                        default="dnsperf" if shutil.which("dnsperf") else "python",
                        help="what sends the fill (default dnsperf when installed); "
                             "'python' is the built-in windowed UDP client")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--rules-goals", action="store_true",
                        help="only the large-list goals (load, reload peak, PSS of 4 "
                             "workers over 10 reloads; the list as a YAML source, and "
                             "dry-run), from this checkout; no nsd needed")
    args = parser.parse_args()
    if args.rules_goals:
        with tempfile.TemporaryDirectory(prefix="resolver-memory-") as scratch:
            print(f"Python {sys.version.split()[0]}, commit {revision()}")
            try:
                rules_goals(args.rules_count, Path(scratch))
            finally:  # also on an error, or a closed pipe (| head)
                for plain in list(Plain.running):
                    plain.stop()
        return 0

    subprocess.run(["make", "-s", "-C", str(ROOT), ".venv/.installed"], check=True)
    print(machine())
    print(f"server: .venv/bin/resolver serve --workers 1 (one process), commit {revision()}")

    work = Path(tempfile.mkdtemp(prefix="resolver-memory-"))
    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows, notes = [], []
    try:
        upstream = start_nsd(procs, work)
        print(f"upstream: NSD on {HOST}:{upstream}, *.{FILL_ZONE} A {FILL_ADDRESS}")

        rng = random.Random(1)
        names = [f"n{i}-{rng.randrange(1 << 30):x}.{FILL_ZONE}" for i in range(args.fill)]
        names_file = work / "fill.txt"
        names_file.write_text("".join(f"{n} A\n" for n in names))
        rules_file = work / "rules-1m.txt"
        with open(rules_file, "w") as f:
            f.write("# synthetic rule domains for bench/memory.py\n")
            f.writelines(f"d{i}.example\n" for i in range(args.rules_count))
        blocked = [f"q{i}-{rng.randrange(1 << 30):x}.{BLOCKED_DOMAIN}" for i in range(args.fill)]
        blocked_file = work / "blocked.txt"
        blocked_file.write_text("".join(f"{n} A\n" for n in blocked))
        small = work / "small-cache.yaml"
        small.write_text(f"cache:\n  max_bytes: {args.small_cache}\n")
        smaller = work / "small-caches.yaml"
        smaller.write_text(f"cache:\n  max_bytes: {args.small_cache}\n"
                           f"  packet_entries: {args.small_packets}\n")

        # a. shipped rules, idle
        server = Server(procs, work, "shipped", upstream, [])
        print(f"  a: {server.banner[:110]}...")
        assert ask(server.port, "www.binance.com") == 3, "www.binance.com is not blocked"
        assert ask(server.port, f"hello.{FILL_ZONE}") == 0, "the upstream does not answer"
        rows.append(measure(server, "a shipped rules"))
        server.stop()

        # b. 1M rule domains
        server = Server(procs, work, "rules-1m", upstream, ["--rules", str(rules_file)])
        print(f"  b: {server.banner[:110]}...")
        assert ask(server.port, f"www.d{args.rules_count - 1}.example") == 3
        rows.append(measure(server, f"b {args.rules_count:,} rule domains"))
        server.stop()

        # c. 100k cache entries, default bounds
        server = Server(procs, work, "cache", upstream, [])
        notes.append("c fill: " + fill(server, names, names_file, args.client, work, "cache"))
        rows.append(measure(server, f"c {args.fill:,} names cached"))
        server.stop()

        # d. the same with cache.max_bytes low
        server = Server(procs, work, "small-cache", upstream, ["-c", str(small)])
        notes.append("d fill: " + fill(server, names, names_file, args.client, work, "small"))
        rows.append(measure(server, f"d same, max_bytes {args.small_cache / MIB:g} MiB"))

        # e. then distinct blocked names: the packet cache keeps their answers, apart from
        #    cache.max_bytes, up to cache.packet_entries
        notes.append("e fill: " + fill(server, blocked, blocked_file, args.client, work,
                                       "small-blocked"))
        rows.append(measure(server, f"e d + {args.fill // 1000}k blocked names"))
        server.stop()

        # f. d and e again with cache.packet_entries low as well
        server = Server(procs, work, "small-caches", upstream, ["-c", str(smaller)])
        notes.append("f fill: " + fill(server, names, names_file, args.client, work, "f")
                     + "\n  then " + fill(server, blocked, blocked_file, args.client, work,
                                          "f-blocked"))
        rows.append(measure(server, f"f e, packet_entries {args.small_packets // 1000}k"))
        server.stop()
    finally:
        clean_up(procs, work, args.keep)

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    print()
    print(f"{'state':<32} {'RSS MiB':>8} {'peak MiB':>9} {'cache entries':>14} "
          f"{'cache bytes':>12} {'packet entries':>14} {'load s':>7}")
    for r in rows:
        print(f"{r['state']:<32} {r['rss']:>8.1f} {r['peak']:>9.1f} "
              f"{num(r['entries'], ',.0f'):>14} "
              f"{num(r['bytes'], ',.0f'):>12} {num(r['packets'], ',.0f'):>14} "
              f"{r['load']:>7.2f}")
    print()
    for note in notes:
        print(note)
    base, cached = rows[0], rows[2]
    if cached["entries"]:
        grew = (cached["rss"] - base["rss"]) * MIB / cached["entries"]
        counted = (cached["bytes"] or 0) / cached["entries"]
        print(f"per cache entry: RSS grew {grew:,.0f} bytes, the cache counted {counted:,.0f}")
    d, e = rows[3], rows[4]
    added = (e["packets"] or 0) - (d["packets"] or 0)
    if added > 0:
        print(f"per packet cache entry (d to e): RSS grew "
              f"{(e['rss'] - d['rss']) * MIB / added:,.0f} bytes, not counted in "
              f"cache bytes; bounded by cache.packet_entries only")
    print(f"load s: process start to ready line (Python start-up, rule compilation, binding); "
          f"b - a = {rows[1]['load'] - base['load']:.2f}s for {args.rules_count:,} domains")
    return 0


if __name__ == "__main__":
    sys.exit(main())
