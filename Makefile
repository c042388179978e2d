# make demo   — the whole pipeline on a tiny model, CPU, a few minutes
# make test   — every CPU test (slow ones included); what CI runs
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on disk on these machines; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-fast lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

test: install
	$(BIN)/ruff check qwen_sft tests bench *.py
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check qwen_sft tests bench *.py

demo: install
	$(BIN)/python -m qwen_sft.demo

clean:
	rm -rf .cache/qwen_sft build *.egg-info .pytest_cache
