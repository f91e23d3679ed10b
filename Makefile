# The README's two commands: `make demo` and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install demo test lint bench docs clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so no dependency can pull a different (CUDA) build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,lm-eval]" "$(TORCH)"
	$(BIN)/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 1)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moerge demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# README's option tables, regenerated from the options models (a test fails when they are stale).
docs: $(STAMP)
	$(BIN)/python -m moerge.cli.docs README.md

clean:
	rm -rf $(VENV) build *.egg-info
