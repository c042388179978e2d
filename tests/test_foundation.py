"""The offline tokenizer equals the released one; the tiny model loads; the CLI lists its verbs."""

from __future__ import annotations

import json

from qwen_sft.cli import VERBS, main
from qwen_sft.tokenizer import IM_END_ID, IM_START_ID, SPECIAL_TOKENS


def test_offline_vocab_and_merges_equal_released(offline_tok_dir, spec_dir):
    # spec_dir: the released files, sha256-checked (tests/fixture_data.py)
    ours = json.loads((offline_tok_dir / "vocab.json").read_text(encoding="utf-8"))
    theirs = json.loads((spec_dir / "vocab.json").read_text(encoding="utf-8"))
    assert ours == theirs
    # The released file has CRLF line ends; compare entries. (str.splitlines would also split on
    # unicode line separators that occur inside byte-level tokens.)
    m_ours = (offline_tok_dir / "merges.txt").read_bytes().decode().split("\n")
    m_theirs = (spec_dir / "merges.txt").read_bytes().decode().split("\n")
    m_theirs = [m.removesuffix("\r") for m in m_theirs if not m.startswith("#version")]
    assert [m for m in m_ours if m] == [m for m in m_theirs if m]


def test_offline_tokenizer_ids(offline_tok):
    assert len(offline_tok) == 151_669
    assert offline_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START_ID, IM_END_ID]
    for i, tok, _ in SPECIAL_TOKENS:
        assert offline_tok.convert_tokens_to_ids(tok) == i
    assert offline_tok("hello world", add_special_tokens=False).input_ids == [14990, 1879]
    # "\n" + "\n" merge into one token (271): the boundary effect the spec warns about.
    assert offline_tok("\n\n", add_special_tokens=False).input_ids == [271]
    assert offline_tok.eos_token == "<|im_end|>" and offline_tok.pad_token == "<|endoftext|>"


def test_offline_encoding_equals_released(offline_tok, spec_tok):
    texts = ["def f(x):\n    return x  # 한국어 中文 🚀", "<|im_start|>user\n<tool_call>\n</tool_call><|im_end|>", " \n\n\t x"]
    for text in texts:
        assert offline_tok(text, add_special_tokens=False).input_ids == spec_tok(text, add_special_tokens=False).input_ids


def test_tiny_model_loads(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert model.config.model_type == "qwen3_moe"
    assert model.model.embed_tokens.weight.shape[0] == 151_936
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (8, 64, 64) and experts.down_proj.shape == (8, 64, 32)
    out = model(torch.tensor([[151644, 872, 198]]))
    assert out.logits.shape == (1, 3, 151_936)


def test_cli_lists_verbs(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for verb in VERBS:
        assert verb in text
