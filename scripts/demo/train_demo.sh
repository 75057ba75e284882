#!/usr/bin/env bash
# Train the bundled demo model (docs/DEMO_MODEL.md) in two stages, each one `mixtral train` run.
#   scripts/demo/train_demo.sh 1 DATA1 OUT1 [extra flags]   # from random weights (scripts/demo/demo_model_config.json)
#   scripts/demo/train_demo.sh 2 DATA2 OUT2 OUT1/model       # continue from stage 1 on the stage-2 data
# DATA: a packed dataset from `scripts/demo/make_demo_data.py ... --pack FILE --seq-len 1024` (or .jsonl files).
# Runs `mixtral train` as a module so it works where the package is only on PYTHONPATH (the GPU machine).
set -euo pipefail
stage=$1 data=$2 out=$3
shift 3
common=(--data "$data" --output-dir "$out" --seq-len 1024 --batch-size 32 --max-steps 6000
        --time-limit-minutes 5.5 --weight-decay 0.1 --grad-clip 1.0 --z-loss-coef 1e-3 --eval-fraction 0.02
        --eval-every 500 --log-every 100 --save-dtype bfloat16 --max-shard-mb 15)
case $stage in
  1) exec python3 -m mixtral.cli.train --model-config scripts/demo/demo_model_config.json "${common[@]}" \
       --lr 2e-3 --warmup-steps 100 --min-lr-ratio 0.05 --seed 0 "$@" ;;
  2) base=$1
     shift
     exec python3 -m mixtral.cli.train --model "$base" "${common[@]}" \
       --lr 1e-3 --warmup-steps 50 --min-lr-ratio 0.05 --seed 1 "$@" ;;
  *) echo "stage must be 1 or 2, got $stage" >&2; exit 2 ;;
esac
