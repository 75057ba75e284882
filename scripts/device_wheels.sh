#!/usr/bin/env bash
# The pure-Python packages the engine needs beyond the GPU machines' image (torch, triton and transformers are
# there; nothing can be installed from an index there), saved as wheels in .whl/ for the device tool to carry.
# On the GPU machine: pip install -q --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=src:/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  mistral_common==1.13.1 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-extra-types==2.11.1 annotated-types \
  typing-inspection jsonschema==4.26.0 jsonschema-specifications referencing rpds-py typing_extensions pycountry
ls .whl
