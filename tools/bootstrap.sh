#!/usr/bin/env bash
# Creates .venv with exactly the locked dev set (requirements/dev.txt, uv.lock's export, with
# hashes) and the project on top of it without its dependencies, so nothing unlocked gets in.
# Idempotent: recreates .venv when the lock changed (a new venv drops what the lock no longer
# has) and reinstalls the project when pyproject.toml changed. Needs only Python >= 3.11.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "bootstrap: Python >= 3.11 is required ($py is $("$py" --version 2>&1))" >&2; exit 1; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
lock_stamp=.venv/.lock-$(sha256sum requirements/dev.txt | cut -c1-16)
project_stamp=.venv/.project-$(sha256sum pyproject.toml | cut -c1-16)
if [ -x .venv/bin/python ] && [ ! -f "$lock_stamp" ]; then
  echo "bootstrap: the lock changed since .venv was made: recreating it" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv and installing the locked dev dependencies" >&2
  "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements/dev.txt
  touch "$lock_stamp"
fi
if [ ! -f "$project_stamp" ]; then
  echo "bootstrap: installing the project into .venv" >&2
  # The locked setuptools builds it (no build isolation: that would fetch an unlocked one).
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  rm -f .venv/.project-*
  touch "$project_stamp"
fi
