#!/usr/bin/env bash
# The first thing to run on a machine with GPUs: does this repository train, resume, test and run fast there?
#
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]        (default: gpu_check_output in the repository)
#
# On every GPU that PyTorch sees (CUDA_VISIBLE_DEVICES selects them), with a small phantom dataset and
# offline text priors made here, every GPU-only feature: a few epochs of train.py under torchrun (NCCL) with
# --amp bf16 and with --amp fp16 and its grad scaler (R50-only, no pretrained file, the fused stage reached), a
# run resumed from a checkpoint the first one wrote, the same checkpoint resumed under --amp fp16, --compile on
# (inductor; its first steps' compile times and no fallback), test.py on CUDA, a subset stage (train.py
# --subsets_from) on the bf16 run with test.py --sequences on a subset of the sequences and predict.py on cases
# without T2w, and benchmarks/speed.py --device cuda for R50-ViT-B_16 and R50-only (at speed.py's default
# img_size, 128).
# Every step is run even when an earlier independent one failed; the table at the end (also written to
# OUTPUT_DIR/gpu_check.md) says what passed, with seconds per step and peak GPU memory; each step's
# output is in OUTPUT_DIR/logs/. Exit status: 0 when every step passed, 1 otherwise, 2 without a GPU or
# when OUTPUT_DIR holds anything but an earlier check's output (which is replaced).
# Environment: PYTHON (interpreter; default: the active environment's python, else .venv/bin/python),
# SPEED_BATCH (speed.py training batch, default 24; halved while the card runs out of memory, skipped with the
# reason when not even batch 1 fits), SPEED_AMP (default bf16), PRIOR_EMBEDDINGS (a priors
# file made elsewhere by priors.encode, copied in instead of encoding here: for a box without the offline
# encoder's package).
set -euo pipefail

OUT=$(realpath -m "${1:-$(dirname "$0")/../gpu_check_output}")
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || [ ! -x .venv/bin/python ]; then
    PYTHON=python
  else
    PYTHON=.venv/bin/python
  fi
fi
SPEED_BATCH=${SPEED_BATCH:-24}
SPEED_AMP=${SPEED_AMP:-bf16}

if ! gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'); then
  echo "gpu_check: '$PYTHON' cannot import torch; set PYTHON to the interpreter of the environment with PyTorch" >&2
  exit 2
fi
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: no CUDA GPU is visible to PyTorch ($PYTHON, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset});" \
       "nothing was checked. Run this on a machine with NVIDIA GPUs and a CUDA build of PyTorch." >&2
  exit 2
fi

STEPS="$OUT/steps.tsv"
if [ -f "$STEPS" ]; then
  rm -rf "$OUT"  # a previous check's output: start afresh
elif [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "gpu_check: $OUT exists and is not the output of an earlier check; give a new or empty folder" >&2
  exit 2
fi
mkdir -p "$OUT/logs"
: > "$STEPS"
"$PYTHON" -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
    torch.backends.cudnn.version()); [print(f"GPU {i}: {torch.cuda.get_device_name(i)}")
    for i in range(torch.cuda.device_count())]' | tee "$OUT/logs/environment.log"

# step NAME COMMAND...: run it, log its output to logs/NAME.log, record pass or fail and its seconds.
step() {
  local name=$1 start status
  shift
  echo "== $name: $*"
  start=$(date +%s)
  if "$@" > "$OUT/logs/$name.log" 2>&1; then status=pass; else status=FAIL; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$STEPS"
  echo "   $status ($(( $(date +%s) - start )) s)"
  [ "$status" = pass ]
}

# skip NAME REASON: record a step that could not run.
skip() {
  printf '%s\tskipped (%s)\t\n' "$1" "$2" >> "$STEPS"
  echo "== $1: skipped ($2)"
}

# checkpoint_epoch PATH EPOCHS: the checkpoint exists and has completed EPOCHS epochs.
checkpoint_epoch() {
  "$PYTHON" -c 'import sys; from engine.checkpoints import load_checkpoint
state = load_checkpoint(sys.argv[1])["train_state"]; print(sys.argv[1], state)
sys.exit(state["epoch"] != int(sys.argv[2]))' "$1" "$2"
}

# Three epochs on every GPU: modality heads and contrast, then two of the fused stage (validated, best.pth).
TRAIN=(-m torch.distributed.run --standalone --nproc_per_node "$gpus" train.py --dataset Phantom
       --root_path "$OUT/data" --vit_name R50-only --no_pretrain --prior_encoder offline
       --prior_embeddings "$OUT/priors_offline_intensity.pt" --batch_size 4 --max_epochs 3
       --start_contrast_epoch 0 --region_fusion_start_epoch 1 --val_every 1 --save_every 1 --progress 0)

