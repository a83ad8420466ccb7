#!/usr/bin/env bash
# Creates .venv (once) and installs the exact, tested package set of requirements.lock plus nanoseek itself.
# Idempotent and quick when nothing changed. torch 2.13.0 comes from the CPU build on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.nanoseek-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # (grep drops this machine's notes about local package folders it does not have)
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
    .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    echo "$want" > "$stamp"
fi
