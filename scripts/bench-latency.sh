#!/usr/bin/env bash
# Ingest throughput against latency, adaptive versus the old fixed four receivers:
#
#   scripts/bench-latency.sh [MESSAGES]     (default 20000; fauxqs, 0, 5, 20 and 50 ms)
#
# Runs scripts/bench-ingest.sh --fauxqs --latency-ms N for each latency, writes
# docs/latency.csv and draws docs/latency.svg (scripts/latency-chart.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n="${1:-20000}"
csv=docs/latency.csv
echo "latency_ms,adaptive_msg_s,fixed4_msg_s,ceiling_msg_s" >"$csv.tmp"
for ms in 0 5 20 50; do
    report=$(bash scripts/bench-ingest.sh --fauxqs --latency-ms "$ms" "$n")
    echo "$report" >&2
    rate() { echo "$report" | grep "^$1" | grep -o '[0-9]* messages/s' | head -n1 | cut -d' ' -f1; }
    echo "$ms,$(rate '(b) ')" ,"$(rate "(b') ")","$(rate '(a) ')" | tr -d ' ' >>"$csv.tmp"
done
mv "$csv.tmp" "$csv"
python3 scripts/latency-chart.py
