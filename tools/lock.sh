#!/usr/bin/env bash
# The dependency lock: uv.lock (every runtime and dev dependency, with hashes) and its exports that
# installs use with `pip install --require-hashes`:
#   requirements/runtime.txt   the image (Dockerfile): runtime dependencies + the build group
#   requirements/dev.txt       .venv (tools/bootstrap.sh), so CI: runtime + the dev extra + build
#
#   tools/lock.sh            after editing dependencies in pyproject.toml (`make lock`): re-locks,
#                            keeping every pin that still satisfies pyproject.toml
#   tools/lock.sh --upgrade  takes the newest releases pyproject.toml allows (`make lock-upgrade`)
#   tools/lock.sh --check    fails when pyproject.toml, uv.lock and the exports disagree (`make lint`);
#                            offline: it resolves nothing
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
uv=${UV:-.venv/bin/uv}
[ -x "$uv" ] || uv=$(command -v uv) || { echo "lock: no uv (run make venv)" >&2; exit 1; }
export UV_PYTHON_DOWNLOADS=never

export_lock() {  # $1: output file; the rest: which extras and groups
  local out=$1
  shift
  "$uv" export --quiet --frozen --no-emit-project --format requirements.txt "$@" -o "$out"
}
runtime_args=(--no-dev --group build)
dev_args=(--extra dev --group build)

case "${1:-}" in
  --check)
    # Offline, uv only compares; on a mismatch it tries to re-resolve from its cache and says why
    # that failed, which reads as a different problem: our sentence first, uv's below it.
    if ! said=$("$uv" lock --check --offline --quiet 2>&1); then
      echo "lock: uv.lock does not match pyproject.toml (a dependency was added, removed or changed" >&2
      echo "      without re-locking); run: make lock, then commit uv.lock and requirements/" >&2
      sed 's/^/      uv: /' <<<"$said" >&2
      exit 1
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir "$tmp/requirements"
    export_lock "$tmp/requirements/runtime.txt" "${runtime_args[@]}"
    export_lock "$tmp/requirements/dev.txt" "${dev_args[@]}"
    for name in runtime dev; do
      # The header names the output file; compare the pins and hashes.
      if ! diff -u <(grep -v '^#' "requirements/$name.txt") <(grep -v '^#' "$tmp/requirements/$name.txt") >&2; then
        echo "lock: requirements/$name.txt is not uv.lock's export; run: make lock" >&2
        exit 1
      fi
    done
    ;;
  "" | --upgrade)
    "$uv" lock ${1:+"$1"}
    mkdir -p requirements
    export_lock requirements/runtime.txt "${runtime_args[@]}"
    export_lock requirements/dev.txt "${dev_args[@]}"
    echo "lock: uv.lock and requirements/*.txt updated; make venv installs them" >&2
    ;;
  *)
    echo "usage: tools/lock.sh [--upgrade|--check]" >&2
    exit 2
    ;;
esac
