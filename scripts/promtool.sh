#!/usr/bin/env bash
# Provide Prometheus's own `promtool` (Debian package `prometheus`) and print
# `export PROMTOOL=...`. The tests check a real scrape with `promtool check metrics`, and
# scripts/test.sh checks and unit-tests deploy/prometheus/ with `promtool check rules` and
# `promtool test rules`. Uses a promtool on PATH; otherwise unpacks the package's promtool into
# the cache once (no Prometheus server is installed or started).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if command -v promtool >/dev/null; then
    echo "export PROMTOOL=$(command -v promtool)"
    exit 0
fi
dir="$LOADER_CACHE/prometheus"
if ! [ -x "$dir/usr/bin/promtool" ]; then
    log "unpacking promtool from Debian's prometheus package into $dir (once)"
    rm -rf "$dir" && mkdir -p "$dir/deb"
    if ! (cd "$dir/deb" && apt-get download prometheus >&2 2>/dev/null); then
        as_root apt-get update -qq >&2 || die "promtool is missing: apt-get install prometheus"
        (cd "$dir/deb" && apt-get download prometheus >&2)
    fi
    dpkg-deb -x "$dir"/deb/prometheus_*.deb "$dir"
fi
"$dir/usr/bin/promtool" --version >/dev/null 2>&1 || die "promtool does not run"
echo "export PROMTOOL=$dir/usr/bin/promtool"
