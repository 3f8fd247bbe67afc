#!/usr/bin/env bash
# The GPU figures of docs/performance.md, each table also written to RESULTS_DIR (default outputs/bench-gpu).
# Parts, in the order given (default: all three, cheapest and most important first):
#   vit-b       the training step alone, ViT-B/14: pretraining and fine-tuning models, bf16, compile off and on
#   end-to-end  the pretraining and fine-tuning recipe scripts on generated JPEGs, 8 and 16 dataloader workers
#   vit-l       the training step alone, ViT-L/14, as for vit-b
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
export PYTHON PYTHONUNBUFFERED=1
RESULTS_DIR=${RESULTS_DIR:-outputs/bench-gpu}
mkdir -p "$RESULTS_DIR"

"$PYTHON" -c "import os, torch, transformers; print(torch.cuda.get_device_name(), os.cpu_count(), 'CPUs, torch',
  torch.__version__, 'transformers', transformers.__version__)" | tee -a "$RESULTS_DIR/device.txt"
step() { "$PYTHON" -m bench.train_step --device cuda --sizes "$1" --models pretrain,finetune --dtypes bf16 \
           --compile off,on --grad_ckpt off --steps 10 --warmup 3; }
parts=("$@")
(( ${#parts[@]} )) || parts=(vit-b end-to-end vit-l)
for part in "${parts[@]}"; do
  case $part in
    vit-b) step vit-b-224 | tee "$RESULTS_DIR/train_step_vit_b.md" ;;
    vit-l) step vit-l-224 | tee "$RESULTS_DIR/train_step_vit_l.md" ;;
    end-to-end) "$PYTHON" -m bench.end_to_end --workers 8,16 --steps 200 | tee "$RESULTS_DIR/end_to_end.md" ;;
    *) echo "unknown part $part: choose from vit-b, end-to-end, vit-l" >&2; exit 2 ;;
  esac
done
