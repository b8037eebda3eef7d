#!/usr/bin/env bash
# The GPU check in one device call (see CONTRIBUTING.md, "The GPU check").
#   here, once:       bash scripts/device_wheels.sh          (wheels into .whl/, carried with the call)
#   the device call:  bash scripts/device_check.sh PLAN SECONDS   (carry .whl; PLAN: first, second, compiled, all)
# Writes into $OUT: device_check.md (the report), device_check.json (every step's lines and the profile,
# rewritten after each step, so a call cut short keeps what finished), device_check.log (full output).
set -euo pipefail
cd "$(dirname "$0")/.."
plan=${1:-first}
budget=${2:-440}
out=${OUT:?the device tool sets OUT}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/nvidia-smi.txt" || true
python3 benchmarks/device_check.py --plan "$plan" --budget "$budget" --out "$out/device_check.md" \
  --json "$out/device_check.json" --log "$out/device_check.log"
