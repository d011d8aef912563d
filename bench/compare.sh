#!/usr/bin/env bash
# Our resolver beside dnsmasq, unbound and dnsdist under dnsperf, through the workplace's
# shared harness (../shared/bench/compare.sh), which prints the table and the ratios.
#
#   bench/compare.sh [--quick] [--light-latency] [--json FILE] [...any compare.sh option]
#
# WORKERS=N (default 1) runs ours with N worker processes; the harness pins the server to one
# core, so use bench/scaling.py to see more cores at work. Everything the harness starts
# listens on 127.0.0.1 and every load run is bounded in time. Run by hand, never from CI.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared/bench/compare.sh
[[ -f $shared ]] || { echo "bench/compare.sh needs $shared" >&2; exit 1; }

install=()
for tool in dnsperf dnsmasq unbound dnsdist nsd dig; do
    command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin command -v "$tool" >/dev/null \
        || { install=(--install); break; }
done
make -s .venv/.installed

ours=".venv/bin/resolver serve --workers ${WORKERS:-1} --listen 127.0.0.1:{port}"
ours+=" --upstream {upstream} --rules {rules_yaml} --metrics 127.0.0.1:0"
exec bash "$shared" "${install[@]}" --ours "$ours" "$@"
