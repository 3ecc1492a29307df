#!/usr/bin/env bash
# GPU check of the engine's tensor side (multiverse/engine/model.py), <= 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a CUDA machine
#
# 1. tests/test_models.py: the CPU parity suite (ours vs transformers, fast vs reference path,
#    loading) plus the CUDA-only tests (CUDA fp32 == CPU fp32 on a mixed batch; bf16 fast path ==
#    reference path), which are skipped on machines without a GPU.
# 2. benchmarks/engine_vs_hf.py on a random Qwen2.5-0.5B-shaped model in bf16 on cuda: tokens/s of
#    our engine (direct model loop, and the LLM API once multiverse/engine/llm.py exists) vs
#    transformers generate, at 1 request and at 16 concurrent requests, plus the matmul floor.
#
# Needs a Python with torch (CUDA build), transformers, safetensors, tokenizers, pytest: the
# repository's .venv if present, else $PYTHON (default python3). Nothing is downloaded. Outputs go
# to $OUT (default /tmp/mv-gpu-check): pytest.txt, bench.txt, bench.json (the benchmark's JSON line).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
fi
OUT="${OUT:-/tmp/mv-gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'EOF'
import torch, transformers
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
EOF

status=0
echo "== 1/2 parity tests (tests/test_models.py, CUDA tests included)"
timeout 240 "$PY" -m pytest tests/test_models.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" || status=1

echo "== 2/2 engine vs transformers, random Qwen2.5-0.5B shape, bf16, cuda"
timeout 240 "$PY" benchmarks/engine_vs_hf.py --models random-qwen2-0.5b --device cuda \
    --dtype bfloat16 --single-tokens 128 --batch 16 --repeats 2 2>&1 | tee "$OUT/bench.txt" || status=1
tail -n 1 "$OUT/bench.txt" > "$OUT/bench.json"

echo "== done (status $status); outputs in $OUT"
exit "$status"
