#!/usr/bin/env bash
# Regenerates requirements/lock.txt with pip-tools' pip-compile (a dev extra) from setup.py's ranges (the
# extras scripts/install.sh installs) and requirements/torch-cpu.in.
#   bash scripts/lock.sh             re-resolve, keeping the pinned versions where they still fit
#   bash scripts/lock.sh --refresh   the canary: the newest versions the index serves, then a fresh venv
#                                    installed by scripts/install.sh and the whole test suite against them
# Run --refresh whenever dependencies change and at least once per piece of work. When it fails, fix the
# project or cap the version in setup.py with the reason in a comment, then run it again. Commit the lock
# only when the suite passed.
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=()
refresh=0
if [ "${1:-}" = "--refresh" ]; then upgrade=(--upgrade); refresh=1; fi
python -m piptools compile -q "${upgrade[@]}" --extra dev --extra ray --extra eval --extra serve --strip-extras \
    --no-emit-index-url --no-emit-find-links --output-file requirements/lock.txt setup.py requirements/torch-cpu.in
rm -rf lime_fast.egg-info
git --no-pager diff --stat -- requirements/lock.txt
[ "$refresh" = 1 ] || exit 0
venv=${CANARY_VENV:-$(mktemp -d)/venv}
python -m venv "$venv"
export PATH="$venv/bin:$PATH"
bash scripts/install.sh
python -m pip list --format=freeze > "$venv/../installed.txt"
echo "canary: $(python -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)')"
python -m pytest -q tests
