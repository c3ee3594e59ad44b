#!/usr/bin/env bash
# How sensitive is a ProCon run to rounding-level changes of z0? Trains procon_s (|z - z0|) and
# procon_s_token_huber (Huber, delta 1) exactly as the reproduction does, but with
# z0 + 1e-5 * N(0, 1) (seed 0) in the reference cache, then evaluates refusal the same way.
# Needs a finished work directory of experiments/procon_smollm2.py.
#   bash experiments/z0_noise_check.sh [WORK=runs/procon_smollm2] [OUT=runs/z0_noise_check]
# Writes OUT/<variant>/{summary.json,refusal.json} and OUT/z0_noise_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(realpath "${1:-runs/procon_smollm2}"); OUT=$(realpath -m "${2:-runs/z0_noise_check}")
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
fp() { "$PY" -c "import sys, torch; torch.set_num_threads(1); from fastprocon.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
"$PY" - "$W/reference/gsm8k.safetensors" "$OUT/gsm8k_noisy.safetensors" <<'PY'
import sys, torch
from fastprocon.io import read_safetensors, save_safetensors
from fastprocon.reference import FORMAT
tensors, header = read_safetensors(sys.argv[1], FORMAT)
noise = torch.randn(tensors["z0"].shape, generator=torch.Generator().manual_seed(0), dtype=tensors["z0"].dtype)
tensors["z0"] = tensors["z0"] + 1e-5 * noise
save_safetensors(sys.argv[2], tensors, FORMAT, header)
PY
for v in procon_s procon_s_token_huber; do
  extra=(); [ "$v" = procon_s_token_huber ] && extra=(reduction=token norm=huber delta=1.0)
  fp train --config experiments/configs/ift.toml device=cpu run_dir="$OUT/$v" spec="$W/runs/align/model" \
    train="$W/data/gsm8k_train.json" safety="$W/data/ift_safety.json" safety_samples=0 \
    directions="$W/directions/directions.safetensors" reference_cache="$OUT/gsm8k_noisy.safetensors" \
    max_length=160 name="$v" schedule=constant alpha=0.1 "${extra[@]}"
  fp eval-refusal --model "$OUT/$v/model" --device cpu --harmful "$W/data/eval_harmful.json" \
    --harmless "$W/data/eval_harmless.json" --max-new-tokens 48 --batch-size 16 --out "$OUT/$v/refusal.json"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); rows = {}
for v in ("procon_s", "procon_s_token_huber"):
    m = json.loads((out / v / "refusal.json").read_text())["metrics"]
    s = json.loads((out / v / "summary.json").read_text())
    rows[v] = {"asr": m["attack_success_rate"], "over_refusal": m["over_refusal_rate"],
               "first_ce": s["first_ce"], "last_ce": s["last_ce"]}
(out / "z0_noise_check.json").write_text(json.dumps({"z0_noise": "1e-5 * N(0,1), seed 0", "runs": rows}, indent=1))
print(json.dumps(rows, indent=1))
PY
