#!/usr/bin/env bash
# Reproduce the shipped tiny models (issue 5): models/multiverse-tiny and its autoregressive twin.
#
# Both are Qwen2 "qwen2-tiny" models (hidden 128, 6 layers, ~1.5M parameters, the project's own
# 512-token BPE) trained from scratch with `multiverse train` on the SAME 20,000 synthetic
# training problems with the SAME budget (3,000 steps of 32 examples, lr 3e-3 cosine); only
# --mode differs: multiverse = Multiverse Attention on the parallel chains, autoregressive =
# the sequential chains with plain causal attention.
#
# Usage: scripts/train_tiny.sh [OUT_DIR] [DEVICE]      (defaults: models, auto)
#   DEVICE=cuda: both runs at once on one GPU, about 4 minutes (the shipped weights: one H200).
#   DEVICE=cpu: the same commands; expect hours on a 2-core machine (see the model READMEs).
set -euo pipefail
OUT=${1:-models}
DEVICE=${2:-auto}
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d)}   # training data and logs (kept out of the model directories)
DATA=$WORK/train.jsonl
mkdir -p "$OUT" "$WORK"
pids=()
$PY -m multiverse.tasks "$DATA" --n 20000 --split train --seed 0
for mode in multiverse autoregressive; do
  name=$mode-tiny
  $PY -m multiverse.cli train --config qwen2-tiny --data "$DATA" --output "$OUT/$name" \
    --mode $mode --epochs 10 --max-steps 3000 --batch-size 32 --lr 3e-3 --no-pack \
    --attention sdpa --no-bf16 --seed 0 --device "$DEVICE" \
    --save-steps 1000 --save-total-limit 1 --logging-steps 50 --no-progress \
    > "$WORK/$name.train.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done   # fails if either run failed
for mode in multiverse autoregressive; do   # ship the final weights only
  rm -rf "$OUT/$mode-tiny"/checkpoint-* "$OUT/$mode-tiny/training_args.bin"
done
for mode in multiverse autoregressive; do tail -n 1 "$WORK/$mode-tiny.train.log"; done
echo "data and logs: $WORK"
