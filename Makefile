# make demo   — the whole pipeline on a tiny model, CPU, a few minutes
# make test   — every CPU test (slow ones included); what CI runs. Tiers: tests/README.md
# make test-fast — the fast tier: unit and tiny-model CPU tests (no slow, no heavy)
# CI=true make test — a test whose fixture (tests/fixtures/) is missing fails instead of skipping
# make check-gguf / check-vllm — opt-in: the real consumers (llama.cpp, vLLM) read our exports, each in its own venv
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on disk on these machines; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-heavy test-fast lint demo clean check-gguf check-vllm

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

test: install
	$(BIN)/ruff check qwen_sft tests bench *.py
	$(BIN)/python -m pytest -q -m "not heavy"

# Opt-in: the trust tests of the fake-tensor trace at (mid-)full size; many CPU minutes each.
test-heavy: install
	$(BIN)/python -m pytest -q -m heavy

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not heavy"

lint: install
	$(BIN)/ruff check qwen_sft tests bench *.py

demo: install
	$(BIN)/python -m qwen_sft.demo

clean:
	rm -rf .cache/qwen_sft build *.egg-info .pytest_cache

# ---- opt-in consumer checks (never part of `make test`): each consumer lives in its own venv under .cache/ ----
GGUF_VENV := .cache/venv-gguf
VLLM_VENV := .cache/venv-vllm
# llama-cpp-python ships as a source package: a portable CPU build (minutes to compile on a small machine).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF

$(GGUF_VENV)/.installed:
	test -x $(GGUF_VENV)/bin/python || $(PYTHON) -m venv $(GGUF_VENV)
	$(GGUF_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(GGUF_VENV)/bin/pip install -q numpy "llama-cpp-python>=0.3.36"
	touch $@

# Builds a tiny merged qwen3_moe and qwen3_next, exports f32 + bf16 + q8_0 GGUF, and has llama.cpp reproduce
# transformers' tokens/logits. llama-cpp-python 0.3.36 is the version checked (0.3.16's llama.cpp has no qwen3next).
check-gguf: install $(GGUF_VENV)/.installed
	$(BIN)/python scripts/check_gguf.py prepare .cache/check-gguf
	$(GGUF_VENV)/bin/python scripts/check_gguf.py consume .cache/check-gguf

# vLLM's wheel pulls a CUDA torch (several GB). Its LoRA loader runs on CPU; on a GPU machine the same script
# also serves the tiny model with the adapter and compares tokens with the merged model.
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm
	touch $@

check-vllm: install $(VLLM_VENV)/.installed
	$(BIN)/python scripts/check_vllm.py prepare .cache/check-vllm
	$(VLLM_VENV)/bin/python scripts/check_vllm.py consume .cache/check-vllm
