#!/usr/bin/env bash
# The distributed trainer's benchmarks and a short real training run on one GPU, in one call (< 6 min).
#
#   bash tools/bench/gpu_bench.sh                  # on the GPU machine: python3 with torch, no .venv
#   GPU_BENCH_DRY=1 PY=.venv/bin/python OUT=/tmp/gpu_dry bash tools/bench/gpu_bench.sh   # CPU rehearsal
#
# Needs the wheels of pydantic and its dependencies in .whl/ (the GPU machine has no network and no
# pydantic; `.whl/` is git-ignored, so carry it). Steps (each under its own timeout, all within a budget of
# GPU_BENCH_BUDGET=340 s; a failed step is recorded and the next one still runs; the exit code is the number
# of failed or skipped steps):
#   1. pydantic from .whl/ into /tmp/site (skipped where pydantic imports already)
#   2. shard the synthetic set at 112 px (300 subjects, 18,000 faces) with 16 workers
#   3. the trainer itself (python3 -m fer_dist.train, quick-start config on the GPU shards, resnet18 at
#      112 px, bf16, 1 process): stopped after round 1 by run.stop_after_rounds, resumed from that
#      checkpoint to the end; then checks: summary.json, every round once, CUDA RNG states in the checkpoint
#   4. bench_train.py: stream vs in-memory training throughput at the trainer's batch, workers 2 / 6 / 12
#   5. bench_round.py: round (predict + gather + rewrite) vs plain inference, and the table alone
#   6. bench_train.py at a GPU-sized batch (256)
# Everything lands in $OUT: step logs, bench JSON, the run's metrics.jsonl, summary.json, config.yaml,
# checkpoint metadata, status.txt (one line per step: name, exit code, seconds).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_bench_out}
PY=${PY:-python3}
DRY=${GPU_BENCH_DRY:-0}
WORK=${WORK:-/tmp/gpu_bench_work}
mkdir -p "$OUT" "$WORK"
: > "$OUT/status.txt"
FAILED=0
T0=$(date +%s)

if [ "$DRY" = 1 ]; then   # tiny sizes on the CPU: checks the script's logic, not the figures
    SUBJECTS=6; SIZE=32; SHARD_WORKERS=2; DEVICE=cpu; PREC=no; BACKBONE=resnet18
    TRAIN_ARGS=(--workers 0 1 --samples 128 --repeat 1 --memory-batches 8)
    TRAIN_BIG=(--workers 1 --batch 64 --samples 128 --repeat 1 --memory-batches 4)
    ROUND_ARGS=(--workers 1 --repeat 1 --ids 10000 100000 --table-repeat 1)
    RUN_WORKERS=1; WARMUP=1; ROUNDS=2
else
    SUBJECTS=300; SIZE=112; SHARD_WORKERS=16; DEVICE=auto; PREC=bf16; BACKBONE=resnet18
    TRAIN_ARGS=(--workers 2 6 12 --samples 8000 --repeat 2 --memory-batches 256)
    TRAIN_BIG=(--workers 12 --batch 256 --samples 16384 --repeat 2 --memory-batches 64)
    ROUND_ARGS=(--workers 8 --repeat 3 --ids 10000 100000 1000000 --table-repeat 3)
    RUN_WORKERS=8; WARMUP=2; ROUNDS=2
fi
SHARDS=$WORK/synthetic$SIZE
RUN_DIR=$WORK/runs

BUDGET=${GPU_BENCH_BUDGET:-340}  # seconds for the whole script: a step gets at most what is left of it
step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, record the outcome
    local name=$1 limit=$2; shift 2
    local start rc left
    start=$(date +%s)
    left=$(( T0 + BUDGET - start ))
    if [ "$left" -lt 20 ]; then
        echo "$name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/status.txt"
        FAILED=$((FAILED + 1))
        return 1
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
    timeout --kill-after=5 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/status.txt"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    return "$rc"
}

# 1. pydantic (the GPU image lacks it): pip into /tmp/site, or unzip the wheels there if pip is missing
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    step wheels 120 bash -c "\"$PY\" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl ||
        \"$PY\" -c \"import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl/*.whl')]\""
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    echo "dry=$DRY python=$("$PY" -V 2>&1) host=$(hostname) cores=$(nproc) start=$(date -Is)"
    timeout 60 "$PY" -c "import torch, torchvision, accelerate, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', '| torchvision', torchvision.__version__, '| accelerate', accelerate.__version__, '| pydantic', pydantic.__version__)"
    nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv 2>/dev/null || true
    uptime
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. shards
if [ ! -f "$SHARDS/manifest.json" ]; then
    step shard 150 "$PY" -c "from fer_dist.cli import main; main()" shard --dataset synthetic --out "$SHARDS" \
        --subjects "$SUBJECTS" --size "$SIZE" --workers "$SHARD_WORKERS" --no-progress
