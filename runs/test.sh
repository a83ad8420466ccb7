#!/usr/bin/env bash
# The test command: installs what it needs (.venv with the pinned packages; Debian's chromium for the browser test,
# when this machine lacks it and apt is at hand), then runs the default (fast) suite on 2 CPU cores.
# Extra arguments go to pytest, e.g. `bash runs/test.sh -m slow` for the long end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium for the browser test..."
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: no chromium and no root apt-get here: the browser test will be skipped"
    fi
fi
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
