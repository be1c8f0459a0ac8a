#!/usr/bin/env bash
# The test command (README "Quickstart", .ci/run): check the compose file and the deployment artefacts
# offline (the Prometheus configuration and alert rules with promtool, the rules' unit tests
# included), start or reuse PostgreSQL and LocalStack, then run every test (unit and
# integration, the Lambda handler's included) against them. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/check-compose.sh
bash scripts/check-deploy.sh
eval "$(bash scripts/promtool.sh)"
"$PROMTOOL" check config deploy/prometheus/prometheus.yml
(cd deploy/prometheus && "$PROMTOOL" test rules loader-rules.test.yml)
eval "$(bash scripts/services.sh)"
eval "$(bash scripts/postgres.sh cron)"
eval "$(bash scripts/pgbouncer.sh)"
eval "$(bash scripts/cargo-lambda.sh)"
export AWS_ENDPOINT_URL AWS_REGION DATABASE_URL CARGO_LAMBDA PROMTOOL LOADER_CRON_DATABASE_URL \
    LOADER_PGBOUNCER_TRANSACTION_URL LOADER_PGBOUNCER_SESSION_URL LOADER_AWS_PYTHON
# Tests must never probe the EC2 instance metadata service (it is not on this network).
export AWS_EC2_METADATA_DISABLED=true
cargo test --locked --features lambda "$@"
