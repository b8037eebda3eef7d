#!/usr/bin/env bash
# Installs lime_fast and everything its tests need, on a fresh machine, with no manual step, at the exact
# versions of requirements/lock.txt (what CI passed with; scripts/lock.sh regenerates it).
#  - torch: the lock's CPU build (2.13.0+cpu) unless a torch is already installed (on a GPU machine install
#    your CUDA torch first and this keeps it; an unpinned torch would pull a multi-GB CUDA build).
#  - lime_fast itself, editable, without dependencies (the lock has them all).
#  - open_clip_torch without its dependencies: only for the CLIP BPE file inside its wheel, from which
#    lime_fast builds the real CLIP tokenizer offline (tests, demo). open_clip itself is never imported.
#  - Debian's chromium + chromium-driver, when missing, for the browser test of `lime-fast serve`'s page
#    (apt-get update + install took 27 s on this machine, 2026-12-01); without root or apt-get the test
#    is skipped with a reason, and nothing else needs them.
# Into an environment that already has other versions, install with ranges instead of the lock:
# pip install -e ".[dev,ray,eval,serve]" (README, "Installing").
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check --no-input -q"
lock=requirements/lock.txt
if python -c "import torch" 2>/dev/null; then  # keep the installed torch (a CUDA build, say)
    filtered=$(mktemp)
    grep -v '^torch==' "$lock" > "$filtered"
    lock=$filtered
fi
$PIP install -r "$lock"
$PIP install --no-deps -e .
$PIP install --no-deps "open_clip_torch==3.3.0"
if ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
            || echo "install.sh: could not install chromium + chromium-driver: the browser test will be skipped" >&2
    else
        echo "install.sh: chromium + chromium-driver are missing (apt-get install chromium chromium-driver as root): the browser test will be skipped" >&2
    fi
fi
