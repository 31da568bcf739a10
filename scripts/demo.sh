#!/usr/bin/env bash
# The README's main command (make demo): RPO preference alignment of the shipped base model on this CPU,
# through `deepspeed rpo_fast/train.py --ds_config configs/zero2_8bit.json ...` (2 ranks on one node: ZeRO-2), then evaluation.
#   make demo                      RPO
#   make demo OBJECTIVE=dpo        any objective: rpo dpo sft dspo dense-dpo cal-dpo dense-reward online-dpo online-rpo
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$py" -m rpo_fast.demo --objective "${OBJECTIVE:-rpo}" --out "${DEMO_OUT:-runs/demo}" ${DEMO_ARGS:-}
