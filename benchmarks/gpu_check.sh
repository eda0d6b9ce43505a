#!/usr/bin/env bash
# The one prepared GPU check (see benchmarks/gpu_check.py): run from the repository root on a machine with one
# CUDA GPU and golfquant's requirements installed; writes benchmarks/gpu_<device>.json. About 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/benchmarks:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py
