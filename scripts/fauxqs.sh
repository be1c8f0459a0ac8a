#!/usr/bin/env bash
# Start fauxqs, a fast SQS emulator (npm, Node 22), and print the environment to use. For the
# ingest benchmark only: fauxqs reports a bad receipt handle in a batch as success and lacks
# ListDeadLetterSourceQueues, so the tests never run against it.
#
#   scripts/fauxqs.sh            install once (cached), start unless already answering
#   scripts/fauxqs.sh stop       stop the instance this script started
#
# Prints `export AWS_ENDPOINT_URL=...` lines on stdout; progress goes to stderr.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FAUXQS_VERSION="1.9.2"
NODE_VERSION="22.23.3"
FQ_DIR="$LOADER_CACHE/fauxqs-$FAUXQS_VERSION"
FQ_STATE="$LOADER_RUN/fauxqs"
FQ_PORT="${LOADER_FAUXQS_PORT:-4576}"
FQ_URL="http://127.0.0.1:$FQ_PORT"

healthy() {
    # Any SQS JSON-protocol answer will do: fauxqs has no health route of its own.
    curl -sS --max-time 2 -o /dev/null -w '%{http_code}' -X POST "$FQ_URL/" \
        -H 'X-Amz-Target: AmazonSQS.ListQueues' -H 'Content-Type: application/x-amz-json-1.0' \
        -d '{}' 2>/dev/null | grep -q '^200$'
}

install() {
    [ -f "$FQ_DIR/.complete" ] && return 0
    command -v npm >/dev/null || die "fauxqs needs npm (Debian: apt-get install npm)"
    log "installing fauxqs $FAUXQS_VERSION with node $NODE_VERSION into $FQ_DIR (once)"
    rm -rf "$FQ_DIR"
    mkdir -p "$FQ_DIR"
    (
        cd "$FQ_DIR"
        npm init -y >/dev/null
        # The node package fetches its binary in an install script, which npm 11 runs only
        # when approved.
        npm install --silent --no-audit --no-fund "fauxqs@$FAUXQS_VERSION" "node@$NODE_VERSION"
        npm install-scripts approve node >/dev/null 2>&1 || true
        npm rebuild --silent node
    )
    "$FQ_DIR/node_modules/.bin/node" --version | grep -q "^v$NODE_VERSION" ||
        die "node $NODE_VERSION did not install into $FQ_DIR"
    touch "$FQ_DIR/.complete"
}

start() {
    if healthy; then
        log "fauxqs already answering at $FQ_URL"
    else
        install
        start_daemon fauxqs "$FQ_STATE" healthy 30 env FAUXQS_PORT="$FQ_PORT" FAUXQS_LOGGER=false \
            "$FQ_DIR/node_modules/.bin/node" "$FQ_DIR/node_modules/fauxqs/dist/cli.js"
    fi
    echo "export AWS_ENDPOINT_URL=$FQ_URL"
    echo "export AWS_REGION=\${AWS_REGION:-us-east-1}"
}

case "${1:-start}" in
start) start ;;
stop) stop_daemon fauxqs "$FQ_STATE" ;;
install) install ;;
*) die "usage: $0 [start|stop|install]" ;;
esac
