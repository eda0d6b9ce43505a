#!/usr/bin/env bash
# Produces golfquant/assets/model.pt, the bundled model: the `tiny` preset (4x320, MHA, seq 256) trained on the
# bundled dataset (golfquant/assets/fineweb_*.bin, tokenizer.model) with one CPU thread, matrices stored in bf16.
# Deterministic given the data and the torch build. About 10 minutes on an idle core; prints val_bpb, tokens/s
# and the file size on its last line. Extra arguments go to `train` (e.g. --set steps=10 for a smoke test,
# -o /tmp/m.pt to leave the bundled file alone).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OMP_NUM_THREADS=1 "$PY" -m golfquant_cli.train_cmd --preset tiny --threads 1 -o golfquant/assets/model.pt "$@"
