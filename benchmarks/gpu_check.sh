#!/usr/bin/env bash
# One prepared check for a CUDA machine, runnable again unchanged whenever a GPU is available:
#   1. the GPU tests (tests/gpu/test_gpu.py): the kernels on CUDA with compiled Triton (the
#      interpreter is off) and the trainer's CUDA path (FSDP2 on nccl, bf16, resume); then the API
#      error tests (tests/penalty/test_penalty_errors.py);
#   2. bench_penalty.py at GPU sizes; 3. bench_train.py on random-init Llama-3 shapes (bf16), then
#      bench_train.py --setups: padded vs packed vs chunked CE vs compiled layers vs all three, each
#      with ProCon off and on, at a Llama-3-8B shape (4 layers, bf16, samples of 256-2048 tokens):
#      real tokens/s, padding fraction, peak memory, MFU (real tokens, attention per sample);
#   4. bench_ops.py: operators and kernel launches ProCon adds per constrained layer to one training
#      micro-step (tiny, SmolLM2-135M shapes); bench_train.py --host: the training thread's host
#      time per step outside forward + backward, batches made on it vs by the prefetch thread;
#   5. bench_load_gpu.py --export: a Llama-3-8B-shaped model at full depth loaded through the sharded
#      path, then exported the trainer's way (sharded DCP write + consolidation into HF files): peak
#      GPU and host memory of the process during each;
#   6. figures and README_perf.md (report.py); a short summary is printed last.
# Output, in $OUT (default benchmarks/results/): penalty_<card>.csv, train_<card>.csv,
# setups_<card>.csv, their three PNGs, ops_<card>.csv, host_<card>.csv, load8b_<card>.csv,
# export8b_<card>.csv, README_perf.md and gpu_check.log: twelve files. Installs and downloads nothing (needs torch,
# triton, transformers, tqdm; pytest for the tests, matplotlib for the figures) and needs no
# model weights. Each stage has a time limit; together they stay under 9.5 minutes (the device tool
# allows 10 minutes a command), with the most important figures first.
#     bash benchmarks/gpu_check.sh             # or: OUT=/some/dir PYTHON=python3 bash benchmarks/gpu_check.sh
# FASTPROCON_GPU_CHECK_SMOKE=1 runs the same stages at toy sizes, also without a GPU (to test this script),
# into a new temporary directory unless OUT is set.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=${FASTPROCON_GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then OUT=${OUT:-$(mktemp -d)}; fi   # toy numbers never overwrite the committed results
OUT=${OUT:-$REPO/benchmarks/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac   # a path stays valid after cd
: > "$LOG"
unset TRITON_INTERPRET
export TQDM_DISABLE=1            # progress bars would flood the log

# fastprocon without installing it: fastprocon/kernels links to the top-level kernels/ folder, and
# kernels/ is no regular package, so the repository on sys.path never hides an installed `kernels`.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

NAMES=()
declare -A STATUS
stage() {   # stage NAME SECONDS COMMAND...: run under a time limit, log it, record how it ended
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  NAMES+=("$name")
  echo "=== $name: $*" | tee -a "$LOG"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|130|137) STATUS[$name]="TIMED OUT (limit ${limit} s)" ;;
    *) STATUS[$name]="FAILED (exit $rc)" ;;
  esac
  echo "=== $name: ${STATUS[$name]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}
skip() { NAMES+=("$1"); STATUS[$1]="SKIPPED: $2"; echo "=== $1: ${STATUS[$1]}" | tee -a "$LOG"; }

ENV_REPORT=$("$PY" - "$REPO" <<'EOF'
import importlib.util, sys
import torch, triton, transformers
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import harness
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; "
      f"device: {torch.cuda.get_device_name() if cuda else 'no CUDA'}")
missing = [m for m in ("pytest", "matplotlib") if importlib.util.find_spec(m) is None]
print("missing:", " ".join(missing) or "nothing")
print("TAG", harness.device_tag(harness.resolve_device("auto")))
EOF
)
echo "$ENV_REPORT" | tee -a "$LOG"
TAG=$(echo "$ENV_REPORT" | sed -n 's/^TAG //p')
if [ -z "$TAG" ]; then echo "cannot import torch/triton/transformers with $PY" | tee -a "$LOG"; exit 1; fi
if [ "$TAG" = cpu ] && [ "$SMOKE" != 1 ]; then
  echo "no CUDA device: this script measures a GPU (FASTPROCON_GPU_CHECK_SMOKE=1 runs it at toy sizes)" | tee -a "$LOG"
  exit 1
