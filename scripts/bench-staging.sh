#!/usr/bin/env bash
# Staging alone as a `loader_ingest` login (the bounds of a lesser caller apply), three runs, in
# a scratch database (loader_staging, recreated), one report (docs/benchmarks.md):
#
#   scripts/bench-staging.sh [ROWS]        (default 200000; `loader bench staging --rows ROWS`)
#
# Each run stages ROWS new messages into the table the runs before it filled, so the third
# meets twice ROWS rows already staged. LOADER_BIN=/abs/path/loader runs another build instead
# (scripts/lib.sh), to compare with it in the same run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
rows="${1:-200000}"
export RUST_LOG=warn
scratch_database loader_staging release
sql -c "do \$\$ begin
            if not exists (select from pg_roles where rolname = 'loader_bench_ingest') then
                create role loader_bench_ingest login;
            end if;
        end \$\$" -c "grant loader_ingest to loader_bench_ingest"
ingest_url=$(printf '%s' "$DATABASE_URL" | sed 's#://[^@/]*@#://loader_bench_ingest@#')
echo "cores: $(nproc); rows per run: $rows; $(psql --version | head -n1); binary: ${LOADER_BIN:-this tree}"
for run in 1 2 3; do
    echo "run $run: $(DATABASE_URL="$ingest_url" loader bench staging --rows "$rows" | tr '\n' ' ')"
done
