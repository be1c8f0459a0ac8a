#!/usr/bin/env bash
# Start (or reuse) PostgreSQL and LocalStack, and print the environment to use:
#
#   eval "$(scripts/services.sh)"
#
# Idempotent: running services are reused. `scripts/services.sh stop` stops what the scripts
# started (a reused server is left alone).
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
case "${1:-start}" in
start)
    bash "$here/postgres.sh" start
    bash "$here/localstack.sh" start
    ;;
stop)
    bash "$here/localstack.sh" stop
    bash "$here/postgres.sh" stop
    ;;
*) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
