#!/usr/bin/env bash
# Usage: scripts/device_wheels.sh [--list]
#
# Downloads, on a machine with PyPI, the wheels the engine, the benchmarks and tests/gpu import beyond what a GPU
# machine's image holds, into .whl/ (git-ignored), for a GPU machine that has no network. The image (Python 3.12,
# torch 2.11, triton 3.6) has torch, triton, transformers, safetensors, numpy, rich, pytest, pytest-timeout,
# hypothesis, tqdm, pyyaml, jinja2, requests, huggingface-hub, sentencepiece, tiktoken, tokenizers, pillow,
# attrs, psutil, matplotlib, httpx, anyio, prometheus-client, typing-extensions; it lacks the tokenizer
# (mistral-common) and what it needs: pydantic and its parts, jsonschema and its parts, pycountry. Pure-Python
# wheels where they exist; pydantic-core and rpds-py are manylinux builds for CPython 3.12 x86-64.
#
# Not here: llguidance (guided decoding, imported only by the server's grammar code), gguf (only when a .gguf
# file is loaded), compressed-tensors (CPU tests only), fastapi / uvicorn (the server): neither tests/gpu nor
# `mixtral bench gpu` import them. Versions: those the repo's CI resolves (pyproject.toml), pinned so the
# GPU machine runs what was tested.
#
# On the GPU machine (scripts/gpu_run.sh does this):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=src:/tmp/site
#
# --list prints the pinned requirements and exits. Environment: PYVER (default 3.12) and DEST (default .whl)
# fetch the same set for another Python into another folder (a local check of the list, not for the device).
set -euo pipefail

WHEELS=(
  mistral_common==1.13.1
  pydantic==2.14.4
  pydantic_core==2.50.5
  pydantic-extra-types==2.11.1
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0   # pydantic 2.14 needs >= 4.16; the image's may be older
  pycountry==26.2.16
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
)

if [[ "${1:-}" == "--list" ]]; then
  printf '%s\n' "${WHEELS[@]}"
  exit 0
fi
usage() { sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi
if [[ $# -gt 0 ]]; then
  usage >&2
  exit 2
fi

cd "$(dirname "$0")/.."
DEST="${DEST:-.whl}"
PYVER="${PYVER:-3.12}"
# .whl/ stays out of git (a worktree's exclude file is the common one's).
exclude="$(git rev-parse --git-common-dir 2>/dev/null)/info/exclude" || exclude=""
if [[ "$DEST" == ".whl" && -n "$exclude" ]] && ! grep -qx '/.whl/' "$exclude" 2>/dev/null; then
  mkdir -p "$(dirname "$exclude")" && echo '/.whl/' >> "$exclude"
fi
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}"
# One version of each: two wheels of one package stop the whole install on the GPU machine.
dupes="$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
if [[ -n "$dupes" ]]; then
  echo "device_wheels.sh: more than one wheel of: $dupes (remove the old ones from $DEST)" >&2
  exit 1
fi
ls -l "$DEST"
du -sh "$DEST"
