#!/usr/bin/env bash
# Start LocalStack (SQS, and SNS and EventBridge delivering into queues) on the host, without
# Docker, and print the environment to use.
#
#   scripts/localstack.sh            install once (cached), start unless already healthy
#   scripts/localstack.sh stop       stop the instance this script started
#
# Idempotent: when an endpoint with SQS, SNS and EventBridge already answers at
# $LOADER_LOCALSTACK_ADDR it is reused; one this script started with fewer services (an older
# version of it) is restarted. Prints `export AWS_ENDPOINT_URL=...` lines on stdout (and
# LOADER_AWS_PYTHON, a Python with boto3, for the tests' SNS and EventBridge publishers);
# progress goes to stderr.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LS_VERSION="2026.3.0"
LS_VENV="$LOADER_CACHE/localstack-$LS_VERSION"
LS_STATE="$LOADER_RUN/localstack"
LS_URL="http://$LOADER_LOCALSTACK_ADDR"

LS_SERVICES="sqs,sns,events"

# up SERVICE...: each answers at the endpoint.
up() {
    local health service
    health="$(curl -fsS --max-time 2 "$LS_URL/_localstack/health" 2>/dev/null)" || return 1
    for service in "$@"; do
        grep -Eq "\"$service\": *\"(available|running)\"" <<<"$health" || return 1
    done
}
healthy() { up sqs sns events; }

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
    if ! healthy && up sqs && [ -f "$LS_STATE/pid" ]; then
        log "LocalStack answers without SNS or EventBridge: restarting it with $LS_SERVICES"
        stop_daemon localstack "$LS_STATE"
        sleep 2
    fi
    if healthy; then
        log "LocalStack already answering at $LS_URL"
    elif up sqs; then
        die "an SQS endpoint at $LS_URL lacks SNS or EventBridge, and this script did not start it: stop it, or start LocalStack with SERVICES=$LS_SERVICES"
    else
        install
        mkdir -p "$LS_STATE/fs" "$LS_STATE/cache"
        start_daemon localstack "$LS_STATE" healthy 60 env \
            SERVICES="$LS_SERVICES" GATEWAY_LISTEN="$LOADER_LOCALSTACK_ADDR" OVERRIDE_IN_DOCKER=0 \
            PERSISTENCE=0 EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 DISABLE_EVENTS=1 \
            SKIP_SSL_CERT_DOWNLOAD=1 SQS_ENDPOINT_STRATEGY=path \
            FILESYSTEM_ROOT="$LS_STATE/fs" XDG_CACHE_HOME="$LS_STATE/cache" \
            "$LS_VENV/bin/python" -m localstack.runtime.main
    fi
    echo "export AWS_ENDPOINT_URL=$LS_URL"
    echo "export AWS_REGION=\${AWS_REGION:-us-east-1}"
    echo "export LOADER_AWS_PYTHON=$LS_VENV/bin/python"
}

case "${1:-start}" in
start) start ;;
stop) stop_daemon localstack "$LS_STATE" ;;
install) install ;;
*) die "usage: $0 [start|stop|install]" ;;
esac
