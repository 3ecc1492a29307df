#!/usr/bin/env bash
# GPU check of the engine and the trainer on one CUDA device, <= 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a CUDA machine
#
# 1. parity tests with the CUDA-only ones included (skipped on machines without a GPU):
#    tests/engine/test_models.py (CUDA fp32 == CPU fp32, bf16 fast path == reference),
#    tests/engine/test_cuda_graphs.py (graph replay == eager: exact in fp32, within tolerance in
#    bf16; the engine with graphs == the eager engine == one full forward, forks and preemption
#    included), tests/engine/test_static_decode.py (the static step's CPU-verified rules, on CUDA).
# 2. benchmarks/gpu_decode.py, random Qwen2.5-0.5B shape, bf16: decode ms/step (eager, static,
#    graph replay) vs the matmul floor at batch 1 and 16 (goal <= 1.5x floor), the engine's
#    tokens/s and host ms/step with graphs on/off, fork speedup for k = 2, 4, 8 vs # parallel
#    (goal >= 0.9 x # parallel), graphs vs eager cascade on forked steps.
# 3. benchmarks/engine_vs_hf.py, same shape: LLM.generate (graphs on) vs transformers generate
#    at 1 and 16 requests (goal >= 5x at 1).
# 4. benchmarks/train_step.py, Qwen2.5-0.5B layer shapes: the Multiverse train step
#    (flex_attention BlockMask) vs plain causal on the same tokens (goal <= 1.3x).
#
# Needs a Python with torch (CUDA build), transformers, safetensors, tokenizers, pytest: the
# repository's .venv if present, else $PYTHON (default python3). Nothing is downloaded. Outputs go
# to $OUT (default /tmp/mv-gpu-check): pytest.txt, decode.txt, bench.txt, train.txt and
# summary.json; the last line printed is one JSON object with every figure.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
fi
OUT="${OUT:-/tmp/mv-gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'EOF2'
import torch, transformers
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
EOF2

status=0
echo "== 1/4 parity tests (CUDA tests included)"
timeout 150 "$PY" -m pytest tests/engine/test_models.py tests/engine/test_cuda_graphs.py \
    tests/engine/test_static_decode.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" || status=1

echo "== 2/4 decode step vs floor, engine with/without graphs, fork speedup (random Qwen2.5-0.5B shape, bf16)"
timeout 150 "$PY" benchmarks/gpu_decode.py --device cuda --dtype bfloat16 2>&1 | tee "$OUT/decode.txt" || status=1

echo "== 3/4 engine vs transformers generate (random Qwen2.5-0.5B shape, bf16)"
timeout 120 "$PY" benchmarks/engine_vs_hf.py --models random-qwen2-0.5b --device cuda \
    --dtype bfloat16 --single-tokens 128 --batch 16 --repeats 2 2>&1 | tee "$OUT/bench.txt" || status=1

echo "== 4/4 train step: Multiverse (flex_attention) vs causal (Qwen2.5-0.5B layer shapes)"
timeout 60 "$PY" benchmarks/train_step.py --device cuda --preset qwen2.5-0.5b-shape --tokens 4096 \
    --steps 5 2>&1 | tee "$OUT/train.txt" || status=1

"$PY" - "$OUT" "$status" <<'EOF2'
import json, pathlib, sys
out, summary = pathlib.Path(sys.argv[1]), {"status": int(sys.argv[2])}
for name in ("decode", "bench", "train"):
    lines = (out / f"{name}.txt").read_text().strip().splitlines() if (out / f"{name}.txt").exists() else []
    try:
        summary[name] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        summary[name] = None
tail = (out / "pytest.txt").read_text().strip().splitlines()[-1:] if (out / "pytest.txt").exists() else []
summary["pytest"] = tail[0] if tail else None
(out / "summary.json").write_text(json.dumps(summary))
print(json.dumps(summary))
EOF2
exit "$status"
