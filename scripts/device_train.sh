#!/usr/bin/env bash
# Train the shapes model on the lent GPU in one device call and bring the checkpoint back (issue 18).
#   here, once:       bash scripts/device_wheels.sh          (wheels into .whl/, carried with the call)
#   the device call:  bash scripts/device_train.sh MINUTES [more scripts/train_shapes.py options]
#   here, after:      python scripts/train_shapes.py --assemble <files_at>/shapes --out lime_fast/data/shapes-ip2p
# The checkpoint ($OUT/shapes: fp16 safetensors shards <= 15 MiB, state.json, train.log) is rewritten
# every 2 minutes, so a call cut off by its limit still returns the last one (the card says so).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?minutes of training}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 scripts/train_shapes.py --out "${OUT:?the device tool sets OUT}/shapes" --compact --ckpt-minutes 2 \
  --device cuda --workers "${WORKERS:-12}" --minutes "$minutes" "$@"
