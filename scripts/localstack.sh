#!/usr/bin/env bash
# Start LocalStack (SQS only) on the host, without Docker, and print the environment to use.
#
#   scripts/localstack.sh            install once (cached), start unless already healthy
#   scripts/localstack.sh stop       stop the instance this script started
#
# Idempotent: when an SQS endpoint already answers at $LOADER_LOCALSTACK_ADDR it is reused.
# Prints `export AWS_ENDPOINT_URL=...` lines on stdout; progress goes to stderr.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LS_VERSION="2026.3.0"
LS_VENV="$LOADER_CACHE/localstack-$LS_VERSION"
LS_STATE="$LOADER_RUN/localstack"
LS_URL="http://$LOADER_LOCALSTACK_ADDR"

healthy() {
    curl -fsS --max-time 2 "$LS_URL/_localstack/health" 2>/dev/null |
        grep -Eq '"sqs": *"(available|running)"'
}

install() {
    [ -x "$LS_VENV/bin/python" ] && [ -f "$LS_VENV/.complete" ] && return 0
    local py
    py="$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.13* 2>/dev/null | sort -V | tail -n1)/bin/python3"
    [ -x "$py" ] || die "LocalStack needs Python 3.13 (pyenv install 3.13); none found"
    log "installing LocalStack $LS_VERSION into $LS_VENV (once; 2-5 minutes)"
    rm -rf "$LS_VENV"
    "$py" -m venv "$LS_VENV"
    "$LS_VENV/bin/pip" install --quiet --disable-pip-version-check \
        "localstack-core[runtime]==$LS_VERSION" \
        'cbor2<6' 'pyopenssl==24.3.0' 'cryptography>=44,<45' 'service-identity==24.2.0'
    touch "$LS_VENV/.complete"
}

start() {
    if healthy; then
        log "LocalStack already answering at $LS_URL"
    else
        install
        mkdir -p "$LS_STATE/fs" "$LS_STATE/cache"
        log "starting LocalStack at $LS_URL (log: $LS_STATE/localstack.log)"
        (
            cd "$LS_STATE"
            SERVICES=sqs GATEWAY_LISTEN="$LOADER_LOCALSTACK_ADDR" OVERRIDE_IN_DOCKER=0 \
                PERSISTENCE=0 EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 DISABLE_EVENTS=1 \
                SKIP_SSL_CERT_DOWNLOAD=1 SQS_ENDPOINT_STRATEGY=path \
                FILESYSTEM_ROOT="$LS_STATE/fs" XDG_CACHE_HOME="$LS_STATE/cache" \
                setsid nohup "$LS_VENV/bin/python" -m localstack.runtime.main \
                >"$LS_STATE/localstack.log" 2>&1 </dev/null &
            echo $! >"$LS_STATE/pid"
        )
        for _ in $(seq 1 120); do
            healthy && break
            kill -0 "$(cat "$LS_STATE/pid")" 2>/dev/null ||
                die "LocalStack exited; see $LS_STATE/localstack.log"
            sleep 0.5
        done
        healthy || die "LocalStack not healthy after 60 s; see $LS_STATE/localstack.log"
        log "LocalStack healthy"
    fi
    echo "export AWS_ENDPOINT_URL=$LS_URL"
    echo "export AWS_REGION=\${AWS_REGION:-us-east-1}"
}

stop() {
    [ -f "$LS_STATE/pid" ] || { log "no LocalStack started by this script"; return 0; }
    local pid
    pid="$(cat "$LS_STATE/pid")"
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    rm -f "$LS_STATE/pid"
    log "LocalStack stopped"
}

case "${1:-start}" in
start) start ;;
stop) stop ;;
install) install ;;
*) die "usage: $0 [start|stop|install]" ;;
esac
