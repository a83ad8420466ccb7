#!/usr/bin/env bash
# The main job on a CPU: installs what it needs into .venv, then runs nanoseek end to end.
# Today: train the tokenizer on locally generated reasoning-gym text, build the tiny MoE+MLA+MTP model, save it in the
# DeepseekV3ForCausalLM layout, load it back, generate a few tokens. (Pretraining, SFT and GRPO join as they land.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/nanoseek demo --out "${OUT:-out/speedrun}" "$@"
