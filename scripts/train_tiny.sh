#!/usr/bin/env bash
# Reproduce the shipped tiny models: models/multiverse-tiny and its autoregressive twin.
#
# Both are Qwen2 "qwen2-mini" models (hidden 96, 6 layers, ~0.9M parameters, the project's own
# 512-token BPE) trained from scratch with `multiverse train` on the SAME 20,800 synthetic
# training problems in the SAME fixed order with the SAME budget (1,300 steps of 16 examples,
# one pass, lr 3e-3 cosine): a warm-up of 11,200 short `countdown_warmup` problems (starts
# 10-39), then 9,600 `countdown` problems (starts 50-99). Only --mode differs: multiverse =
# Multiverse Attention on the parallel chains, autoregressive = the sequential chains with
# plain causal attention.
#
# Each run writes train_summary.json (tasks trained on: countdown_warmup, countdown) next to the
# weights; `multiverse eval --benchmark synthetic` and `multiverse demo` pose those tasks.
# --overwrite: trains over the shipped directories (weights replaced; old checkpoint-*, train_log.jsonl
# and train_summary.json removed first; README.md, eval_summary.json, train_log_summary.json kept).
#
# Usage: scripts/train_tiny.sh [OUT_DIR] [DEVICE]      (defaults: models, cpu)
#   DEVICE=cpu: both runs at once, one thread each (the shipped weights: a 2-core machine,
#   see the model READMEs for the times).
#   DEVICE=cuda: the same commands on one GPU, a few minutes.
set -euo pipefail
OUT=${1:-models}
DEVICE=${2:-cpu}
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d)}   # training data and logs (kept out of the model directories)
DATA=$WORK/train.jsonl
mkdir -p "$OUT" "$WORK"
pids=()
$PY -m multiverse.eval.tasks "$WORK/warmup.jsonl" --n 11200 --split train --seed 0 --tasks countdown_warmup
$PY -m multiverse.eval.tasks "$WORK/main.jsonl" --n 9600 --split train --seed 0 --tasks countdown
cat "$WORK/warmup.jsonl" "$WORK/main.jsonl" > "$DATA"   # warm-up first: trained in file order
for mode in multiverse autoregressive; do
  name=$mode-tiny
  OMP_NUM_THREADS=1 $PY -m multiverse.cli train --config qwen2-mini --data "$DATA" \
    --output "$OUT/$name" --overwrite --mode $mode --max-steps 1300 --batch-size 16 --lr 3e-3 --no-shuffle --no-pack \
    --attention sdpa --no-bf16 --seed 0 --device "$DEVICE" \
    --save-steps 250 --save-total-limit 3 --logging-steps 25 --no-progress \
    > "$WORK/$name.train.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done   # fails if either run failed
for mode in multiverse autoregressive; do   # ship the final weights only
  rm -rf "$OUT/$mode-tiny"/checkpoint-* "$OUT/$mode-tiny/training_args.bin"
done
for mode in multiverse autoregressive; do tail -n 1 "$WORK/$mode-tiny.train.log"; done
echo "data and logs: $WORK"
