#!/usr/bin/env bash
# Usage: scripts/gpu_run.sh tests [PYTEST_ARGS...]
#        scripts/gpu_run.sh bench [fp8_full] [int4_8x22b] [bf16_fp8_16l] [int4_8x7b]
#        scripts/gpu_run.sh check
#
# The GPU run: the GPU test suite and the benchmarks, on one H100 80GB (or an H200), in two commands of under
# 10 minutes each. Before, on a machine with PyPI, from the repo root: `bash scripts/device_wheels.sh` (fills
# .whl/, git-ignored); copy .whl/ along with the tree to a GPU machine without network. There, from the repo root:
#
#   1  MIXTRAL_COMMIT=<commit> bash scripts/gpu_run.sh tests    about 7-8 minutes
#   2  MIXTRAL_COMMIT=<commit> bash scripts/gpu_run.sh bench    about 8-9 minutes
#
# tests: `python3 -m pytest -m gpu` over every tests/gpu file, the costly and most telling first (a run cut short
#   loses the tail, not the quantized model or the kernels): quantized model, FP8 kernels, int kernels, engine,
#   MoE, attention, small ops, PDL, prefill graphs, routing, then any file not named here. Estimated on one H100,
#   mostly Triton compiles on a fresh machine: quantized model ~60 s (the 8x7B presets generated in fp8 and
#   int4), fp8 kernels ~60 s, int kernels ~80 s, engine ~120 s (16 engine runs), MoE ~90 s (8x22B experts,
#   every tile-table entry), attention ~40 s, small ops / PDL / prefill graphs / routing ~40 s together. With
#   fewer than 2 GPUs the multi-GPU tests are deselected (marked gpus(2) or gpus(4): tests/gpu/conftest.py).
#   Each test has a 300 s limit (pytest-timeout); the whole run stops at RUN_BUDGET_S (SIGINT: pytest writes
#   its summary and the junit file). PYTEST_ARGS replace the file list: `gpu_run.sh tests tests/gpu/test_gpu_moe.py
#   -k decode`. Out: gpu_tests.log (with the time per file at the end) and gpu_junit.xml.
# bench: `mixtral bench gpu` four times, each under its own time limit, the JSON rewritten after every figure:
#   fp8_full      the full 32-layer Mixtral-8x7B, -q none,fp8: on an H100 bf16 is reported as not fitting;
#                 decode at batch 1-256, prefill 2048 (back to back and after 2 s idle), offline 128/128 x 2048
#                 requests with 512 running (~3 min; on an H200 bf16 runs too: ~5 min)
#   int4_8x22b    Mixtral-8x22B in int4, all 56 layers, batch 1, prefill 2048 (~1.5 min)
#   bf16_fp8_16l  8x7B cut to 16 layers (bf16 fits), -q none,fp8 side by side: decode 1-256, prefill,
#                 offline 128/128 x 1024 (~2.5 min; skipped on an H200, where fp8_full has bf16 beside it)
#   int4_8x7b     8x7B in int4: batch 1 and 64, prefill 2048 (~1 min)
#   int4_8x22b_64k  (only when named; an H200) 8x22B int4 with a 65,000-token prompt: its prefill time, then
#                 decode at batch 1 after a 64,000-token context (~3 min)
#   Out: bench.log, bench_<name>.json (4), bench_fp8_full.png, bench_bf16_fp8_16l.png: at most 7 files.
# check: install the wheels and import what the engine needs; nothing else.
#
# Environment: OUT (the results folder, default ./gpu_out), MIXTRAL_COMMIT (the commit the figures are
# recorded against; default: git's, where the tree has .git), RUN_BUDGET_S (seconds this script may run,
# default 570), WHEELS (default .whl). GPU_RUN_DRY=1 prints the commands instead of running them (no GPU
# needed; GPU_RUN_GPUS and GPU_RUN_GIB stand for the GPU count and memory).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; }
MODE="${1:-}"
case "$MODE" in
  tests|bench|check) shift ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

START=$(date +%s)
DEADLINE=$((START + ${RUN_BUDGET_S:-570}))
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/$([[ $MODE == tests ]] && echo gpu_tests.log || echo bench.log)"
export PYTHONUNBUFFERED=1
export MIXTRAL_COMMIT="${MIXTRAL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
left() { echo $((DEADLINE - $(date +%s))); }
say() { echo "$*" | tee -a "$LOG"; }

