#!/usr/bin/env bash
# Check the deployment artefacts offline (no Docker engine, no AWS account needed).
#
#   scripts/check-deploy.sh [TEMPLATE [DOCKERFILE]]   defaults: deploy/template.yaml, Dockerfile
#
# 1. TEMPLATE with cfn-lint as written, then translated to plain CloudFormation by
#    aws-sam-translator (what `sam deploy` does, with a placeholder CodeUri) and linted again:
#    cfn-lint's SAM schema alone lets misspelt event properties and out-of-range values through.
# 2. TEMPLATE rules no linter knows: a queue feeding a function has a dead-letter queue and a
#    VisibilityTimeout of at least 6x the function's Timeout (AWS's advice for Lambda consumers);
#    each BuildProperties.Binary is a bin of the crate and CargoLambda.toml's features exist.
# 3. .github/workflows/*.yml against the GitHub workflow schema (check-jsonschema's builtin).
# 4. DOCKERFILE: multi-stage, the final stage runs as a non-root USER with ENTRYPOINT loader,
#    every COPY source exists and the copies cover what `cargo build` reads.
# Tools are installed once, pinned, into $LOADER_CACHE/deploy-venv. Exits non-zero on a failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PINS="cfn-lint==1.58.0 aws-sam-translator==1.115.0 check-jsonschema==0.39.0 dockerfile-parse==2.0.1"
DEPLOY_VENV="$LOADER_CACHE/deploy-venv"
PY="$DEPLOY_VENV/bin/python"
TEMPLATE="${1:-$LOADER_ROOT/deploy/template.yaml}"
DOCKERFILE="${2:-$LOADER_ROOT/Dockerfile}"
[ -f "$TEMPLATE" ] || die "no such file: $TEMPLATE"
[ -f "$DOCKERFILE" ] || die "no such file: $DOCKERFILE"

install_tools() {
    local marker="$DEPLOY_VENV/.complete"
    # The interpreter check catches a venv whose base Python went away (a CI cache restore).
    [ "$(cat "$marker" 2>/dev/null)" = "$PINS" ] && "$PY" -c '' 2>/dev/null && return 0
    log "installing $PINS into $DEPLOY_VENV (once)"
    rm -rf "$DEPLOY_VENV"
    python3 -m venv "$DEPLOY_VENV"
    # shellcheck disable=SC2086 # one argument per pin
    "$DEPLOY_VENV/bin/pip" install --quiet --disable-pip-version-check $PINS
    echo "$PINS" >"$marker"
}
install_tools
export PYTHONPYCACHEPREFIX="$LOADER_CACHE/pycache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. cfn-lint, before and after the SAM transform.
"$DEPLOY_VENV/bin/cfn-lint" --regions us-east-1 -- "$TEMPLATE" >&2 ||
    die "$TEMPLATE: cfn-lint found problems"
translated="$work/$(basename "${TEMPLATE%.*}").translated.json"
# The translator asks boto3 for a region (ARN partitions); nothing is sent anywhere.
AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true "$PY" - "$TEMPLATE" "$translated" <<'EOF' ||
import json, sys
from cfnlint.decode import decode
from samtranslator.model.exceptions import InvalidDocumentException
from samtranslator.translator.transform import transform

template, errors = decode(sys.argv[1])
if errors:
    sys.exit(f"[check-deploy.sh] cannot read {sys.argv[1]}: {errors}")
# `sam build` replaces a local CodeUri with the uploaded artefact's S3 URI; so does this.
template.get("Globals", {}).get("Function", {}).pop("CodeUri", None)
for resource in template.get("Resources", {}).values():
    if resource.get("Type") == "AWS::Serverless::Function":
        resource.setdefault("Properties", {})["CodeUri"] = "s3://placeholder/code.zip"

class NoManagedPolicyNames:  # only needed for policies given by name; ours are ARNs or none
    def load(self):
        return {}

