#!/usr/bin/env bash
# Check docker-compose.yaml and its init hook offline (no Docker engine needed).
#
#   scripts/check-compose.sh [FILE]       FILE defaults to the repo's docker-compose.yaml
#
# 1. scripts/init_queue.py compiles (python3 -m py_compile; bytecode goes to the cache, not the repo).
# 2. FILE is valid: `docker compose config -q` when the compose plugin is there; otherwise the
#    compose-spec JSON schema that check-jsonschema (PyPI) ships as its builtin
#    `vendor.compose-spec`, installed once into $LOADER_CACHE/tools-venv.
# 3. Every relative bind-mount source in FILE exists (a schema cannot see that).
# Exits non-zero on the first failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CHECK_JSONSCHEMA_VERSION="0.39.0"
TOOLS_VENV="$LOADER_CACHE/tools-venv"
FILE="${1:-$LOADER_ROOT/docker-compose.yaml}"
[ -f "$FILE" ] || die "no such file: $FILE"

install_tools() {
    local marker="$TOOLS_VENV/.complete-check-jsonschema-$CHECK_JSONSCHEMA_VERSION"
    [ -x "$TOOLS_VENV/bin/check-jsonschema" ] && [ -f "$marker" ] && return 0
    log "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION into $TOOLS_VENV (once)"
    rm -rf "$TOOLS_VENV"
    python3 -m venv "$TOOLS_VENV"
    "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check \
        "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
    touch "$marker"
}

PYTHONPYCACHEPREFIX="$LOADER_CACHE/pycache" python3 -m py_compile "$LOADER_ROOT/scripts/init_queue.py" ||
    die "scripts/init_queue.py does not compile"
log "scripts/init_queue.py compiles"

if docker compose version >/dev/null 2>&1; then
    docker compose -f "$FILE" config -q || die "$FILE: docker compose config failed"
    log "$FILE: valid (docker compose config)"
    yaml_python=python3 # bind-mount check below: PyYAML or ruamel.yaml may be missing here
else
    install_tools
    "$TOOLS_VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$FILE" >&2 ||
        die "$FILE: does not match the compose-spec schema"
    log "$FILE: valid (compose-spec schema, check-jsonschema $CHECK_JSONSCHEMA_VERSION)"
    yaml_python="$TOOLS_VENV/bin/python"
fi

# Relative bind-mount sources (short syntax "./src:/dst[:mode]" or long syntax with type: bind)
# must exist, resolved against the compose file's folder as compose does.
if "$yaml_python" -c 'import ruamel.yaml' 2>/dev/null; then
    "$yaml_python" - "$FILE" <<'EOF' || die "$FILE: missing bind-mount sources"
import os, sys
from ruamel.yaml import YAML

path = sys.argv[1]
with open(path) as fd:
    doc = YAML(typ="safe").load(fd) or {}
base = os.path.dirname(os.path.abspath(path))
missing = []
for name, service in (doc.get("services") or {}).items():
    for volume in (service or {}).get("volumes") or []:
        if isinstance(volume, str):
            source = volume.split(":", 1)[0] if ":" in volume else ""
        else:
            source = volume.get("source", "") if volume.get("type") == "bind" else ""
        if source.startswith(".") and not os.path.exists(os.path.join(base, source)):
            missing.append(f"{name}: {source}")
for item in missing:
    print(f"[check-compose.sh] missing bind-mount source: {item}", file=sys.stderr)
sys.exit(1 if missing else 0)
EOF
    log "$FILE: bind-mount sources exist"
else
    log "skipping the bind-mount check (no ruamel.yaml for $yaml_python)"
fi
