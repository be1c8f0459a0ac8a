#!/usr/bin/env bash
# The test command (README, .ci/run): start or reuse PostgreSQL and LocalStack, then run every
# test (unit and integration) against them. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/check-compose.sh
eval "$(bash scripts/services.sh)"
export AWS_ENDPOINT_URL AWS_REGION DATABASE_URL
# Tests must never probe the EC2 instance metadata service (it is not on this network).
export AWS_EC2_METADATA_DISABLED=true
cargo test --locked "$@"
