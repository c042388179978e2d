"""Tokenization for qwen3_next (Qwen3-Coder-Next): the same tokenizer and template family as 30B-A3B.

    python -m pytest -q tests/test_next_tokenize.py

Qwen3-Coder-Next's official chat template is not available offline here; public peers map the model to the
30B-A3B template (XML tool calls, no thinking mode). These tests pin that the project renders and labels
tool conversations for a qwen3_next model directory exactly as for Qwen3-Coder-30B-A3B: token for token
against the project's own template, and, with the released 30B-A3B template in a qwen3_next directory
(tests/fixtures), against the 30B-A3B directory.
"""

from __future__ import annotations

import pytest

from qwen_sft.model.tiny import TinySpec, make_tiny_model
from qwen_sft.tokenize.sample import SampleTokenizer

CALL, END_CALL, IM_END = 151657, 151658, 151645
TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string", "description": "file path"},
                                     "lines": {"type": "integer"}}, "required": ["path"]}}},
         {"type": "function", "function": {"name": "run", "description": "Run a shell command.", "parameters": {
             "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}}]


def _call(name: str, args) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


RECORDS = [
    {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Fix the test in a.py"},
        {"role": "assistant", "content": "Reading it first.", "tool_calls": [_call("read_file", {"path": "a.py"})]},
        {"role": "tool", "content": "def f():\n    return 1\n"},
        {"role": "assistant", "content": "", "tool_calls": [_call("read_file", {"path": "b.py", "lines": 3}),
                                                            _call("run", '{"cmd": "pytest -q"}')]},
        {"role": "tool", "content": "x = 2"}, {"role": "tool", "content": "1 failed"},
        {"role": "assistant", "content": "The test expects 2; change `return 1` to `return 2`."}]},
    {"tools": TOOLS, "messages": [{"role": "user", "content": "한국어로: 파일 목록"},
                                  {"role": "assistant", "content": "", "tool_calls": [_call("run", {"cmd": "ls"})]}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]


@pytest.fixture(scope="module")
def next_tok(tmp_path_factory):
    from qwen_sft.tokenizer import load_tokenizer

    spec = TinySpec(model_type="qwen3_next", layers=2, experts=16, active=10, full_attention_interval=2)
    model_dir = make_tiny_model(tmp_path_factory.mktemp("next_tok") / "m", spec)
    return load_tokenizer(str(model_dir))


def _tokenized(tok) -> list[tuple[list[int], list[int]]]:
    st = SampleTokenizer(tok, max_len=4096)
    return [(s.input_ids.tolist(), s.label.tolist()) for s in map(st.tokenize, RECORDS)]


def test_next_model_dir_tokenizes_tool_conversations_like_the_project_template(next_tok, offline_tok):
    ours = _tokenized(next_tok)
    assert ours == _tokenized(offline_tok)
    ids, labels = ours[0]
    supervised = [t for t in labels if t != -100]
    # three assistant turns with three tool calls, all trained; the tools' system block is not
    assert supervised.count(CALL) == supervised.count(END_CALL) == 3 and supervised.count(IM_END) == 3
    assert ids.count(CALL) >= 3
    assert len(next_tok) == len(offline_tok) and next_tok.eos_token == "<|im_end|>"


def test_next_model_dir_with_the_released_template_tokenizes_like_30b_a3b(spec_tok, tmp_path):
    """A qwen3_next directory carrying the released 30B-A3B tokenizer + template (what public peers map
    Coder-Next to) gives exactly the ids and labels of the 30B-A3B directory: nothing in the pipeline depends
    on the model type."""
    from qwen_sft.tokenizer import load_tokenizer

    spec = TinySpec(model_type="qwen3_next", layers=2, experts=16, active=10, full_attention_interval=2)
    model_dir = make_tiny_model(tmp_path / "m", spec, tokenizer=spec_tok.name_or_path)
    assert '"model_type": "qwen3_next"' in (model_dir / "config.json").read_text()
    next_tok = load_tokenizer(str(model_dir))
    assert next_tok.chat_template == spec_tok.chat_template
    assert _tokenized(next_tok) == _tokenized(spec_tok)
