#!/usr/bin/env bash
# Installs lime_fast and everything its tests need, on a fresh machine, with no manual step.
#  - torch: the CPU build 2.13.0 unless a torch is already installed (an unpinned torch would pull a
#    multi-GB CUDA build; on a GPU machine install your CUDA torch first and this keeps it).
#  - open_clip_torch without its dependencies: only for the CLIP BPE file inside its wheel, from which
#    lime_fast builds the real CLIP tokenizer offline (tests, demo). open_clip itself is never imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check --no-input -q"
python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
$PIP install -e ".[dev,ray,eval]"
$PIP install --no-deps "open_clip_torch==3.3.0"
