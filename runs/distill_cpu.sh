#!/usr/bin/env bash
# Distillation against RL on a small model, R1's comparison at our scale. Run after the main job (it reads its
# directory): a smaller dense student (`tiny-dense`, 0.41M parameters against the teacher's 1.74M MoE) is pretrained on
# the main job's corpus and tokenizer, then taken three ways, each scored on the same held-out problems as the main
# job's models (its families.json, the same eval seeds):
#   sft        the cold-start SFT alone
#   sft+grpo   the same SFT model, then GRPO with the main job's settings
#   distilled  the pretrained student fine-tuned on the GRPO teacher's verified samples (`nanoseek distill`)
# The report ($OUT/report.md, "Distillation") puts them side by side with paired differences. About 25 min on 2 cores.
# Every stage resumes where it stopped: re-run the same command after a crash.
#   bash runs/distill_cpu.sh                 (the main job's default directory, out/speedrun)
#   OUT=out/other bash runs/distill_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-out/speedrun}
NS=.venv/bin/nanoseek
for need in "$OUT/families.json" "$OUT/pretrain/data/meta.json" "$OUT/rl/model/config.json"; do
  if [ ! -f "$need" ]; then
    echo "runs/distill_cpu.sh: $need is missing: run the main job first (OUT=$OUT bash runs/speedrun_cpu.sh)" >&2
    exit 1
  fi
done
FAMILIES="$OUT/families.json"
D="$OUT/distill"
# the main job's settings, so that the student's three ways differ only in what the issue compares
SFT_ARGS="--partial-thoughts 0.5"
RL_ARGS="--lr 3e-5 --beta 0.04 --max-steps 300"
t0=$(date +%s)
stage() { echo; echo "=== $1  ($(( ($(date +%s) - t0) / 60 )) min so far)"; }

stage "pretrain the student (tiny-dense) on the main job's corpus"
$NS pretrain --preset tiny-dense --data "$OUT/pretrain/data" --out "$D/pretrain" --resume auto --max-steps 1600
stage "student: cold-start SFT"
$NS sft --init "$D/pretrain/model" --out "$D/sft" --resume auto --families "$FAMILIES" $SFT_ARGS
stage "student: GRPO after SFT"
$NS rl --init "$D/sft/model" --out "$D/rl" --resume auto --families "$FAMILIES" $RL_ARGS
stage "student: distilled from the GRPO teacher's verified samples"
$NS distill --teacher "$OUT/rl/model" --student "$D/pretrain/model" --out "$D/distilled" --resume auto \
  --families "$FAMILIES"
for way in sft rl distilled; do
  model="$D/$way/model"
  [ "$way" = distilled ] && model="$D/distilled/sft/model"
  stage "eval of the student: $way"
  [ -f "$D/eval/$way/eval.json" ] || $NS eval --checkpoint "$model" --out "$D/eval/$way" --label "student-$way" \
    --families "$FAMILIES" --problems 100 --budgets ""
done
stage "report"
$NS report "$OUT"
echo
echo "done in $(( ($(date +%s) - t0) / 60 )) min. The comparison: $OUT/report.md, section Distillation"
