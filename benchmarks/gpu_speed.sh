#!/usr/bin/env bash
# Training speed on one GPU, measured the way training runs, in one table (documentation/speed.md).
#
#     bash benchmarks/gpu_speed.sh [OUTPUT_DIR] [BASELINE_CHECKOUT]
#
# On a phantom made here (20 cases, 1.0 mm: 123 training slices at 176 px, as the MyoPS 2020 input of the
# benchmark), with random 512-d text priors and no pretrained file, it times:
#   - the benchmark's own timing (benchmarks/gpu_speed_steps.py benchmark_step: 3 warm-up and 8 timed steps per
#     stage plus the save) of I-MMSeg and TransUNet early fusion in BASELINE_CHECKOUT (an earlier commit, e.g.
#     git worktree add ../base f45b770) when given, and here: the GPU defaults with --compile off and on, and
#     --compile on with --deterministic 1;
#   - I-MMSeg R50-ViT-B_16, batch 8, 176 px, bf16, --compile on: the bare step with its FLOPs and model FLOP
#     utilisation, the training loop per stage (loader, losses, background save), a profile;
#   - the paper's setting (batch 24, 128 px) as a loop on 80 phantom cases, projected to 300 epochs of 1,970 slices;
#   - a 224 px, batch 24 epoch's data loading against its training step;
#   - the total loss of the first 200 steps with --compile off and on (deterministic, same seed).
# Each step has a time limit and the whole script a deadline (DEADLINE_S, default 540 s): what does not fit is
# reported as not measured. Outputs: OUTPUT_DIR/table.md (also printed), results.jsonl, speed_*.json, profile.txt,
# logs/. Environment: PYTHON (default python3), DEADLINE_S; for a dry run on the CPU: DEVICE=cpu VIT_NAME=testing
# COMPILE=off.
set -uo pipefail

OUT=$(realpath -m "${1:-$(dirname "$0")/../gpu_speed_output}")
BASELINE=${2:+$(realpath "$2")}
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-540}
DEVICE=${DEVICE:-cuda}
VIT_NAME=${VIT_NAME:-R50-ViT-B_16}
COMPILE=${COMPILE:-on}
START=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT/logs"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
export PYTHONUNBUFFERED=1

"$PYTHON" -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda, "GPU",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' | tee "$OUT/logs/environment.log"

# run NAME LIMIT_S COMMAND...: run it unless the deadline is near; log to logs/NAME.log; record its status.
run() {
  local name=$1 limit=$2 left status
  shift 2
  left=$(( DEADLINE_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "{\"step\": \"$name\", \"status\": \"not run: deadline\"}" >> "$RESULTS"
    echo "== $name: not run (deadline)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, $(( $(date +%s) - START )) s elapsed)"
  timeout --kill-after 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  status=$?
  [ $status -eq 0 ] || echo "{\"step\": \"$name\", \"status\": \"failed ($status), see logs/$name.log\"}" >> "$RESULTS"
  echo "   exit $status after $(( $(date +%s) - START )) s"
  return $status
}

# bench NAME CHECKOUT FLAGS...: the benchmark's timing of an iteration (3 warm-up, 8 timed) with CHECKOUT's code.
bench() {
  local name=$1 checkout=$2
  shift 2
  run "$name" 150 "$PYTHON" benchmarks/gpu_speed_steps.py benchmark_step --name "$name" --checkout "$checkout" \
    --results "$RESULTS" -- "$@"
}

# data and priors
run data 120 bash -c "
  '$PYTHON' preprocess_data.py --dataset Phantom --src_path '$OUT/raw' --dst_path '$OUT/d176' --phantom_cases 20 \
    --spacing 1.0 --crop_size 176 &&
  '$PYTHON' preprocess_data.py --dataset Phantom --src_path '$OUT/raw' --dst_path '$OUT/d224' --spacing 1.0 \
    --crop_size 224 &&
  '$PYTHON' preprocess_data.py --dataset Phantom --src_path '$OUT/raw80' --dst_path '$OUT/d128' --phantom_cases 80 \
    --spacing 1.0 --crop_size 128 &&
  '$PYTHON' -c 'import sys, torch
from priors import import_embeddings, save_priors
torch.manual_seed(0)
torch.save({\"modality\": torch.randn(3, 512), \"class\": torch.randn(4, 512)}, sys.argv[1] + \"/plain.pt\")
save_priors(import_embeddings(sys.argv[1] + \"/plain.pt\", \"random 512-d priors of gpu_speed.sh\"),
            sys.argv[1] + \"/priors.pt\")' '$OUT'" || { echo "no data: nothing to time"; exit 1; }
PRIORS="$OUT/priors.pt"
COMMON=(--dataset Phantom --root_path "$OUT/d176" --img_size 176 --vit_name "$VIT_NAME" --batch_size 8
        --device "$DEVICE" --amp bf16 --no_pretrain --prior_embeddings "$PRIORS" --progress 0)
SPEED=("$PYTHON" benchmarks/speed.py --vit_name "$VIT_NAME" --device "$DEVICE" --amp bf16
       --prior_embeddings "$PRIORS")

# the benchmark's timing: the baseline, then this checkout eager, so that these stand whatever compilation costs
if [ -n "$BASELINE" ]; then
  bench baseline_immseg "$BASELINE" "${COMMON[@]}" --num_workers 8
fi
bench immseg_eager "$ROOT" "${COMMON[@]}" --compile off
# this checkout's defaults: bare step, FLOPs, utilisation, loop per stage, profile (compiles first)
run speed_immseg 240 "${SPEED[@]}" --img_size 176 --batch_size 8 --compile "$COMPILE" --loop_data "$OUT/d176" \
  --profile "$OUT/profile.txt" --measure_peak --json "$OUT/speed_immseg.json"
bench immseg "$ROOT" "${COMMON[@]}" --compile "$COMPILE"
bench immseg_deterministic "$ROOT" "${COMMON[@]}" --compile "$COMPILE" --deterministic 1
if [ -n "$BASELINE" ]; then
  bench baseline_early "$BASELINE" "${COMMON[@]}" --num_workers 8 --model transunet_early
fi
bench early "$ROOT" "${COMMON[@]}" --compile "$COMPILE" --model transunet_early
# the paper's setting: batch 24 at 128 px
run speed_paper 200 "${SPEED[@]}" --img_size 128 --batch_size 24 --compile "$COMPILE" --loop_data "$OUT/d128" \
  --loop_epochs 1 --skip_inference --json "$OUT/speed_paper.json"
# the loader at 224 px, batch 24: data time per batch (loader alone) against the bare step
run loader_224 60 "$PYTHON" benchmarks/gpu_speed_steps.py loader --name loader_224 --data "$OUT/d224" \
  --img_size 224 --batch_size 24 --results "$RESULTS"
run speed_224 120 "${SPEED[@]}" --img_size 224 --batch_size 24 --compile "$COMPILE" --skip_inference --steps 5 \
  --json "$OUT/speed_224.json"
# the same method: losses of the first 200 steps, eager and compiled, deterministic
for mode in off "$COMPILE"; do
  run "trace_$mode" 150 "${SPEED[@]}" --img_size 176 --batch_size 8 --compile "$mode" --deterministic 1 \
    --loop_data "$OUT/d176" --trace_losses 200 --json "$OUT/trace_$mode.json"
done

"$PYTHON" benchmarks/gpu_speed_table.py "$OUT" | tee "$OUT/table.md"
echo "gpu_speed: $(( $(date +%s) - START )) s"