try:
    output = transform(template, {}, NoManagedPolicyNames())
except InvalidDocumentException as error:
    for cause in error.causes:
        print(f"[check-deploy.sh] SAM transform: {cause.message}", file=sys.stderr)
    sys.exit(1)
with open(sys.argv[2], "w") as fd:
    json.dump(output, fd, indent=1)
EOF
    die "$TEMPLATE: the SAM transform failed"
"$DEPLOY_VENV/bin/cfn-lint" --regions us-east-1 -- "$translated" >&2 ||
    die "$TEMPLATE: cfn-lint found problems in the transformed template"
log "$TEMPLATE: valid (cfn-lint, before and after the SAM transform)"

# 2. Queue and build rules.
"$PY" - "$TEMPLATE" "$LOADER_ROOT" <<'EOF' || die "$TEMPLATE: rule violated"
import pathlib, sys, tomllib
from cfnlint.decode import decode

template, _ = decode(sys.argv[1])
root = pathlib.Path(sys.argv[2])
params = template.get("Parameters") or {}
resources = template.get("Resources") or {}
function_globals = (template.get("Globals") or {}).get("Function") or {}
problems, checked = [], 0

def number(value):
    """A literal, or a Ref to a parameter resolved to its default (what a plain deploy uses)."""
    if isinstance(value, dict) and list(value) == ["Ref"] and value["Ref"] in params:
        value = params[value["Ref"]].get("Default")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None

for name, function in resources.items():
    if function.get("Type") != "AWS::Serverless::Function":
        continue
    props = function.get("Properties") or {}
    timeout = number(props.get("Timeout", function_globals.get("Timeout", 3)))
    for event_name, event in (props.get("Events") or {}).items():
        if event.get("Type") != "SQS":
            continue
        queue_ref = (event.get("Properties") or {}).get("Queue")
        queue_name = queue_ref.get("Fn::GetAtt", [None])[0] if isinstance(queue_ref, dict) else None
        queue = (resources.get(queue_name) or {}).get("Properties")
        if queue is None:
            problems.append(f"{name}.{event_name}: its queue is not a resource of this template")
            continue
        checked += 1
        visibility = number(queue.get("VisibilityTimeout", 30))  # SQS default
        if timeout is None or visibility is None:
            problems.append(f"{queue_name}/{name}: VisibilityTimeout or Timeout is not a number")
        elif visibility < 6 * timeout:
            problems.append(f"{queue_name}: VisibilityTimeout {visibility} < 6 x {name} "
                            f"Timeout {timeout} = {6 * timeout}")
        if not (queue.get("RedrivePolicy") or {}).get("deadLetterTargetArn"):
            problems.append(f"{queue_name}: no RedrivePolicy.deadLetterTargetArn (dead-letter queue)")
if not checked:
    problems.append("no function with an SQS event on a queue of this template")

# The crate must build what the template names, with the features cargo-lambda is told to use.
cargo = tomllib.loads((root / "Cargo.toml").read_text())
lambda_toml = root / "CargoLambda.toml"
wanted = set(tomllib.loads(lambda_toml.read_text()).get("build", {}).get("features", [])
             if lambda_toml.exists() else [])
declared = set(cargo.get("features", {}))
if wanted and not wanted & declared:
    print(f"[check-deploy.sh] not yet checked: Cargo.toml declares none of {sorted(wanted)} "
          "(CargoLambda.toml), so the Lambda binary does not exist yet", file=sys.stderr)
else:
    problems += [f"CargoLambda.toml: feature {f!r} is not in Cargo.toml [features]"
                 for f in sorted(wanted - declared)]
    bins = {b["name"] for b in cargo.get("bin", [])} | {
        p.stem if p.suffix == ".rs" else p.parent.name
        for p in [*root.glob("src/bin/*.rs"), *root.glob("src/bin/*/main.rs")]}
    if (root / "src/main.rs").exists():
        bins.add(cargo["package"]["name"])
    for name, resource in resources.items():
        binary = ((resource.get("Metadata") or {}).get("BuildProperties") or {}).get("Binary")
        if binary and binary not in bins:
            problems.append(f"{name}: Binary {binary!r} is not a bin target of the crate")

