#!/usr/bin/env bash
# One H200 call (~10 min) that settles the 2048-token prefill tile inside 32-layer 8x7B prefills and then runs
# the full benchmark with the table it leaves. Here first: bash scripts/device_wheels.sh. Then, through the
# device tool with carry [".whl"] and needs_h200: MIXTRAL_COMMIT=<sha> bash scripts/device_h200_prefill.sh
# Writes under $OUT: tiles_2048_h200.{json,log}, table_used_h200.json (copy it back into
# src/mixtral/kernels/triton/configs/: the device works on a copy of the tree), bench_h200.{json,log,png}.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
: "${OUT:?set OUT to the folder the results go to}"
pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
table=src/mixtral/kernels/triton/configs/sorted_E8_F14336_D4096_NVIDIA_H200.json
# The device gets the tree without .git: pass MIXTRAL_COMMIT=<sha> in the command.
commit=${MIXTRAL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
timeout 330 python3 scripts/gpu_prefill_tiles.py --layers 32 --length 2048 \
  --candidates bench_results/s14/joint_2048_h200.json --rounds 10 --adopt --json "$OUT/tiles_2048_h200.json" \
  2>&1 | tee "$OUT/tiles_2048_h200.log"
cp "$table" "$OUT/table_used_h200.json"
left=$((585 - $(date +%s) + start))  # the device tool stops a call at 600 s; the bench gets what is left
echo "seconds left for the bench: $left"
# The peers come last in the bench, so a run cut short still has our figures in the log.
MIXTRAL_COMMIT="$commit+tiles" timeout "$left" python3 -m mixtral.cli.main bench gpu --model mixtral-8x7b \
  --batch-sizes 1,8,32,64,128 --offline 128:128,1000:1000 --offline-requests 128 --peer hf,compiled \
  --peer-batch-sizes 1 --json "$OUT/bench_h200.json" --plot "$OUT/bench_h200.png" 2>&1 | tee "$OUT/bench_h200.log"
