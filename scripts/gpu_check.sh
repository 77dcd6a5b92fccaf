#!/usr/bin/env bash
# GPU check (README, "GPU check"): needs python with torch + transformers; pytest and trl are used when present.
# Usage: bash scripts/gpu_check.sh [--cpu] [--steps N] [--batch N] [--peak-tflops X] [--skip-unit-tests] [--out F]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
