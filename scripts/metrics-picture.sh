#!/usr/bin/env bash
# The picture in docs/operating.md "Metrics" (docs/metrics.svg): `loader run --metrics-addr` under a
# changing load, scraped once a second and drawn with the dashboard's panels by
# scripts/metrics-chart.py. For machines without Grafana; the numbers are real scrapes.
#
#   scripts/metrics-picture.sh [SECONDS]      (default 100)
#
# Load, on a queue of its own in LocalStack and a scratch database (loader_picture): a burst of
# 20,000 logins at 5 s; a trickle of 500 every 2 s from 35 s; at 60 s a producer "changes its
# format": 1,500 bodies without user_id and 300 that are not JSON objects.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
seconds="${1:-100}"
eval "$(bash scripts/services.sh)"
export AWS_ENDPOINT_URL AWS_REGION AWS_EC2_METADATA_DISABLED=true RUST_LOG=warn
admin_url="$DATABASE_URL"
export DATABASE_URL="${admin_url%/*}/loader_picture" SQS_QUEUE="loader-picture-$(date +%s)"
cargo build --release --locked --quiet
loader() { target/release/loader "$@"; }
PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -Xq \
    -c 'drop database if exists loader_picture' -c 'create database loader_picture'
loader migrate >/dev/null
loader send --generate 1 --seed 0 >/dev/null   # creates the queue
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The binary itself, not the function: $! must be its pid for the kill below.
target/release/loader run --metrics-addr "127.0.0.1:$port" --queue-metrics-interval 1 \
    --transform-interval 1 >/dev/null &
run=$!
python3 scripts/metrics-chart.py "127.0.0.1:$port" "$seconds" docs/metrics.svg &
chart=$!
bad=$(mktemp --suffix .json)
python3 -c 'import json, sys
bodies = [{"device_type": "ios", "ip": "10.0.0.1", "device_id": "x-%d" % i} for i in range(1500)]
bodies += ["<login user=%d>" % i for i in range(300)]
json.dump(bodies, open(sys.argv[1], "w"))' "$bad"
sleep 5
loader send --generate 20000 --seed 1 >/dev/null
sleep 30
for i in $(seq 1 30); do
    loader send --generate 500 --seed $((i + 1)) >/dev/null
    [ "$i" = 12 ] && loader send "$bad" >/dev/null
    sleep 2
done
wait "$chart"
kill -TERM "$run" && wait "$run" || true
rm -f "$bad"