# train_run AMP: a run to its end, with the fused head validated.
train_run() {
  "$PYTHON" "${TRAIN[@]}" --amp "$1" --output_dir "$OUT/run_$1" && checkpoint_epoch "$OUT/run_$1/last.pth" 3 &&
    [ -f "$OUT/run_$1/best.pth" ]
}

# resume_run: the bf16 run continued from its epoch_1.pth in a new folder; logs how far its weights end up
# from the uninterrupted run's (0 when every kernel is deterministic).
resume_run() {
  "$PYTHON" "${TRAIN[@]}" --amp bf16 --output_dir "$OUT/run_bf16_resumed" --resume "$OUT/run_bf16/epoch_1.pth" &&
    checkpoint_epoch "$OUT/run_bf16_resumed/last.pth" 3 &&
    "$PYTHON" -c 'import sys; from engine.checkpoints import load_checkpoint
first, second = (load_checkpoint(path)["model"] for path in sys.argv[1:])
print("max weight difference to the uninterrupted run:",
      max((first[k].double() - second[k].double()).abs().max().item() for k in first))' \
      "$OUT/run_bf16/last.pth" "$OUT/run_bf16_resumed/last.pth"
}

data_ok=true
step data "$PYTHON" preprocess_data.py --dataset Phantom --src_path "$OUT/phantom_raw" --dst_path "$OUT/data" \
  --phantom_cases 16 --val_fraction 0.2 || data_ok=false
if [ -n "${PRIOR_EMBEDDINGS:-}" ]; then
  step priors cp "$PRIOR_EMBEDDINGS" "$OUT/priors_offline_intensity.pt" || data_ok=false
else
  step priors "$PYTHON" -m priors.encode --encoder offline --out "$OUT/priors_offline_intensity.pt" || data_ok=false
fi

for amp in bf16 fp16; do
  if $data_ok; then
    step "train_$amp" train_run "$amp" || true
  else
    skip "train_$amp" "no data or priors"
  fi
done

if [ -f "$OUT/run_bf16/epoch_1.pth" ]; then
  step resume_bf16 resume_run || true
else
  skip resume_bf16 "train_bf16 wrote no epoch_1.pth"
fi

for amp in bf16 fp16; do
  if [ -f "$OUT/run_$amp/last.pth" ]; then
    step "test_$amp" "$PYTHON" test.py --output_dir "$OUT/run_$amp" --device cuda --amp "$amp" \
      --test_save_dir "$OUT/test_$amp" --save_png || true
  else
    skip "test_$amp" "train_$amp wrote no checkpoint"
  fi
done

# amp_resume_run: the bf16 run continued from its epoch_1.pth under --amp fp16 (the grad scaler starts afresh).
amp_resume_run() {
  "$PYTHON" "${TRAIN[@]}" --amp fp16 --output_dir "$OUT/run_bf16_to_fp16" --resume "$OUT/run_bf16/epoch_1.pth" &&
    checkpoint_epoch "$OUT/run_bf16_to_fp16/last.pth" 3 &&
    grep -q "continues with --amp fp16" "$OUT/run_bf16_to_fp16/log.txt"
}

# compile_run: --compile on through the three stages (modality heads alone, + contrast, fused); the fallback to
# eager steps counts as a failure here.
compile_run() {
  "$PYTHON" "${TRAIN[@]}" --amp bf16 --compile on --start_contrast_epoch 1 --region_fusion_start_epoch 2 \
      --output_dir "$OUT/run_compile" &&
    checkpoint_epoch "$OUT/run_compile/last.pth" 3 &&
    grep "the first step of the stage" "$OUT/run_compile/log.txt" &&
    ! grep -q "torch.compile failed" "$OUT/run_compile/log.txt"
}

# predict_without_t2w_run: predict.py with the subset stage on raw cases that have no T2w file.
predict_without_t2w_run() {
  rm -rf "$OUT/raw_without_t2w" && mkdir -p "$OUT/raw_without_t2w/Raw_data" &&
    cp -r "$OUT/phantom_raw/Raw_data/bSSFP" "$OUT/phantom_raw/Raw_data/LGE" "$OUT/raw_without_t2w/Raw_data/" &&
    "$PYTHON" predict.py --input_dir "$OUT/raw_without_t2w" --output_dir "$OUT/predict_without_t2w" \
      --run "$OUT/run_bf16_subsets" --device cuda --amp bf16 --save_png &&
    grep -q "bSSFP;LGE" "$OUT/predict_without_t2w/volumes.csv"
}

