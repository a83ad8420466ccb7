#!/usr/bin/env bash
# The R1 recipe at GPU scale: the `small` preset (~1.2B total / ~0.25B active MoE) on every GPU of one node through
# torchrun (NCCL; DDP), on a harder task mix than the CPU speedrun (grade-school word problems, gsm_symbolic, join
# the RL and eval mix; longer thoughts). Same stages, same resumability, same report.
#   NGPU=8 bash runs/speedrun_gpu.sh            (default: all visible GPUs)
#   OUT=dir PRESET=small bash runs/speedrun_gpu.sh
# Not yet run on GPUs by this project: treat the step counts and learning rates as a starting point.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
NGPU=${NGPU:-$(.venv/bin/python -c "import torch; print(max(1, torch.cuda.device_count()))")}
OUT=${OUT:-out/gpu_small}
PRESET=${PRESET:-small}
NS=.venv/bin/nanoseek
RUN=".venv/bin/torchrun --standalone --nproc_per_node $NGPU -m nanoseek"
# the trained and held-out families with their exact reasoning-gym configs, read by every stage (edit to change them)
FAMILIES="$OUT/families.json"
mkdir -p "$OUT"
[ -f "$FAMILIES" ] || $NS families --out "$FAMILIES" --heldout basic_arithmetic \
  --trained chain_sum simple_equations letter_counting spell_backward count_bits gsm_symbolic

[ -f "$OUT/data/meta.json" ] || $NS data --out "$OUT/data" --docs 400000 --vocab-size 32768 --families $FAMILIES
$RUN pretrain --preset "$PRESET" --data "$OUT/data" --out "$OUT/pretrain" --resume auto \
  --max-steps 3000 --seq-len 1024 --batch-size 16 --lr 1.5e-3 --save-every 500 --eval-every 250
$RUN sft --init "$OUT/pretrain/model" --out "$OUT/sft" --resume auto --families $FAMILIES \
  --examples 40000 --max-steps 600 --seq-len 1024 --batch-size 16 --lr 3e-4
[ -f "$OUT/eval/sft/eval.json" ] || $NS eval --checkpoint "$OUT/sft/model" --out "$OUT/eval/sft" --label sft \
  --families $FAMILIES --problems 200 -k 16 --max-new-tokens 512 --budgets 0,16,64,256,none --max-batch 1024
$RUN rl --init "$OUT/sft/model" --out "$OUT/rl" --resume auto --families $FAMILIES \
  --prompts $((32 * NGPU)) --group 16 --max-new-tokens 512 --max-steps 300 --lr 1e-5 --beta 0.001 --loss dapo \
  --clip-eps-high 0.28 --micro-batch 32 --save-every 50 --eval-every 50
[ -f "$OUT/eval/rl/eval.json" ] || $NS eval --checkpoint "$OUT/rl/model" --out "$OUT/eval/rl" --label rl \
  --families $FAMILIES --problems 200 -k 16 --max-new-tokens 512 --budgets 0,16,64,256,none --max-batch 1024
$NS report "$OUT"
echo "report: $OUT/report.md"
