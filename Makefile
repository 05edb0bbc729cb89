# The README's commands. `make demo` sets everything up and runs the offline demo;
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e ".[test]"

demo: install
	$(BIN)/gqa-convert demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check gqa_convert tests scripts
	$(BIN)/ruff format --check gqa_convert tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
