# Two commands: `make demo` runs the bundled example job; `make test` runs the whole suite.
# Both create .venv when it is missing and install CPU torch plus the project (dev extra).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test lint unit integration e2e bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/inference run examples/chat.jsonl --config configs/tiny-cpu.yaml --output output --job-id demo

lint: $(STAMP)
	$(BIN)/ruff check inference tests bench models examples
	$(BIN)/ruff format --check inference tests bench models examples
	$(BIN)/mypy inference
	$(BIN)/mypy bench

test: lint
	$(BIN)/python -m pytest -q -ra tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf output .pytest_cache .mypy_cache .ruff_cache
