#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the default (fast) suite on 2 CPU cores.
# Extra arguments go to pytest, e.g. `bash runs/test.sh -m slow` for the long end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"
