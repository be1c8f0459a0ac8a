#!/usr/bin/env bash
# The whole demo on a fresh clone: services up, the sample fixture sent to SQS, migrate,
# ingest, then the staged rows shown. Uses its own database (loader_demo, recreated each run)
# and queue (login-queue, created when missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
eval "$(bash scripts/services.sh)"
admin_url="$DATABASE_URL"
export AWS_ENDPOINT_URL AWS_REGION
export DATABASE_URL="${admin_url%/*}/loader_demo"
export SQS_QUEUE="${SQS_QUEUE:-login-queue}"

log "building loader"
cargo build --locked --quiet
loader() { echo "+ loader $*" >&2; target/debug/loader "$@"; }

PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -Xq -c 'drop database if exists loader_demo' -c 'create database loader_demo'
loader migrate
# The same init script the docker-compose LocalStack runs: login-queue with its DLQ. It runs
# with LocalStack's Python (boto3), installed by scripts/localstack.sh.
bash scripts/localstack.sh install
AWS_ENDPOINT_URL="$AWS_ENDPOINT_URL" LOADER_QUEUE="$SQS_QUEUE" LOADER_INIT_FIXTURE="" \
    "$LOADER_CACHE/localstack-2026.3.0/bin/python" scripts/init_queue.py
loader send tests/fixtures/login-queue-sample.json
loader ingest
echo
echo "+ psql: what was staged (bodies stay in loader.raw_logins; analysts never see them)"
psql "$DATABASE_URL" -X -c "select count(*) as staged, count(*) filter (where body ? 'user_id') as with_user_id,
       count(*) filter (where not body_is_json) as not_json from loader.raw_logins" \
    -c "select id, queue, mode, received, staged, duplicates, deleted, delete_failures
          from loader.ingest_runs order by id"
