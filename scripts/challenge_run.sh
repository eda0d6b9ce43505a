#!/usr/bin/env bash
# The Parameter Golf pipeline on one 8xH100 node, end to end:
#   1. train the baseline (9x512 sp1024) with torchrun DDP under the 600 s training cap -> final_model.pt
#   2. GPTQ-quantize it (self-generated calibration) to fit the 16,000,000-byte budget, code included
#   3. size report, 4. round-trip val_bpb of the dequantized artifact,
# then print the challenge's log lines (val_bpb, Total submission size ... bytes).
#
# Every path and knob is an environment variable (defaults in brackets):
#   DATA [./data/datasets/fineweb10B_sp1024]   fineweb_train_*.bin, fineweb_val_*.bin
#   TOKENIZER [DATA/tokenizer.model, else ./data/tokenizers/fineweb_1024_bpe.model]
#   CODE [train_gpt.py]   the code file whose bytes count toward the cap
#   OUT [./golfquant_run]  where final_model.pt, the artifact and the JSON reports go
#   NPROC [8]  WALLCLOCK [600]  BUDGET [16000000]  CALIB_SEQS [64]
#     NPROC: any process count that divides the 512 sequences of a step (1, 2, 4, 8, 16, ...); the global batch
#     stays the baseline's 524,288 tokens, as 8 micro-batches shared by the processes (or split, on 16 or more)
#   PYTHON [python]  GOLFQUANT [golfquant]
#   TRAIN_ARGS  extra `golfquant train` flags, e.g. "--ema 0.997 --qat mlp=int6,attn=int6"
#   QUANT_ARGS  extra `golfquant quantize` flags, e.g. "--clip sdclip --embed int8"
# With --budget, quantize allocates widths per tensor unless a role's flag is given: after QAT, pin the trained
# grid, e.g. TRAIN_ARGS="--qat mlp=int6,attn=int6 --qat-clip sdclip" QUANT_ARGS="--mlp int6 --attn int6 --clip sdclip".
set -euo pipefail

DATA=${DATA:-./data/datasets/fineweb10B_sp1024}
if [[ -z "${TOKENIZER:-}" ]]; then
  if [[ -f "$DATA/tokenizer.model" ]]; then TOKENIZER="$DATA/tokenizer.model"
  else TOKENIZER=./data/tokenizers/fineweb_1024_bpe.model; fi
fi
CODE=${CODE:-train_gpt.py}
OUT=${OUT:-./golfquant_run}
NPROC=${NPROC:-8}
WALLCLOCK=${WALLCLOCK:-600}
BUDGET=${BUDGET:-16000000}
CALIB_SEQS=${CALIB_SEQS:-64}
PYTHON=${PYTHON:-python}
GOLFQUANT=${GOLFQUANT:-golfquant}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a QUANT_EXTRA <<< "${QUANT_ARGS:-}"

fail() { echo "challenge_run: $*" >&2; exit 2; }
compgen -G "$DATA/fineweb_train_*.bin" > /dev/null || fail "no $DATA/fineweb_train_*.bin (set DATA)"
compgen -G "$DATA/fineweb_val_*.bin" > /dev/null || fail "no $DATA/fineweb_val_*.bin (set DATA)"
[[ -f "$TOKENIZER" ]] || fail "tokenizer $TOKENIZER not found (set TOKENIZER)"
[[ -f "$CODE" ]] || fail "code file $CODE not found (set CODE to the train_gpt.py you submit)"
mkdir -p "$OUT"
MODEL="$OUT/final_model.pt"
ARTIFACT="$OUT/final_model.gqa"

# JSON field of a report: json_field FILE KEY [KEY ...]
json_field() {
  "$PYTHON" - "$@" <<'PY'
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    value = value[key]
print(value)
PY
}

echo "== train: $NPROC processes, cap ${WALLCLOCK}s"
torchrun --standalone --nproc_per_node="$NPROC" -m golfquant_cli.main train --preset baseline \
  --data "$DATA" --tokenizer "$TOKENIZER" --max-wallclock "$WALLCLOCK" -o "$MODEL" "${TRAIN_EXTRA[@]}"
echo "Serialized model: $(stat -c %s "$MODEL") bytes"

echo "== quantize: GPTQ, self-generated calibration, budget $BUDGET bytes"
"$GOLFQUANT" quantize "$MODEL" -o "$ARTIFACT" --method gptq --calib selfgen --calib-seqs "$CALIB_SEQS" \
  --budget "$BUDGET" --code "$CODE" "${QUANT_EXTRA[@]}"

echo "== size report"
"$GOLFQUANT" size-report "$ARTIFACT" --code "$CODE" --budget "$BUDGET"
"$GOLFQUANT" size-report "$ARTIFACT" --code "$CODE" --budget "$BUDGET" --no-entropy --json > "$OUT/size_report.json"

echo "== round trip"
"$GOLFQUANT" roundtrip-eval "$ARTIFACT" --ckpt "$MODEL" --val "$DATA/fineweb_val_*.bin" --tokenizer "$TOKENIZER" \
  --json > "$OUT/roundtrip.json"

R="$OUT/roundtrip.json"
S="$OUT/size_report.json"
printf 'final_float val_loss:%.4f val_bpb:%.4f\n' "$(json_field "$R" float val_loss)" "$(json_field "$R" float val_bpb)"
printf 'final_golfquant_roundtrip val_loss:%.4f val_bpb:%.4f\n' \
  "$(json_field "$R" quantized val_loss)" "$(json_field "$R" quantized val_bpb)"
printf 'final_golfquant_roundtrip_exact val_loss:%.8f val_bpb:%.8f\n' \
  "$(json_field "$R" quantized val_loss)" "$(json_field "$R" quantized val_bpb)"
echo "Serialized model golfquant: $(json_field "$S" artifact_bytes) bytes"
echo "Code size: $(json_field "$S" code_bytes) bytes"
echo "Total submission size golfquant: $(json_field "$S" total_bytes) bytes (budget $BUDGET, headroom $(json_field "$S" headroom_bytes))"