# ----------------------------------------------------------------- setup: wheels, environment, imports
DRY="${GPU_RUN_DRY:-0}"
run() {  # run CMD...: the command, or in a dry run its words on one line
  if [[ $DRY == 1 ]]; then echo "DRY: $(printf '%q ' "$@")"; else "$@"; fi
}
WHEELS="${WHEELS:-.whl}"
if [[ $DRY == 1 ]]; then
  :
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl 2>&1 | tee -a "$LOG" || { say "gpu_run.sh: installing $WHEELS failed"; exit 1; }
  export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "gpu_run.sh: no wheels in $WHEELS (run scripts/device_wheels.sh here and carry .whl); using what is installed"
  export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
fi
say "== gpu_run.sh $MODE  commit $MIXTRAL_COMMIT  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
[[ $DRY == 1 ]] || {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>&1
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee -a "$LOG"
if [[ $DRY != 1 ]] && ! python3 -c "import mixtral.engine.llm_engine, mixtral.checkpoint.loader, mixtral.quant.fp8, mixtral.quant.int4, mixtral.tokenizer, mistral_common" 2>&1 | tee -a "$LOG"; then
  say "gpu_run.sh: the engine does not import (a missing wheel? see scripts/device_wheels.sh)"
  exit 1
fi
GPUS="${GPU_RUN_GPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}"
GPU_GIB="${GPU_RUN_GIB:-$(python3 -c "import torch; print(torch.cuda.mem_get_info(0)[1] >> 30 if torch.cuda.is_available() else 0)")}"
[[ $MODE == check ]] && { say "gpu_run.sh: ready ($GPUS GPU(s), ${GPU_GIB} GiB each)"; exit 0; }
if (( GPUS < 1 )); then
  say "gpu_run.sh: no CUDA GPU"
  exit 1
fi

# ----------------------------------------------------------------- tests
run_tests() {
  local order=(test_quantized_model_gpu.py test_fp8_kernels.py test_int_kernels.py test_gpu_engine.py test_gpu_moe.py
               test_gpu_attention.py test_gpu_small_ops.py test_gpu_pdl.py test_gpu_prefill_graphs.py
               test_gpu_routing.py)
  local targets=() extra=()
  if (( $# )); then
    targets=("$@")
  else
    for f in "${order[@]}"; do [[ -f tests/gpu/$f ]] && targets+=("tests/gpu/$f"); done
    for f in tests/gpu/test_*.py; do
      local name; name=$(basename "$f")
      [[ " ${order[*]} test_distributed_gpu.py " == *" $name "* ]] || targets+=("$f")
    done
    # Last: the multi-GPU tests (marked gpus(n)); tests/gpu/conftest.py deselects those this machine cannot run.
    targets+=(tests/gpu/test_distributed_gpu.py)
    (( GPUS < 2 )) && say "gpu_run.sh: 1 GPU: the tests marked gpus(2) / gpus(4) are deselected (conftest lists them)"
  fi
  local limit; limit=$(( $(left) - 15 ))
  (( limit < 60 )) && { say "gpu_run.sh: only ${limit} s left for the tests"; return 1; }
  say "== pytest -m gpu (at most ${limit} s): ${targets[*]} ${extra[*]+${extra[*]}}"
  run timeout -s INT -k 20 "$limit" python3 -m pytest -m gpu -p no:cacheprovider --timeout=300 -q -rfE \
    --durations=40 --junitxml="$OUT/gpu_junit.xml" "${targets[@]}" ${extra[@]+"${extra[@]}"} 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [[ $DRY == 1 ]] && return "$rc"
  python3 - "$OUT/gpu_junit.xml" <<'EOF' 2>&1 | tee -a "$LOG"
import collections, sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError) as exc:
    sys.exit(f"no junit results: {exc}")
per_file = collections.defaultdict(lambda: [0.0, 0, 0])
for c in cases:  # classname: tests.gpu.test_x (or tests.gpu.test_x.TestClass)
    parts = c.get("classname", "?").split(".")
    row = per_file[next((p for p in parts if p.startswith("test_")), parts[-1])]
    row[0] += float(c.get("time", 0))
    row[1] += 1
    row[2] += any(ch.tag in ("failure", "error") for ch in c)
print("== seconds per file (tests, failed)")
for name, (secs, n, bad) in sorted(per_file.items(), key=lambda kv: -kv[1][0]):
    print(f"{secs:8.1f}  {name}  ({n} tests, {bad} failed)")
print(f"{sum(r[0] for r in per_file.values()):8.1f}  total")
EOF
  say "== pytest exit $rc after $(( $(date +%s) - START )) s"
  return "$rc"
}

# ----------------------------------------------------------------- benchmarks
bench() {  # bench NAME CAP_SECONDS FLAGS...: one `mixtral bench gpu` under min(CAP, time left)
  local name=$1 cap=$2; shift 2
  local limit; limit=$(left)
  (( limit > cap )) && limit=$cap
  if (( limit < 45 )); then
    say "== $name: skipped, ${limit} s left"
    return 0
  fi
  say "== $name (at most ${limit} s): mixtral bench gpu $* --json $OUT/bench_$name.json"
  local t0; t0=$(date +%s)
  run timeout -s INT -k 30 "$limit" python3 -m mixtral.cli.main bench gpu "$@" --json "$OUT/bench_$name.json" \
    2>&1 | tee -a "$LOG"
  say "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
}

run_bench() {
  local want=("$@") explicit=$#
  (( ${#want[@]} )) || want=(fp8_full int4_8x22b bf16_fp8_16l int4_8x7b)
  local big=0
  (( GPU_GIB > 100 )) && big=1  # an H200: the full bf16 8x7B fits beside fp8
  for name in "${want[@]}"; do
    case "$name" in
      fp8_full)
        bench fp8_full $(( big ? 330 : 210 )) --model mixtral-8x7b -q none,fp8 --batch-sizes 1,8,32,64,128,256 \
          --offline 128:128 --offline-requests 2048 --max-num-seqs 512 --plot "$OUT/bench_fp8_full.png" ;;
      int4_8x22b)
        bench int4_8x22b 130 --model mixtral-8x22b -q int4 --batch-sizes 1 --max-num-seqs 8 --offline '' \
          --prefill-rest 0 --gpu-memory-utilization 0.95 ;;
      bf16_fp8_16l)
        if (( big && ! explicit )); then
          say "== bf16_fp8_16l: skipped on this ${GPU_GIB} GiB GPU (fp8_full ran bf16 and fp8 in full)"
          continue
        fi
        bench bf16_fp8_16l 180 --model mixtral-8x7b --layers 16 -q none,fp8 --batch-sizes 1,8,64,256 \
          --max-num-seqs 256 --offline 128:128 --offline-requests 1024 --prefill-rest 0 \
          --plot "$OUT/bench_bf16_fp8_16l.png" ;;
      int4_8x22b_64k)
        bench int4_8x22b_64k 240 --model mixtral-8x22b -q int4 --batch-sizes 1 --context 64000 --decode-steps 32 \
          --prefill-len 65000 --prefill-rest 0 --offline '' --max-num-seqs 4 --gpu-memory-utilization 0.95 ;;
      int4_8x7b)
        bench int4_8x7b 100 --model mixtral-8x7b -q int4 --batch-sizes 1,64 --max-num-seqs 64 --offline '' \
          --prefill-rest 0 ;;
      *) say "gpu_run.sh: unknown bench $name"; return 2 ;;
    esac
  done
  [[ $DRY == 1 ]] && return 0
  # The tables again, together, so the end of the output holds every figure.
  python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")):
    data = json.loads(path.read_text())
    print(f"\n## {path.stem}: {data['model']} on {data['device']}, commit {data['commit']}, "
          f"copy {data['copy_bandwidth_GBs']:.0f} GB/s\n{data.get('table_markdown', '(no table)')}")
    for label, res in data["schemes"].items():
        if res.get("status") != "ok":
            print(f"{label}: {res.get('status')}: {res.get('error', '')}")
EOF
  say "== bench done after $(( $(date +%s) - START )) s"
}

if [[ $MODE == tests ]]; then
  run_tests "$@"
else
  run_bench "$@"
fi
