#!/usr/bin/env bash
# The main job on a CPU: installs what it needs into .venv, then runs nanoseek end to end on 2 cores.
# Today: generate the embedded reasoning corpus (reasoning-gym, locally), train the tokenizer, pretrain the tiny
# MoE + MLA + MTP model (~10 minutes), and print where the model is and what it cost. SFT and GRPO join as they land.
# Re-running continues the same run (--resume auto); OUT=dir chooses another directory; extra flags go to pretrain.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-out/speedrun}
.venv/bin/nanoseek pretrain --preset tiny --out "$OUT" --resume auto "$@"
echo
echo "try it:  .venv/bin/nanoseek generate --checkpoint $OUT/model --temperature 0 --max-new-tokens 40 \\"
echo "           --prompt \$'Problem: Spell this word backward (example: sun -> nus): water\\nSolution:\\n'"
