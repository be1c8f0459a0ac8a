#!/usr/bin/env bash
# Memory of ingest with large messages, one report (release build, local PostgreSQL and
# LocalStack):
#
#   scripts/bench-memory.sh [MESSAGES [KIB]]      default 200 messages of 1000 KiB
#
# Sends MESSAGES logins of about KIB KiB each (a login with a long extra field, which the
# transform ignores) to a fresh queue that accepts 1 MiB messages, then drains it with
# `loader ingest` (default settings, or the extra arguments in $INGEST_ARGS) and reports its
# maximum resident memory (GNU time's %M) and how long the drain took.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
n="${1:-200}"
kib="${2:-1000}"
eval "$(bash scripts/services.sh)"
export AWS_ENDPOINT_URL AWS_REGION
admin_url="$DATABASE_URL"
export DATABASE_URL="${admin_url%/*}/loader_memory"
cargo build --release --locked --quiet
loader() { target/release/loader "$@"; }
command -v /usr/bin/time >/dev/null || as_root apt-get install -y -qq time >&2 ||
    die "GNU time is needed (apt-get install time)"
PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -Xq \
    -c 'drop database if exists loader_memory' -c 'create database loader_memory'
loader migrate >/dev/null

queue="loader-memory-$$"
"$LOADER_AWS_PYTHON" - "$queue" <<'PY'
import boto3, os, sys
sqs = boto3.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                   region_name=os.environ.get("AWS_REGION", "us-east-1"),
                   aws_access_key_id="test", aws_secret_access_key="test")
sqs.create_queue(QueueName=sys.argv[1], Attributes={"MaximumMessageSize": "1048576",
                                                    "VisibilityTimeout": "60"})
PY
file="$LOADER_RUN/memory-$$.json"
python3 - "$n" "$kib" "$file" <<'PY'
import json, sys
n, kib, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with open(path, "w") as f:
    json.dump([{"user_id": "u%d" % i, "ip": "10.0.%d.%d" % (i // 250, i % 250 + 1),
                "device_id": "d%d" % i, "note": "x" * (kib * 1024 - 100)} for i in range(n)], f)
PY
log "sending $n messages of $kib KiB"
SQS_QUEUE="$queue" loader send "$file" >/dev/null
rm -f "$file"
log "draining with loader ingest ${INGEST_ARGS:-}"
start=$(date +%s.%N)
# shellcheck disable=SC2086
rss_kb=$(SQS_QUEUE="$queue" /usr/bin/time -f %M target/release/loader ingest --wait-seconds 1 \
    ${INGEST_ARGS:-} 2>&1 >/dev/null | tail -n1)
end=$(date +%s.%N)
staged=$(psql "$DATABASE_URL" -XAtc "select count(*) from loader.raw_logins")
awk -v n="$n" -v kib="$kib" -v rss="$rss_kb" -v a="$start" -v b="$end" -v s="$staged" \
    'BEGIN { printf "%d messages of %d KiB: staged %d in %.1f s; loader ingest peaked at %.0f MB resident\n", n, kib, s, b - a, rss / 1024 }'