fi

# 3. the trainer on the GPU: stop after round 1 (checkpointed), resume to the end
rm -rf "$RUN_DIR"
DATA="{dir: $SHARDS, splits: [train]}"
TRAIN=("$PY" -m fer_dist.train --config launch_configs/train/quickstart_synthetic.yaml
       "data.labelled=[$DATA]" "data.unlabelled=[$DATA]"
       "data.val=[{dir: $SHARDS, splits: [val]}]" "data.test=[{dir: $SHARDS, splits: [test]}]"
       data.num_workers=$RUN_WORKERS model.backbone=$BACKBONE model.input_size=$SIZE
       "run.mixed_precision='$PREC'" run.num_processes=1 run.dir="$RUN_DIR" run.name=gpu run.progress=false
       method.warmup_epochs=$WARMUP method.max_rounds=$ROUNDS run.log_every=20)
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""
step train_part1 100 "${TRAIN[@]}" run.stop_after_rounds=1
step train_resume 90 "${TRAIN[@]}"
cat > "$WORK/check_run.py" <<'EOF'
"""The trainer's run after a stop and a resume: every round once, summary written, CUDA RNG saved."""
import json
import sys
from pathlib import Path

import torch

from fer_dist.checkpoint import latest_checkpoint, load_checkpoint

run, expected = Path(sys.argv[1]), int(sys.argv[2])
summary = json.loads((run / "summary.json").read_text())
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
rounds = [r for r in records if r["kind"] == "round"]
print("summary:", summary)
print("round records (round, val acc, drawn, predict s, gather s):",
      [(r["round"], round(r["val/acc"], 4), r["unlabelled/drawn"], round(r["time/predict"], 3),
        round(r["time/gather"], 4)) for r in rounds])
steps = [r for r in records if r["kind"] == "step"]
print("step records:", len(steps), "last images/s:", [round(r["train/images_per_s"]) for r in steps[-5:]])
latest = latest_checkpoint(run)
_, rng = load_checkpoint(latest, 0)
print("rng states in", latest.name, ":", sorted(rng), "cuda devices:", len(rng.get("cuda", [])))
print("precision:", [line.strip() for line in (run / "config.yaml").read_text().splitlines()
                     if "mixed_precision" in line])
assert summary["rounds"] == expected, f"summary says {summary['rounds']} rounds, expected {expected}"
assert [r["round"] for r in rounds] == list(range(1, expected + 1)), "rounds missing or repeated after resume"
if torch.cuda.is_available():
    assert "cuda" in rng, "no CUDA RNG state in the checkpoint"
print("resume check: OK")
EOF
step check_run 60 "$PY" "$WORK/check_run.py" "$RUN_DIR/gpu" "$ROUNDS"
COMMON=(--shards "$SHARDS" --device "$DEVICE" --backbone "$BACKBONE" --input-size "$SIZE" --mixed-precision "$PREC")
# 4. training throughput at the trainer's batch (32)
step bench_train 150 "$PY" tools/bench/bench_train.py "${COMMON[@]}" "${TRAIN_ARGS[@]}" --json "$OUT/bench_train.json"
# 5. the round against plain inference, and the table alone
step bench_round 120 "$PY" tools/bench/bench_round.py "${COMMON[@]}" "${ROUND_ARGS[@]}" --json "$OUT/bench_round.json"

# 6. a GPU-sized batch, last: the least needed
step bench_train_b256 90 "$PY" tools/bench/bench_train.py "${COMMON[@]}" "${TRAIN_BIG[@]}" \
    --json "$OUT/bench_train_b256.json"
grep -h "resumed from\|stopped after\|error" "$OUT/train_part1.log" "$OUT/train_resume.log" | head -5
for f in metrics.jsonl summary.json config.yaml; do cp "$RUN_DIR/gpu/$f" "$OUT/" 2>/dev/null; done
cp "$RUN_DIR/gpu/checkpoints/index.json" "$OUT/checkpoints_index.json" 2>/dev/null
uptime >> "$OUT/env.txt"
echo "total seconds=$(( $(date +%s) - T0 )) failed steps=$FAILED" | tee -a "$OUT/status.txt"
exit "$FAILED"