# subset_stage_run: one epoch of a subset stage on the bf16 run (frozen) under torchrun, then test.py from bSSFP
# and LGE on CUDA.
subset_stage_run() {
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$gpus" train.py --subsets_from "$OUT/run_bf16" \
    --amp bf16 --max_epochs 1 --val_every 1 --progress 0 --output_dir "$OUT/run_bf16_subsets" &&
    checkpoint_epoch "$OUT/run_bf16_subsets/last.pth" 1 &&
    "$PYTHON" test.py --output_dir "$OUT/run_bf16_subsets" --device cuda --amp bf16 --sequences bSSFP,LGE \
      --test_save_dir "$OUT/test_bf16_subsets"
}

if [ -f "$OUT/run_bf16/last.pth" ]; then
  step subsets_bf16 subset_stage_run || true
else
  skip subsets_bf16 "train_bf16 wrote no checkpoint"
fi
if [ -f "$OUT/run_bf16_subsets/last.pth" ]; then
  step predict_without_t2w predict_without_t2w_run || true
else
  skip predict_without_t2w "subsets_bf16 wrote no checkpoint"
fi
if [ -f "$OUT/run_bf16/epoch_1.pth" ]; then
  step resume_bf16_to_fp16 amp_resume_run || true
else
  skip resume_bf16_to_fp16 "train_bf16 wrote no epoch_1.pth"
fi
if $data_ok; then
  step compile compile_run || true
else
  skip compile "no data or priors"
fi

# speed_run MODEL: benchmarks/speed.py at SPEED_BATCH, halved while the card runs out of memory (the attempt is
# then not a result); skipped, with the reason, when not even batch 1 fits.
speed_run() {
  local model=$1 batch=$SPEED_BATCH
  while true; do
    if step "speed_$model" "$PYTHON" benchmarks/speed.py --vit_name "$model" --device cuda --amp "$SPEED_AMP" \
        --batch_size "$batch" --json "$OUT/speed_$model.json"; then
      return 0
    fi
    grep -qi "out of memory" "$OUT/logs/speed_$model.log" || return 1
    sed -i '$d' "$STEPS"
    if [ "$batch" -le 1 ]; then
      skip "speed_$model" "out of GPU memory even at batch 1"
      return 0
    fi
    batch=$(( batch / 2 ))
    echo "   out of GPU memory: again at batch $batch"
  done
}

for model in R50-ViT-B_16 R50-only; do
  speed_run "$model" || true
done

"$PYTHON" - "$OUT" "$gpus" <<'EOF'
"""The table of the steps, with the figures each one left: seconds per step and peak GPU memory."""
import json
import re
import sys
from pathlib import Path

out, gpus = Path(sys.argv[1]), int(sys.argv[2])


def training_figures(run, step_log):
    """Seconds per iteration over the whole run (rank 0, with loading, validation and saving), peak memory."""
    log = out / run / "log.txt"
    pattern = r"([\d.]+) s per iteration.*?peak GPU memory (\d+) MiB"
    found = re.findall(pattern, log.read_text()) if log.is_file() else []
    if not found:
        return "", ""
    difference = re.findall(r"max weight difference to the uninterrupted run: (\S+)", step_log.read_text())
    note = f"; max weight difference to the uninterrupted run {float(difference[-1]):.3g}" if difference else ""
    compiled = re.findall(r"the first step of the stage .*? took ([\d.]+) s", log.read_text())
    note += f"; first steps of the stages (compiling) {', '.join(compiled)} s" if compiled else ""
    return f"{found[-1][0]} s / iteration (whole run){note}", found[-1][1]


def speed_figures(name):
    path = out / f"speed_{name}.json"
    if not path.is_file():
        return "", ""
    figures = json.loads(path.read_text())
    return (f"{figures['train_step_s']:.3f} s / training step at batch {figures['settings']['batch_size']}, "
            f"{figures['infer_slice_s'] * 1000:.2f} ms / slice",
            f"{figures.get('peak_cuda_mb', 0):.0f}")


# the run folder each training step writes
RUNS = {"train_bf16": "run_bf16", "train_fp16": "run_fp16", "resume_bf16": "run_bf16_resumed",
        "resume_bf16_to_fp16": "run_bf16_to_fp16", "compile": "run_compile", "subsets_bf16": "run_bf16_subsets"}
rows = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    figures = ("", "")
    if name in RUNS:
        figures = training_figures(RUNS[name], out / "logs" / f"{name}.log")
    elif name.startswith("speed_"):
        figures = speed_figures(name[len("speed_"):])
    rows.append((name, status, seconds, *figures))
table = [f"{gpus} GPU(s); logs in {out / 'logs'}", "",
         "| step | result | wall time (s) | seconds per step | peak GPU memory (MiB) |", "|---|---|---|---|---|"]
table += [f"| {' | '.join(row)} |" for row in rows]
(out / "gpu_check.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
sys.exit(0 if all(row[1] == "pass" for row in rows) else 1)
EOF
