#!/usr/bin/env bash
# Build the virtualenv in which the tests run real SGLang on a CPU-only machine:
#
#   scripts/sglang-test-env.sh VERSION      ->  .cache/sglang-envs/VERSION/
#
# torch==2.13.0 (CPU build), torchvision==0.28.0 without its deps, sglang==VERSION without its
# deps, exactly the packages the harness's import chain needs (tests/sglang/requirements-VERSION.txt,
# pinned, installed --no-deps), our runtime deps (tests/sglang/requirements-prefill-bootstrap.txt)
# and this repository in editable mode, so SGLang's load_plugins() finds our entry point.
#
# Idempotent: the env carries a stamp, a hash of this script and both requirements files; a
# matching stamp exits at once, anything else rebuilds the env from scratch. A second stamp holds
# pyproject.toml's hash: when only it changed (say, a new entry point, which the editable install
# records), just the editable install is redone (seconds). Builds of one version take a lock.
# Facts and the reasons behind each choice: tests/sglang/README.md.
set -euo pipefail

VERSION=${1:?usage: scripts/sglang-test-env.sh VERSION   (e.g. 0.5.23)}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
ENVS="$ROOT/.cache/sglang-envs"
ENV="$ENVS/$VERSION"
HARNESS="$ROOT/tests/sglang"
REQS="$HARNESS/requirements-$VERSION.txt"
OURS="$HARNESS/requirements-prefill-bootstrap.txt"
# Pinned on purpose: an unpinned torch pulls a multi-GB CUDA build. The only torchvision wheel
# for this torch is a CUDA build, installed without deps (see README.md).
TORCH=torch==2.13.0
TORCHVISION=torchvision==0.28.0

say() { echo "sglang-test-env $VERSION: $*"; }
die() { echo "sglang-test-env $VERSION: error: $*" >&2; exit 1; }

[[ -f "$REQS" ]] || die "no $REQS: this version has no pinned requirements (known: $(cd "$HARNESS" && ls requirements-0*.txt | sed 's/requirements-//; s/\.txt//' | tr '\n' ' '))"

env_stamp() { cat "${BASH_SOURCE[0]}" "$REQS" "$OURS" | sha256sum | cut -d' ' -f1; }
project_stamp() { sha256sum <"$ROOT/pyproject.toml" | cut -d' ' -f1; }
want_env=$(env_stamp)
want_project=$(project_stamp)
env_ok() { [[ -f "$ENV/.stamp" && "$(cat "$ENV/.stamp")" == "$want_env" ]]; }
project_ok() { [[ -f "$ENV/.stamp-project" && "$(cat "$ENV/.stamp-project")" == "$want_project" ]]; }
env_ok && project_ok && exit 0

mkdir -p "$ENVS"
exec 9>"$ENVS/.$VERSION.lock"
flock 9
# Another build may have finished while we waited for the lock.
env_ok && project_ok && exit 0

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n%s\n' "$TORCH" "$TORCHVISION" >"$constraints"
# Every install is constrained by both pins files too, so torch's own dependencies get their pins.
# pip's notes on the machine's extra index locations are noise here; its errors still show.
pip() {
  "$ENV/bin/python" -m pip --quiet install -c "$constraints" -c "$REQS" -c "$OURS" "$@" 2>&1 \
    | { grep -v '^WARNING: Location ' || true; }
}

if env_ok; then
  say "pyproject.toml changed: prefill-bootstrap --no-deps -e . again"
  pip --no-deps -e "$ROOT"
  echo "$want_project" >"$ENV/.stamp-project"
  exit 0
fi

start=$SECONDS
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); the SGLang wheels used here are built for CPython 3.11 (set PYTHON=)"

say "[1/7] fresh virtualenv in ${ENV#"$ROOT"/}"
rm -rf "$ENV"
"$PYTHON" -m venv "$ENV"

say "[2/7] $TORCH (CPU build)"
pip "$TORCH"

say "[3/7] $TORCHVISION --no-deps"
pip --no-deps "$TORCHVISION"

say "[4/7] sglang==$VERSION --no-deps"
pip --no-deps "sglang==$VERSION"

say "[5/7] $(grep -c '^[a-zA-Z]' "$REQS") pinned packages of SGLang's import chain --no-deps (${REQS#"$ROOT"/})"
pip --no-deps -r "$REQS"

say "[6/7] prefill-bootstrap --no-deps -e . and its $(grep -c '^[a-zA-Z]' "$OURS") pinned runtime packages"
pip --no-deps -r "$OURS"
pip --no-deps -e "$ROOT"

say "[7/7] check: the harness's imports load"
(cd "$HARNESS" && HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore "$ENV/bin/python" -c '
import torchvision_schemas
torchvision_schemas.declare()
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
import sglang.srt.plugins, sglang.srt.server_args, sglang.srt.distributed.parallel_state
import sglang.srt.disaggregation.common.conn, sglang.srt.disaggregation.base.conn
import prefill_bootstrap
') || die "the env is missing a package the harness imports: see the traceback above"

echo "$want_env" >"$ENV/.stamp"
echo "$want_project" >"$ENV/.stamp-project"
say "ready in $((SECONDS - start)) s"
