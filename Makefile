# Developer entry points. Every target creates the virtual environment first when needed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint protos check-protos bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/icefarm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

check-protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py --check

lint: $(STAMP) check-protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint

bench: $(STAMP)
	$(BIN)/python bench/reserve_release.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
