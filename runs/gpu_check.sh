#!/usr/bin/env bash
# The GPU path in one command: the CUDA tests (pytest -m gpu), the MoE layer and the training step against
# transformers, a short `small`-preset pretraining (tokens/s and MFU from its ledger), decoding against transformers
# with MTP speculative decoding, and FP8 (block-scaled GEMMs, a training step, served-weight memory).
#   bash runs/gpu_check.sh                          on a GPU machine: about 8 minutes on one H200
#   bash runs/gpu_check.sh --device cpu --quick     the dry run on a CPU, the same script at tiny sizes (< 5 min)
#   OUT=dir bash runs/gpu_check.sh  (or --out dir)  where summary.json, summary.md and logs.txt go
# On a machine whose python3 already has CUDA torch (and no .venv), the packages it lacks come from wheels carried in
# .whl/ (runs/gpu_wheels.sh downloads them) into /tmp/site; elsewhere it uses the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
for a in "$@"; do [ "$a" = "cpu" ] && DEVICE=cpu; done
if [ "$DEVICE" = cpu ] || { [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }; then
    bash runs/setup.sh
    PY=.venv/bin/python
else
    PY=python3
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        for sdist in .whl/*.tar.gz; do  # (pycosat: a C extension; needed only by a few reasoning-gym tasks)
            [ -f "$sdist" ] || continue
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$sdist" \
                || echo "gpu_check: could not build $sdist here; the tasks that need it are unavailable"
        done
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
fi
exec "$PY" runs/gpu_check.py "$@"