fi
if [ "$SMOKE" = 1 ]; then
  PENALTY_ARGS=(--preset smoke --time-budget-s 60)
  TRAIN_ARGS=(--models tiny --batch 2 --seq 32 --warmup 1 --rounds 2)
  LOAD_ARGS=(--toy --export); LOAD_LIMIT=120
  OPS_ARGS=(--models tiny --seq 16 --layouts padded)
  HOST_ARGS=(--pairs 1 --host-steps 2 --set max_steps=4); SMALL_LIMIT=150   # 2 CPU cores: model builds take the time
  # no "compiled"/"all" here: inductor's C++ build on a CPU would take minutes
  SETUPS_ARGS=(--setups padded packed chunked --models tiny --batch 4 --micro-batch 2 --seq 32 --seq-min 8 --steps 1)
else
  PENALTY_ARGS=(--preset gpu --time-budget-s 45)        # shapes not started by 45 s are skipped
  TRAIN_ARGS=(--models llama3-8b:4 llama3.2-1b --dtype bf16 --batch 4 --seq 2048)
  # the load (~16 GB written, then read) and the export (~16 GB of pieces, then ~16 GB consolidated)
  # get what the stages before left of the 9.5 minutes (at least the 90 s the load alone had)
  LOAD_ARGS=(--export); LOAD_LIMIT=0
  OPS_ARGS=(--models tiny smollm2-135m)
  HOST_ARGS=(--pairs 5 --host-steps 6); SMALL_LIMIT=40
  SETUPS_ARGS=(--setups padded packed chunked compiled all --models llama3-8b:4 --dtype bf16 --batch 8
               --micro-batch 4 --seq 2048 --seq-min 256 --steps 2)
fi

if echo "$ENV_REPORT" | grep -q '^missing:.*pytest'; then
  skip "GPU tests (kernels, trainer)" "pytest is not installed"
else
  stage "GPU tests (kernels, trainer)" 105 \
    env TRITON_INTERPRET=0 FASTPROCON_GPU_TESTS=1 "$PY" -m pytest "$REPO/tests/gpu" -q --maxfail=5 -p no:cacheprovider \
      --durations=5
  # -k: the interpreted-kernel case belongs to the CPU suite (and Triton 3.6's interpreter fails
  # under NumPy >= 2.4); tests/gpu runs its CUDA counterpart.
  stage "API error tests" 25 "$PY" -m pytest "$REPO/tests/penalty/test_penalty_errors.py" -q -p no:cacheprovider \
    -k "not interpreted"
fi
stage bench_penalty 75 "$PY" "$REPO/benchmarks/bench_penalty.py" "${PENALTY_ARGS[@]}" --out "$OUT/penalty_$TAG.csv"
stage bench_train 70 "$PY" "$REPO/benchmarks/bench_train.py" "${TRAIN_ARGS[@]}" --out "$OUT/train_$TAG.csv"
stage "bench_train setups" 110 "$PY" "$REPO/benchmarks/bench_train.py" "${SETUPS_ARGS[@]}" \
  --out "$OUT/setups_$TAG.csv"
stage bench_ops "$SMALL_LIMIT" "$PY" "$REPO/benchmarks/bench_ops.py" "${OPS_ARGS[@]}" --out "$OUT/ops_$TAG.csv"
HOST_RUN=$(mktemp -d)   # the tiny run's directions and z0 cache: scratch, not results
stage "host time per step" "$SMALL_LIMIT" "$PY" "$REPO/benchmarks/bench_train.py" --host tiny "${HOST_ARGS[@]}" \
  --run-dir "$HOST_RUN" --out "$OUT/host_$TAG.csv"
rm -rf "$HOST_RUN"
# a Llama-3-8B-shaped random model at full depth (16 GB of bf16 safetensors, written to scratch on the
# device machine's disk and removed after) loaded through the sharded path: peak GPU memory vs the bf16 size;
# then its sharded export (the input files are removed first: the disk holds 64 GiB)
if [ "$LOAD_LIMIT" = 0 ]; then
  LOAD_LIMIT=$((545 - SECONDS)); [ "$LOAD_LIMIT" -lt 90 ] && LOAD_LIMIT=90; [ "$LOAD_LIMIT" -gt 200 ] && LOAD_LIMIT=200
fi
stage "load_8b + export" "$LOAD_LIMIT" "$PY" "$REPO/benchmarks/bench_load_gpu.py" "${LOAD_ARGS[@]}" \
  --out "$OUT/load8b_$TAG.csv" --export-out "$OUT/export8b_$TAG.csv"
stage report 25 "$PY" "$REPO/benchmarks/report.py" --results "$OUT"

{
  echo
  echo "=================== gpu_check summary ($TAG) ==================="
  for name in "${NAMES[@]}"; do printf '%-40s %s\n' "$name" "${STATUS[$name]}"; done
  echo "--- measured against the targets (from $OUT) ---"
  "$PY" "$REPO/benchmarks/report.py" --results "$OUT" --headline 2>&1
} | tee -a "$LOG"
for name in "${NAMES[@]}"; do [ "${STATUS[$name]}" = ok ] || exit 1; done
