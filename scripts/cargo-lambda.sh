#!/usr/bin/env bash
# Install cargo-lambda (PyPI wheel, a prebuilt binary) once into the cache and print
# `export CARGO_LAMBDA=...`. The tests use its Lambda Runtime API emulator
# (`cargo lambda watch --only-lambda-apis`) to run the real `loader-lambda` binary; it is also
# what `sam build` uses to build the function (docs/deploying.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CL_VERSION="1.9.2"
CL_VENV="$LOADER_CACHE/cargo-lambda-$CL_VERSION"

if ! [ -x "$CL_VENV/bin/cargo-lambda" ] || ! [ -f "$CL_VENV/.complete" ]; then
    log "installing cargo-lambda $CL_VERSION into $CL_VENV (once)"
    rm -rf "$CL_VENV"
    python3 -m venv "$CL_VENV"
    # --no-deps: its ziglang dependency only serves cross-compiling, which the tests do not do.
    "$CL_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        "cargo-lambda==$CL_VERSION"
    touch "$CL_VENV/.complete"
fi
"$CL_VENV/bin/cargo-lambda" lambda --version >/dev/null || die "cargo-lambda does not run"
echo "export CARGO_LAMBDA=$CL_VENV/bin/cargo-lambda"
