#!/usr/bin/env bash
# Quick start 1: set up, then run the main job on the embedded default (local Ray, synthetic data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# outputs in runs/main of this checkout (a bare `pipeline run` writes under $PIPELINE_RUNS, pipeline/paths.py)
exec .venv/bin/python -m pipeline run --workdir runs/main "$@"
