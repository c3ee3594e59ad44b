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
import shutil, sys, torch
from pathlib import Path
from fastprocon.utils.mapped import ChunkWriter, to_torch
from fastprocon.procon.reference_files import SHARD_FORMAT, Z0Files, shard_path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
files = Z0Files(src)
world, gen = len(files.shards), torch.Generator().manual_seed(0)
for r, shard in enumerate(files.shards):   # z0 is token-major [n_tokens, n_layers]: noise drawn [n_layers, n_tokens]
    z0 = to_torch(shard.array("z0"), shard.tag("z0"))
    noise = torch.randn(z0.T.shape, generator=gen, dtype=z0.dtype).T
    with ChunkWriter(shard_path(dst, r, world)) as out:
        out.append("z0", z0 + 1e-5 * noise)
        for name in ("offsets", "id_bytes", "id_offsets"):
            out.append(name, shard.array(name))
        out.finish(SHARD_FORMAT, shard.header)
shutil.copy(src, dst)
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
