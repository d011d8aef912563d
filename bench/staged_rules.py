"""The harness's rule file with two staged lists added, to measure what staging costs.

    python3 bench/staged_rules.py {rules_yaml} > {rundir}/rules.yaml

Adds a dry-run list holding the same domains as the harness's blocking list (so every
blocked query also counts a would-block) and a `rollout: 50%` list on a name the mixes never
ask (its presence alone moves every query onto the staged path). Answers stay what the
harness checks: the enforcing list still blocks, dry-run changes nothing. Used by hand, as
in docs/performance.md:

    ../shared/bench/compare.sh --ours 'python3 bench/staged_rules.py {rules_yaml} \\
        > {rundir}/rules.yaml && exec .venv/bin/resolver serve --workers 1 \\
        --listen 127.0.0.1:{port} --upstream {upstream} --rules {rundir}/rules.yaml \\
        --metrics 127.0.0.1:0'
"""

from __future__ import annotations

import sys
from pathlib import Path

STAGED = """\
  - name: dry_run_copy
    mode: dry-run
    domains:
{domains}
  - name: canary
    rollout: 50%
    domains: [canary.bench.invalid]
"""


def main() -> None:
    text = Path(sys.argv[1]).read_text()
    domains = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")
               and "name:" not in line]
    listed = "\n".join(f"      - {domain}" for domain in domains)
    sys.stdout.write(text.rstrip("\n") + "\n" + STAGED.format(domains=listed))


if __name__ == "__main__":
    main()
