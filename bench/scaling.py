#!/usr/bin/env python3
"""Worker scaling: `resolver serve --workers 1` against `--workers 2` under dnsperf.

What: the queries per second our server answers with one worker process and with two
(SO_REUSEPORT, one event loop each), on the shared harness's data (../shared/bench): the
`blocked` mix (random names under 124 blocked domains: NXDOMAIN from the filter alone) and the
`cached` mix (1,000 allowed names after one warm-up pass: answers from the cache). The
upstream is an NSD on a free 127.0.0.1 port serving the harness's zone, configured by its
conf/nsd.conf.in. Load is `dnsperf -c 10 -q 100 -t 2 -l DURATION` over UDP, as compare.sh
does. Nothing is pinned: the server, dnsperf and NSD share every core the machine has. Each
run starts a fresh server; runs alternate 1, 2, 2, 1, ... workers so drift hits both alike.

How to run, by hand only (never from CI or tests), from the checkout:
    python3 bench/scaling.py [--runs 3] [--duration 10] [--workers 1,2] [--keep]
It needs dnsperf and nsd (`sudo make deps`), runs `make -s .venv/.installed`, and generates
the data with `../shared/bench/gen_data.py` in a temporary directory (removed at the end).
Everything listens on 127.0.0.1; every dnsperf run is bounded by -l; the processes it starts
run in their own sessions and are stopped by their PIDs. 3 runs of 10 s: about 2.5 minutes.

How to read: "median QPS" per worker count and mix, every run in "runs (kQPS)", and the ratio
2/1. "server cores" is the CPU the server's processes used (summed; in the run lines, per
worker in brackets), "us/q" the server CPU per answered query in microseconds, "dnsperf" the
load generator's cores, "idle" the cores the machine had left. On a 2-core machine this
cannot show the full scaling: dnsperf (default -T 1) needs most of a core for this load,
and with -q 100 in flight the load is bound by the round trip between dnsperf and the server,
so one worker already gets about as many queries as dnsperf sends, and a second worker only
adds a third busy process to two cores (more context switches, fewer cache-warm wake-ups).
A 2/1 ratio near or below 1 here means the load generator is the limit, not the server.
What does carry over to bigger machines is "us/q": workers share nothing but the kernel's
SO_REUSEPORT spreading (a hash of each client's address and port, so 10 dnsperf clients
split unevenly between 2 workers), so with a core for each worker and a load generator on
cores of its own, N workers answer up to about N x 1e6 / (us/q) queries per second, provided
us/q stays about flat from 1 to 2 workers (the last lines compare it). "lost" or "wrong"
above 0 makes a result suspect. Compare ratios, not QPS, between machines.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout
from bench.harness import HOST, ROOT, Processes, clean_up, free_port, revision

SHARED = ROOT.parent / "shared" / "bench"
RESOLVER = ROOT / ".venv" / "bin" / "resolver"
HZ = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 60.0


class Mix(TypedDict):
    file: str  # the queries
    warm: str | None  # queries sent once before, to fill the cache
    expect: str  # the rcode every answer should have


MIXES = {  # as in ../shared/bench/compare.py
    "blocked": Mix(file="q-blocked.txt", warm=None, expect="NXDOMAIN"),
    "cached": Mix(file="q-cached.txt", warm="q-cached-warm.txt", expect="NOERROR"),
}


class Run(TypedDict, total=False):
    """One dnsperf run (dnsperf's numbers), and what `measure` adds about the processes."""

    qps: float
    completed: int
    lost: int
    runtime: float
    rcodes: dict[str, int]
    client_cpu: float
    output: str
    server_cpu: float
    split: list[float]
    nsd_cpu: float
    idle: float
    wrong: int
    us_per_query: float


Column = Literal["qps", "server_cpu", "us_per_query", "client_cpu", "idle"]


# --------------------------------------------------------------------------- processes

def session_ticks(sid: int) -> dict[int, int]:
    """CPU ticks (user + system) of every process in session sid, by pid."""
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
    return ticks


def machine_ticks() -> tuple[int, int]:
    """(busy, total) ticks over all CPUs."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                  if line.startswith("model name")), "?")
    version = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True)
    dnsperf = re.search(r"Version (\S+)", version.stdout + version.stderr)
    return (f"machine: nproc {len(os.sched_getaffinity(0))} ({os.cpu_count()} CPUs), {model}; "
            f"load average {Path('/proc/loadavg').read_text().split()[0]}; "
            f"dnsperf {dnsperf.group(1) if dnsperf else '?'}")


# --------------------------------------------------------------------------- dnsperf

def dnsperf(port: int, datafile: Path, duration: int, once: bool = False,
            clients: int = 10, outstanding: int = 100) -> Run:
    cmd = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(datafile), "-l", str(duration),
           "-c", str(clients), "-q", str(outstanding), "-t", "2"] + (["-n", "1"] if once else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 40).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    def number(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    runtime = number(r"Run time \(s\):\s+([\d.]+)")
    if not runtime:
        raise RuntimeError(f"dnsperf gave no statistics:\n{out[-2000:]}")
    codes = re.search(r"Response codes:\s+(.*)", out)
    return Run(qps=number(r"Queries per second:\s+([\d.]+)"),
                completed=int(number(r"Queries completed:\s+(\d+)")),
                lost=int(number(r"Queries lost:\s+(\d+)")), runtime=runtime,
                rcodes=dict((c, int(n)) for c, n in re.findall(r"(\w+) (\d+) \(", codes.group(1)))
                if codes else {},
                client_cpu=(after.ru_utime + after.ru_stime - before.ru_utime
                            - before.ru_stime) / runtime,
                output=out)


# --------------------------------------------------------------------------- servers

def start_nsd(procs: Processes, work: Path, data: Path) -> tuple[int, subprocess.Popen[bytes]]:
    nsd = shutil.which("nsd") or shutil.which("nsd", path="/usr/sbin:/usr/local/sbin")
    if not nsd or not shutil.which("dnsperf"):
        sys.exit("scaling.py needs nsd and dnsperf (sudo make deps)")
    run = work / "nsd"
    run.mkdir()
    port = free_port()
    text = (SHARED / "conf" / "nsd.conf.in").read_text()
    for key, value in dict(PORT=str(port), RUN=str(run), DATA=str(data)).items():
        text = text.replace(f"@{key}@", value)
    (run / "nsd.conf").write_text(text)
    proc = procs.start([nsd, "-d", "-c", str(run / "nsd.conf")], run / "stderr.log",
                       stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        probe = subprocess.run(["dig", f"@{HOST}", "-p", str(port), "+short", "+time=1",
                                "+tries=1", "host1.bench.test"], capture_output=True, text=True)
        if probe.stdout.strip():
            return port, proc
        if proc.poll() is not None or time.monotonic() > deadline:
            log = run / "nsd.log"
            sys.exit("NSD did not come up:\n" + (log.read_text()[-2000:] if log.exists() else ""))
        time.sleep(0.2)


def start_server(procs: Processes, work: Path, data: Path, upstream: int, workers: int,
                 tag: str) -> tuple[subprocess.Popen[bytes], int]:
    log = work / f"{tag}.log"
    argv = [str(RESOLVER), "serve", "--workers", str(workers), "--listen", f"{HOST}:0",
            "--upstream", f"{HOST}:{upstream}", "--rules", str(data / "rules.yaml"),
            "--metrics", f"{HOST}:0"]
    proc = procs.start(argv, log, stdout=subprocess.PIPE)
    stdout = proc.stdout
    assert stdout is not None  # a pipe, asked for
    sel = selectors.DefaultSelector()
    sel.register(stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT
    line = ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        if sel.select(0.5):
            line = stdout.readline().decode()
    sel.close()
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        procs.stop(proc)
        sys.exit(f"resolver --workers {workers} did not start: {line!r}\n"
                 + log.read_text()[-2000:])
    return proc, int(m.group(1))


def measure(proc: subprocess.Popen[bytes], port: int, data: Path, mix: str, duration: int,
            nsd: subprocess.Popen[bytes]) -> Run:
    spec = MIXES[mix]
    if spec["warm"]:
        warm = dnsperf(port, data / spec["warm"], 10, once=True, clients=1, outstanding=20)
        if warm["lost"] or set(warm["rcodes"]) - {spec["expect"]}:
            print(f"    warning: warm-up {warm['completed']} answered, {warm['lost']} lost, "
                  f"{warm['rcodes']}")
    server0, nsd0, busy0 = session_ticks(proc.pid), session_ticks(nsd.pid), machine_ticks()
    r = dnsperf(port, data / spec["file"], duration)
    server1, nsd1, busy1 = session_ticks(proc.pid), session_ticks(nsd.pid), machine_ticks()
    if proc.poll() is not None:
        sys.exit(f"the server died during the {mix} run (exit status {proc.returncode})")
    runtime = r["runtime"]
    per_process = {pid: (server1[pid] - server0.get(pid, 0)) / HZ / runtime for pid in server1}
    workers = [v for pid, v in sorted(per_process.items()) if pid != proc.pid] \
        or [per_process.get(proc.pid, 0.0)]
    busy, total = busy1[0] - busy0[0], busy1[1] - busy0[1]
    r.update(Run(server_cpu=sum(per_process.values()), split=workers,
                 nsd_cpu=(sum(nsd1.values()) - sum(nsd0.values())) / HZ / runtime,
                 idle=(1 - busy / total) * len(os.sched_getaffinity(0)) if total else 0.0,
                 wrong=r["completed"] - r["rcodes"].get(spec["expect"], 0)))
    r["us_per_query"] = r["server_cpu"] * 1e6 / r["qps"] if r["qps"] else 0.0
    return r


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per worker count (default 3)")
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds per dnsperf run, its -l (default 10)")
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--mixes", default="blocked,cached", help="default blocked,cached")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs, dnsperf output)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    mixes = args.mixes.split(",")
    if not 1 <= args.duration <= 60 or not 1 <= args.runs <= 10:
        parser.error("--duration 1..60 and --runs 1..10 keep the load bounded")
    if set(mixes) - set(MIXES):
        parser.error(f"mixes: {', '.join(MIXES)}")

    subprocess.run(["make", "-s", "-C", str(ROOT), ".venv/.installed"], check=True)
    print(machine())
    print(f"server: .venv/bin/resolver serve --workers N, commit {revision()}")
    print(f"load: dnsperf -c 10 -q 100 -t 2 -l {args.duration}, {args.runs} runs per worker "
          f"count (alternating), nothing pinned (server, dnsperf and NSD share the cores)")

    work = Path(tempfile.mkdtemp(prefix="resolver-scaling-"))
    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[tuple[str, int], list[Run]] = {}
    try:
        data = work / "data"
        subprocess.run([sys.executable, str(SHARED / "gen_data.py"), "--out", str(data),
                        "--cold-names", "1000"],
                       check=True, stdout=subprocess.DEVNULL)
        upstream, nsd = start_nsd(procs, work, data)
        print(f"upstream: NSD on {HOST}:{upstream} with ../shared/bench's zone; "
              f"rules: its rules.yaml (124 domains)\n")
        for run in range(args.runs):
            order = counts if run % 2 == 0 else counts[::-1]
            for workers in order:
                proc, port = start_server(procs, work, data, upstream, workers,
                                          f"w{workers}-r{run + 1}")
                time.sleep(0.5)
                try:
                    for mix in mixes:
                        r = measure(proc, port, data, mix, args.duration, nsd)
                        (work / f"w{workers}-r{run + 1}-{mix}.dnsperf").write_text(r["output"])
                        results.setdefault((mix, workers), []).append(r)
                        split = "+".join(f"{c:.2f}" for c in r["split"])
                        print(f"  run {run + 1} workers {workers} {mix:<8} {r['qps']:>9,.0f} QPS"
                              f"  server {r['server_cpu']:.2f} cores ({split})"
                              f"  dnsperf {r['client_cpu']:.2f}  nsd {r['nsd_cpu']:.2f}"
                              f"  idle {r['idle']:.2f}  {r['us_per_query']:.2f} us/q"
                              f"  lost {r['lost']}  wrong {r['wrong']}")
                finally:
                    procs.stop(proc)
    finally:
        clean_up(procs, work, args.keep)

    print()
    print(f"{'mix':<8} {'workers':>7} {'median QPS':>11} {'runs (kQPS)':<20} "
          f"{'server cores':>12} {'us/q':>5} {'dnsperf':>7} {'idle':>5} {'lost':>5} {'wrong':>5}")
    for mix in mixes:
        for workers in counts:
            rs = results[(mix, workers)]

            def med(key: Column, rs: list[Run] = rs) -> float:
                return statistics.median(r[key] for r in rs)

            runs = " ".join(f"{r['qps'] / 1000:.1f}" for r in rs)
            print(f"{mix:<8} {workers:>7} {med('qps'):>11,.0f} {runs:<20} "
                  f"{med('server_cpu'):>12.2f} {med('us_per_query'):>5.2f} "
                  f"{med('client_cpu'):>7.2f} {med('idle'):>5.2f} "
                  f"{sum(r['lost'] for r in rs):>5} {sum(r['wrong'] for r in rs):>5}")
    if len(counts) >= 2:
        base, top = counts[0], counts[-1]
        print()
        for mix in mixes:
            a = statistics.median(r["qps"] for r in results[(mix, base)])
            b = statistics.median(r["qps"] for r in results[(mix, top)])
            ca = statistics.median(r["us_per_query"] for r in results[(mix, base)])
            cb = statistics.median(r["us_per_query"] for r in results[(mix, top)])
            print(f"{mix}: {top}/{base} workers = {b / a:.2f}x QPS; server CPU per query "
                  f"{cb / ca:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
