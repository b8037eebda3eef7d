#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored via .git/info/exclude), the pure-Python wheels the GPU machine's
# image lacks (it has torch, triton, transformers, numpy, safetensors, accelerate, pytest,
# pytest-benchmark; Python 3.12; no network there). Carrying pytest as well would shadow the image's
# pytest plugins, so only these four, plus torchao for precision="fp8" (pure-Python paths; its C++
# extensions need torch >= 2.11, the image has 2.11). Carry .whl with the device call and install them first, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  diffusers open_clip_torch importlib_metadata zipp torchao==0.18.0
ls -la .whl
