#!/usr/bin/env bash
# The main job on a CPU: installs what it needs into .venv, then runs the whole R1 recipe on 2 cores in about 30 min:
#   corpus (reasoning-gym, generated locally) -> tokenizer -> pretrain the tiny MoE + MLA + MTP model
#   -> cold-start SFT (<think> traces) -> eval -> GRPO with verifiable rewards -> eval -> report.md + plots
# Every stage resumes where it stopped (re-run the same command after a crash); OUT=dir chooses another directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-out/speedrun}
NS=.venv/bin/nanoseek
# the task families the tiny model is trained and scored on (sizes in nanoseek/data/tasks.py); basic_arithmetic is
# never trained: the held-out family. OUT/families.json records their exact reasoning-gym configs, and every stage
# reads it: write (or edit) it before the first run to train other families or sizes.
FAMILIES="$OUT/families.json"
# pretraining: the worked solutions plus drills of the facts their steps use (half as many documents again), for
# 1,600 steps of 4,096 tokens on the `cpu` preset (tiny with a 512-token vocabulary)
PRETRAIN_ARGS="--docs 80000 --drills 0.5 --max-steps 1600"
# GRPO at a low learning rate with DeepSeekMath's β 0.04: at R1's β 0.001 and lr 1e-4 the tiny model drifts off what
# SFT taught and forgets arithmetic (bench/RESULTS.md, "GRPO, round 2")
RL_ARGS="--lr 3e-5 --beta 0.04"
# cold start: half the thoughts stop early (after a random number of their steps) before the right answer, so the
# model can answer from a thought of any length (a budget cuts one) and GRPO can learn to think to the end
SFT_ARGS="--partial-thoughts 0.5"
# eval: 100 unseen problems per family × 8 samples; the thinking-budget curve on the same problems, 4 samples each
EVAL_ARGS="--problems 100 --budget-samples 4 --budgets 0,4,8,16,32,none"
t0=$(date +%s)
stage() { echo; echo "=== $1  ($(( ($(date +%s) - t0) / 60 )) min so far)"; }

mkdir -p "$OUT"
[ -f "$FAMILIES" ] || $NS families --out "$FAMILIES" --trained chain_sum simple_equations letter_counting count_bits \
  --heldout basic_arithmetic
stage "pretrain"
$NS pretrain --preset cpu --out "$OUT/pretrain" --resume auto --families $FAMILIES $PRETRAIN_ARGS
stage "cold-start SFT"
$NS sft --init "$OUT/pretrain/model" --out "$OUT/sft" --resume auto --families $FAMILIES $SFT_ARGS
stage "eval of the SFT model"
[ -f "$OUT/eval/sft/eval.json" ] || $NS eval --checkpoint "$OUT/sft/model" --out "$OUT/eval/sft" --label sft \
  --families $FAMILIES $EVAL_ARGS
stage "GRPO"
$NS rl --init "$OUT/sft/model" --out "$OUT/rl" --resume auto --families $FAMILIES --max-steps 300 $RL_ARGS
stage "eval of the GRPO model"
[ -f "$OUT/eval/rl/eval.json" ] || $NS eval --checkpoint "$OUT/rl/model" --out "$OUT/eval/rl" --label rl \
  --families $FAMILIES $EVAL_ARGS
stage "report"
$NS report "$OUT"
echo
echo "done in $(( ($(date +%s) - t0) / 60 )) min. The report: $OUT/report.md (plots in $OUT/plots/)"
echo "chat with it:   .venv/bin/nanoseek chat --checkpoint $OUT/rl/model"
echo "serve it:       .venv/bin/nanoseek serve $OUT/rl/model   (OpenAI API + chat page at http://127.0.0.1:8000)"
