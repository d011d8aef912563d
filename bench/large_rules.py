"""The harness's rule file plus a list of N generated domains, to measure a large list's cost.

    python3 bench/large_rules.py {rules_yaml} {rundir} [N] > {rundir}/rules.yaml

Writes N names (default 1,000,000) under `.large.invalid` to {rundir}/large.txt and adds a
list reading them (`source: large.txt`), so the set is compiled into the compact table of
rules/table.py. The harness's 124 domains stay in their own list and answer as before; the
mixes never ask a generated name, so only the table's size differs, which is the point: the
blocked ratio against the same run without it says what a million-name table costs a lookup.
Used by hand, as in docs/performance.md:

    ../shared/bench/compare.sh --peers unbound --mixes blocked \\
        --ours 'python3 bench/large_rules.py {rules_yaml} {rundir} > {rundir}/rules.yaml \\
        && exec .venv/bin/resolver serve --workers 1 --listen 127.0.0.1:{port} \\
        --upstream {upstream} --rules {rundir}/rules.yaml --metrics 127.0.0.1:0'
"""

from __future__ import annotations

import sys
from pathlib import Path

LARGE = """\
  - name: large
    source: {path}
    format: domains
"""


def main() -> None:
    rules, rundir = Path(sys.argv[1]), Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
    names = rundir / "large.txt"
    with names.open("w") as out:
        for start in range(0, count, 10_000):
            out.write("".join(f"n{index:x}.large.invalid\n"
                              for index in range(start, min(start + 10_000, count))))
    sys.stdout.write(rules.read_text().rstrip("\n") + "\n" + LARGE.format(path=names))


if __name__ == "__main__":
    main()
