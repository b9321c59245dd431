#!/usr/bin/env bash
# Quick start 2: set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q "$@"
