# The two commands of the README's quick start: `make demo` and `make test`.
# Each creates or reuses .venv and installs only what is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.selfref-installed

.PHONY: demo test lint bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,optuna,cluster,postgres,dashboard]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selfref compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check selfref tests benchmarks experiments
	$(BIN)/ruff format --check selfref tests benchmarks experiments
	$(BIN)/mypy selfref

clean:
	rm -rf $(VENV)
