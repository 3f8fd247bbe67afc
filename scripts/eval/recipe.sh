#!/usr/bin/env bash
# Evaluate a fine-tuned NEPA classifier on the ImageNet-1k validation split (50,000 images), bf16, on
# every visible GPU. MODEL is a local folder; when it is missing and HUB_ID is set, the released
# checkpoint is downloaded into it first. nepa_b_sft_eval.sh and nepa_l_sft_eval.sh set the numbers.
# Overrides: MODEL, DATA_DIR, OUTPUT_DIR, PER_DEVICE_BATCH; extra flags pass through (e.g. --use_cpu True).
set -euo pipefail
source "$(dirname "$0")/../common.sh"

: "${MODEL:?set MODEL to a classifier folder}"
if [ ! -d "$MODEL" ]; then
  HF_CLI=$( [ -x .venv/bin/hf ] && echo .venv/bin/hf || echo hf )
  echo "$MODEL is missing: downloading ${HUB_ID:?} into it" >&2
  if ! "$HF_CLI" download "$HUB_ID" --local-dir "$MODEL" >&2; then
    echo "could not download $HUB_ID (offline?). Where there is network, run" >&2
    echo "  hf download $HUB_ID --local-dir $MODEL" >&2
    echo "and copy the folder here, or set MODEL to a local classifier folder." >&2
    exit 1
  fi
fi
launch eval.py \
  --model_name_or_path "$MODEL" \
  "${DATA_FLAGS[@]}" \
  --output_dir "${OUTPUT_DIR:-outputs/eval-$(basename "$MODEL")}" \
  ${CROP_PCT:+--crop_pct "$CROP_PCT"} \
  --per_device_eval_batch_size "${PER_DEVICE_BATCH:-256}" \
  --bf16 True --dataloader_num_workers "${NUM_WORKERS:-10}" \
  --report_to none \
  "$@"
