#!/usr/bin/env bash
# Expert and pipeline parallelism on several GPUs of one node (nccl), the checks a single GPU cannot make:
# the EP all-to-all and its overlap (bench/ep.py), and short `small`-preset pretrainings under DP, EP, EP with
# redundant experts and overlap, EP + overlap + FP8 (bf16 autocast), activation checkpointing (full, selective), two
# pipeline schedules and PP x EP, all with the same global batch: their losses should agree (to summation order; FP8
# to its own drift) and their tokens/s, MFU and peak memory compare the layouts; then a DCP checkpoint written in the
# background by FSDP2 + EP, resumed under PP x EP.
#   NGPU=8 bash runs/multigpu_check.sh               (default: all visible GPUs; at least 2)
#   DEVICE=cpu NGPU=2 PRESET=tiny bash runs/multigpu_check.sh   the same commands on CPU gloo ranks (a dry run)
# Results under $OUT (default out/multigpu_check): ep_bench.json, one run directory per configuration, summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
DEVICE=${DEVICE:-cuda}
NGPU=${NGPU:-$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")}
PRESET=${PRESET:-small}
OUT=${OUT:-out/multigpu_check}
STEPS=${STEPS:-20}
[ "$NGPU" -ge 2 ] || { echo "multigpu_check: needs at least 2 GPUs (NGPU=$NGPU)" >&2; exit 1; }
mkdir -p "$OUT"
RUN=".venv/bin/torchrun --standalone --nproc_per_node $NGPU"
if [ "$PRESET" = tiny ]; then SEQ=64; B=4; TOK=1024; VOCAB=4096; else SEQ=1024; B=8; TOK=8192; VOCAB=32768; fi
SIZE="--seq-len $SEQ --batch-size $B"
PPB="--batch-size $((B * 2)) --pp-microbatches 4"  # 2 stages: half the data-parallel ranks, so twice their batch
[ -f "$OUT/data/meta.json" ] || .venv/bin/nanoseek data --out "$OUT/data" --docs 4000 --vocab-size $VOCAB
$RUN bench/ep.py --device "$DEVICE" --preset "$PRESET" --tokens $TOK --json "$OUT/ep_bench.json" | tee "$OUT/summary.txt"
common="pretrain --preset $PRESET --data $OUT/data --max-steps $STEPS --device $DEVICE --eval-every $STEPS --log-every 5 $SIZE"
# (fp8 needs Hopper or the CPU emulation; ep_overlap_fp8 runs the overlapped exchange under bf16 autocast)
for cfg in "dp" "ep:--ep $NGPU" "ep_overlap_eplb:--ep $NGPU --ep-overlap --ep-redundant $NGPU --eplb-every 5" \
           "ep_overlap_fp8:--ep $NGPU --ep-overlap --fp8" "dp_ac_full:--ac full" "dp_ac_selective:--ac selective" \
           "pp_1f1b:--pp 2 --pp-schedule 1f1b $PPB" "pp_dualpipev:--pp 2 --pp-schedule dualpipev $PPB" \
           "pp_ep:--pp 2 --pp-schedule 1f1b --ep $((NGPU / 2)) $PPB"; do
    name=${cfg%%:*}; flags=${cfg#*:}; [ "$name" = dp ] && flags=""
    rm -rf "$OUT/$name"
    $RUN -m nanoseek $common --out "$OUT/$name" $flags 2>&1 | tail -3
    .venv/bin/python - "$OUT/$name" "$name" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
print(f"{sys.argv[2]:18s} final loss {rows[-1]['loss']:.4f}  tokens/s {sum(r['tokens_per_s'] for r in rows[1:]) / max(1, len(rows) - 1):,.0f}"
      f"  mfu {rows[-1]['mfu'] or 0:.3f}  peak memory {rows[-1].get('peak_memory_gib', float('nan')):.2f} GiB")
PY
done
# DCP under nccl: a run saved mid-way in the background by FSDP2 + EP (each rank its shards), then resumed from that
# checkpoint under PP 2 x EP (each rank reading only its stage): its final loss should be dp's
HALF=$((STEPS / 2))
rm -rf "$OUT/dcp_save" "$OUT/dcp_resume"
$RUN -m nanoseek $common --out "$OUT/dcp_save" --ep "$NGPU" --parallel fsdp --save-every "$HALF" --async-save 2>&1 | tail -1
mkdir -p "$OUT/dcp_resume/checkpoints"
cp "$OUT/dcp_save/run.json" "$OUT/dcp_resume/"
cp -r "$OUT/dcp_save/checkpoints/step_$(printf %06d "$HALF")" "$OUT/dcp_resume/checkpoints/"
$RUN -m nanoseek $common --out "$OUT/dcp_resume" --pp 2 --pp-schedule 1f1b --ep $((NGPU / 2)) $PPB --resume auto 2>&1 \
    | tail -1
.venv/bin/python - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
last = {n: [json.loads(l) for l in open(f"{sys.argv[1]}/{n}/metrics.jsonl")][-1]["loss"] for n in ("dp", "dcp_resume")}
print(f"dcp: saved by fsdp+ep (async), resumed under pp x ep: final loss {last['dcp_resume']:.4f} (dp {last['dp']:.4f})")
PY
