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
loader send --generate 200 --seed 7     # synthetic logins; some reuse a device and an IP
loader ingest
loader transform
echo
echo "+ psql as loader_analyst: masked rows, duplicate devices, rejects"
psql "$DATABASE_URL" -X <<'SQL'
set role loader_analyst;
select user_id, device_type, left(masked_ip, 16) as masked_ip_prefix,
       left(masked_device_id, 16) as masked_device_prefix, locale, app_version,
       app_version_text, create_date, ip_network
  from public.user_logins order by user_id limit 5;
select masked_device_id, count(*) as logins, count(distinct ip_network) as networks
  from public.user_logins
 group by masked_device_id having count(*) > 1
 order by count(*) desc limit 5;
select reason, detail, count(*) from loader.login_rejects group by reason, detail;
SQL
