"""Throughput and memory of `resolver rules replay` on generated query logs.

Run by hand: `.venv/bin/python bench/replay.py [--lines 1000000]`. It writes a schema-1
JSON query log (docs/tools.md) of that many lines, and one a tenth as long, with a realistic
mix (about 5% of queries for the shipped list's exchanges, names repeating, 5,000 clients),
then replays each through the CLI in a process of its own, with the shipped rules as the
baseline and a candidate that adds a list and a client-scoped list. It prints lines per
second and the peak resident memory of each run: the two peaks should be about the same,
since replay streams (docs/tools.md#replay). Numbers move with the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from resolver.ops.shipped import SHIPPED_RULES  # noqa: E402
from resolver.rules.loader import load_rules  # noqa: E402

# blocks about 5% of the generated names (50 of 997 sites), and one name for 10/8 only
CANDIDATE = f"""\
lists:
  - name: ads
    domains: [{", ".join(f"site{n}.example" for n in range(50))}]
  - name: corp
    clients: [10.0.0.0/8]
    domains: [social.example]
"""


def write_log(path: Path, lines: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    shipped = load_rules([SHIPPED_RULES])
    exchanges = [shipped.example_domain() or "binance.com", "binance.com", "okex.com"]
    names = [f"host{n}.site{n % 997}.example" for n in range(20_000)]
    names.append("social.example")
    clients = [f"10.0.{n // 250}.{n % 250}" for n in range(2_500)]
    clients += [f"192.0.2.{n % 250}" if n < 250 else f"198.51.{n // 250}.{n % 250}"
                for n in range(2_500)]
    with path.open("w") as out:
        for n in range(lines):
            qname = rng.choice(exchanges) if rng.random() < 0.05 else rng.choice(names)
            record = {"schema": 1, "time": f"2026-12-06T20:{n // 60000 % 60:02d}:"
                      f"{n // 1000 % 60:02d}.{n % 1000:03d}Z", "client": rng.choice(clients),
                      "qname": qname, "qtype": "A", "protocol": "udp", "outcome": "forwarded",
                      "rcode": "NOERROR", "list": None, "entry": None, "mode": None,
                      "upstream": "192.0.2.53", "duration_ms": 1.25,
                      "rules_version": shipped.version}
            out.write(json.dumps(record) + "\n")


# The CLI in a process of its own, which says its own peak memory when it ends
RUN = ("import resource, sys; from resolver.cli import main; status = main(sys.argv[1:]); "
       "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
       "sys.exit(status)")


def measure(log: Path, candidate: Path, lines: int) -> None:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUN, "rules", "replay", str(log),
                             "--rules", str(candidate), "--json"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 1):
        raise SystemExit(result.stderr)
    peak_kib = int(result.stderr.split()[-1])
    report = json.loads(result.stdout)
    print(f"{lines:>9} lines: {elapsed:6.1f} s, {lines / elapsed:>9,.0f} lines/s, peak RSS "
          f"{peak_kib / 1024:.0f} MiB, newly blocked {report['newly_blocked']['queries']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        candidate = Path(directory) / "candidate.yaml"
        candidate.write_text(CANDIDATE)
        for lines in (args.lines // 10, args.lines):
            log = Path(directory) / f"queries-{lines}.log"
            write_log(log, lines)
            measure(log, candidate, lines)


if __name__ == "__main__":
    main()
