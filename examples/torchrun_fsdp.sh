#!/usr/bin/env bash
# ProCon on several processes: fastprocon's own FSDP2 trainer under torchrun. (fastprocon.integrations,
# used by the other examples, runs in one process and refuses FSDP/DeepSpeed; sharded runs use this.)
#   bash examples/torchrun_fsdp.sh                   # the tiny model, 2 processes on CPU (gloo), seconds
#   bash examples/torchrun_fsdp.sh --smollm2         # SmolLM2-135M-Instruct, ProCon_wu_safe (the default config)
#   NPROC=8 bash examples/torchrun_fsdp.sh --smollm2 max_steps=200   # one node, 8 GPUs (nccl, bf16)
# Further arguments are `fastprocon train` overrides (key=value); RUN_DIR sets the run directory.
set -euo pipefail
config=tiny
overrides=()
for arg in "$@"; do
  case "$arg" in
    --smollm2) config=default ;;
    *) overrides+=("$arg") ;;
  esac
done
# the repository's venv (made by ./run.sh) when there is one; PYTHON=... picks another interpreter
VENV_PY="$(dirname "$0")/../.venv/bin/python"
if [ -z "${PYTHON:-}" ] && [ -x "$VENV_PY" ]; then PY=$VENV_PY; else PY=${PYTHON:-python3}; fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" \
  -m fastprocon.cli train --config "$config" "run_dir=${RUN_DIR:-runs/torchrun-$config}" "${overrides[@]}"