for problem in problems:
    print(f"[check-deploy.sh] {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
log "$TEMPLATE: every SQS-fed function has a DLQ and VisibilityTimeout >= 6 x Timeout"

# 3. Workflows.
workflows=("$LOADER_ROOT"/.github/workflows/*.yml)
[ -f "${workflows[0]}" ] || die "no workflow in .github/workflows"
"$DEPLOY_VENV/bin/check-jsonschema" --builtin-schema vendor.github-workflows "${workflows[@]}" >&2 ||
    die "a workflow does not match the GitHub workflow schema"
log "${workflows[*]#"$LOADER_ROOT/"}: valid (GitHub workflow schema)"

# 4. Dockerfile (the build context is the repository root).
"$PY" - "$DOCKERFILE" "$LOADER_ROOT" <<'EOF' || die "$DOCKERFILE: check failed"
import glob, json, os, pathlib, shlex, sys, tomllib
from dockerfile_parse import DockerfileParser

path, root = sys.argv[1], pathlib.Path(sys.argv[2])
with open(path, "rb") as fd:  # a fileobj: given a path, the parser wants it named Dockerfile
    instructions = DockerfileParser(fileobj=fd).structure
problems = []

def args(instruction):
    value = instruction["value"].strip()
    return json.loads(value) if value.startswith("[") else shlex.split(value)

stages = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
if len(stages) < 2:
    problems.append("expected a multi-stage build (two FROM or more)")
final = instructions[stages[-1] if stages else 0:]
last = {ins["instruction"]: ins for ins in final}  # the last of each kind wins, as in Docker
user = last["USER"]["value"].split(":")[0] if "USER" in last else "root"
if user in ("root", "0"):
    problems.append(f"the final stage runs as root (USER {user})")
entrypoint = args(last["ENTRYPOINT"]) if "ENTRYPOINT" in last else []
if not entrypoint or os.path.basename(entrypoint[0]) != "loader":
    problems.append(f"the final stage's ENTRYPOINT is not loader: {entrypoint}")

copied = set()
for ins in instructions:
    if ins["instruction"] not in ("COPY", "ADD"):
        continue
    words = args(ins)
    if any(w.startswith("--from=") for w in words):
        continue  # from another stage, not from the repository
    for source in [w for w in words if not w.startswith("--")][:-1]:
        if not glob.glob(str(root / source.lstrip("/"))):
            problems.append(f"line {ins['startline'] + 1}: COPY source {source} does not exist")
        copied.add(os.path.normpath(source.lstrip("/")))

# What `cargo build` reads: the manifest, lockfile, sources, build script, the folders build.rs
# and embed_migrations! embed, and every target Cargo.toml declares (a missing one is an error).
cargo = tomllib.loads((root / "Cargo.toml").read_text())
needed = ["Cargo.toml", "Cargo.lock", "src", "sql", "migrations"]
if (root / "build.rs").exists():
    needed.append(cargo.get("package", {}).get("build", "build.rs"))
if "lib" in cargo:
    needed.append(cargo["lib"].get("path", "src/lib.rs"))
for kind, folder in [("bin", "src/bin"), ("test", "tests"), ("bench", "benches"),
                     ("example", "examples")]:
    needed += [t.get("path") or f"{folder}/{t['name']}.rs" for t in cargo.get(kind, [])]
for need in needed:
    need = os.path.normpath(need)
    if "." not in copied and not any(need == c or need.startswith(c + "/") for c in copied):
        problems.append(f"the build reads {need} but no COPY brings it in")

for problem in problems:
    print(f"[check-deploy.sh] {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
log "$DOCKERFILE: multi-stage, non-root, ENTRYPOINT loader, COPY sources present"
