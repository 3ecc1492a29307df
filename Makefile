# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test venv install lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install torch==2.13.0

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

venv: $(BIN)/python
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/multiverse demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check multiverse tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
